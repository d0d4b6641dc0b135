"""A compressed model works with the ecosystem's own tools, unchanged: ``torch.export`` with a
dynamic length, both ONNX exporters with onnxruntime and accelerate's CPU and disk offload for
every layer kind (kept rows, low-rank factors, MPO, TTNS, cross-layer groups, slim MLPs,
attention with fewer query heads or fewer key/value heads, int8 through torchao, the library's own int4); torchao's int8
and peft's ``all-linear`` reach the layers made of ``nn.Linear`` (kept rows, low-rank factors,
cross-layer bases and cores, the smaller projections of slim MLPs and attention), and so does
transformers' bitsandbytes conversion; where bitsandbytes cannot follow (a compressed folder
loaded with a bitsandbytes config, compactify of a model it has quantized) the error is loud.

Every cell compares logits with the eager model's: to float32 rounding (``torch.export``,
ONNX, offload: 1e-5; a many-site layer exported rebuilds its weight, where eager may contract
through the cores), or, for int8, within the rounding error int8 makes (3%). Where a tool
cannot take torchao's tensors it fails loudly, and the cell says with what (``REFUSED``)."""

import tempfile

import pytest
import torch

from models import build, calibration, silence_heads
from tensornet_llm import (
    CompactifyConfig, MPOLinear, TTNSLinear, compactify, load_compactified, quantize,
    save_compactified,
)
from tensornet_llm.errors import ArgumentError
from tensornet_llm.layers.cross_layer import CrossLayerLinear
from tensornet_llm.layers.quantized import QuantizedTensorNetworkLinear
from tensornet_llm.layers.low_rank import KeptRowsLinear, LowRankLinear

KINDS = {"kept rows": (dict(ratio=0.6, method="low-rank"), KeptRowsLinear),
         "low-rank": (dict(ratio=0.6, method="low-rank",
                           config=CompactifyConfig(interpolative=False)), LowRankLinear),
         "mpo": (dict(chi=4, method="mpo", n_sites=3), MPOLinear),
         "ttns": (dict(chi=4, method="ttns", n_sites=4), TTNSLinear),
         "cross-layer": (dict(ratio=0.7, cross_layer=2), CrossLayerLinear),
         # gated MLPs of fewer neurons: plain nn.Linear of smaller shape
         "slim": (dict(ratio=0.5, targets=["mlp"], calibration=calibration()), torch.nn.Linear),
         # fewer query heads per group (the silenced ones): smaller q_proj and o_proj
         "fewer heads": (dict(ratio=0.75, targets=["self_attn"], calibration=calibration()),
                         torch.nn.Linear),
         # a key/value head fewer (the silenced group), its query heads with it: a smaller cache
         "fewer kv heads": (dict(ratio=0.5, targets=["self_attn"], calibration=calibration()),
                            torch.nn.Linear),
         "int8": (dict(ratio=0.6, method="low-rank"), LowRankLinear),  # kept rows, quantized
         "int4": (dict(chi=4, method="mpo", n_sites=3), QuantizedTensorNetworkLinear)}
LINEAR_KINDS = ["kept rows", "low-rank", "cross-layer", "slim", "fewer heads", "fewer kv heads"]
#: The cells where a tool refuses torchao's tensors (loudly, with these errors).
REFUSED = {("int8", "torchscript"): (NotImplementedError, "Int8Tensor dispatch.*aten.view"),
           ("int8", "disk"): (RuntimeError, "not supported for tensor subclasses"),
           # torchao's quantize_ walks a shared basis once per member: the second time it meets
           # a weight it has already quantized
           ("cross-layer", "torchao"): (NotImplementedError, "Int8Tensor dispatch")}


def compressed(kind: str):
    options, cls = KINDS[kind]
    model = build("llama")
    if kind == "fewer heads":
        silence_heads(model)
    if kind == "fewer kv heads":
        silence_heads(model, heads=(2, 3))  # the second key/value group
    model.config._attn_implementation = "eager"  # exportable attention
    compactify(model, progress=False, **options)
    if kind == "int8":
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
    if kind in ("int8", "int4"):  # every weight: factors or cores, LM head, embeddings
        quantize(model, int(kind[3:]))
    kinds = (KeptRowsLinear, LowRankLinear, MPOLinear, TTNSLinear, QuantizedTensorNetworkLinear)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    if cls is CrossLayerLinear:  # groups of two blocks; the budget may leave a module alone
        assert any(isinstance(m, CrossLayerLinear) for m in model.modules())
    elif kind in ("slim", "fewer heads", "fewer kv heads"):
        assert slim_layers(model) and not layers
    else:
        assert layers and all(type(m) is cls for m in layers)
    return model


def slim_layers(model) -> set[str]:
    """The names of the projections of slim MLPs (narrower than the config's MLP width) and of
    attention with fewer query heads than the config's (and of its key/value projections where
    it has fewer key/value heads)."""
    config = model.config
    width, heads = config.intermediate_size, config.num_attention_heads
    mlps = {f"{n}.{p}" for n, m in model.named_modules() if n.endswith("mlp")
            for p in ("gate_proj", "up_proj", "down_proj")
            if type(getattr(m, p)) is torch.nn.Linear and getattr(m, "gate_proj").out_features < width}
    attention = {f"{n}.{p}" for n, m in model.named_modules() if n.endswith("self_attn")
                 for p in ("q_proj", "o_proj")
                 if m.q_proj.out_features < heads * m.head_dim}
    kv = {f"{n}.{p}" for n, m in model.named_modules() if n.endswith("self_attn")
          for p in ("k_proj", "v_proj")
          if m.k_proj.out_features < config.num_key_value_heads * m.head_dim}
    return mlps | attention | kv


def refused(kind: str, tool: str):
    """A ``pytest.raises`` for a refused cell, else a context that checks nothing."""
    if (kind, tool) not in REFUSED:
        return tempfile.TemporaryDirectory()  # any context manager
    error, message = REFUSED[kind, tool]
    return pytest.raises(error, match=message)


class Logits(torch.nn.Module):
    """``ids -> logits`` with explicit positions and mask (what exporters trace)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, positions):
        return self.model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                          use_cache=False).logits


def lengths():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(2, 90, (1, n), generator=g), torch.arange(n)[None]) for n in (12, 40)]


@pytest.fixture(params=list(KINDS))
def kind(request):
    return request.param


@pytest.fixture
def model(kind):
    return compressed(kind)


def eager(model):
    with torch.no_grad():
        return [model(input_ids=ids).logits for ids, _ in lengths()]


def test_torch_export_with_a_dynamic_length(model):
    from torch.export import Dim, export

    (ids, positions), _ = lengths()
    length = Dim("length", min=2, max=256)
    program = export(Logits(model), (ids, positions), strict=False,
                     dynamic_shapes={"ids": {1: length}, "positions": {1: length}})
    for (ids, positions), expected in zip(lengths(), eager(model)):
        torch.testing.assert_close(program.module()(ids, positions), expected, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_runs_in_onnxruntime_at_every_length(kind, model, dynamo, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    (ids, positions), _ = lengths()
    axes = {"ids": {1: "length"}, "positions": {1: "length"}}
    if (kind, "torchscript" if not dynamo else "dynamo") in REFUSED:
        with refused(kind, "torchscript"), torch.no_grad():
            torch.onnx.export(Logits(model), (ids, positions), path, dynamo=False)
        return
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(Logits(model), (ids, positions), path, dynamo=True,
                              input_names=["ids", "positions"], output_names=["logits"],
                              dynamic_shapes=axes)
        else:
            torch.onnx.export(Logits(model), (ids, positions), path, dynamo=False,
                              input_names=["ids", "positions"], output_names=["logits"],
                              dynamic_axes={**axes, "logits": {1: "length"}})
    session = ort.InferenceSession(str(path))
    for (ids, positions), expected in zip(lengths(), eager(model)):
        out = session.run(None, {"ids": ids.numpy(), "positions": positions.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_accelerate_offload_computes_the_same_logits(kind, model, offload):
    from accelerate import cpu_offload, disk_offload

    expected = eager(model)
    with tempfile.TemporaryDirectory() as folder:
        if offload == "cpu":
            cpu_offload(model, execution_device="cpu")
        else:
            with refused(kind, "disk"):
                disk_offload(model, folder, execution_device="cpu")
            if (kind, "disk") in REFUSED:
                return
        assert all(p.device.type == "meta" for p in model.model.layers[0].mlp.parameters())
        for out, ref in zip(eager(model), expected):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_torchao_int8_reaches_every_factor(kind):
    quantization = pytest.importorskip("torchao.quantization")
    model = compressed(kind)
    expected = eager(model)
    if (kind, "torchao") in REFUSED:
        with refused(kind, "torchao"):
            quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
        # Once per module, it does: every basis and core, as tensornet_llm.quantize does.
        model = compressed(kind)
        seen = set()
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig(), filter_fn=lambda m, _: (
            isinstance(m, torch.nn.Linear) and id(m) not in seen and not seen.add(id(m))))
    else:
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    factors = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert factors and all(type(m.weight) is not torch.nn.Parameter or
                           type(m.weight.data) is not torch.Tensor for m in factors)
    for out, ref in zip(eager(model), expected):
        assert float((out - ref).norm() / ref.norm()) < 0.03


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_peft_all_linear_trains_saves_and_loads_on_the_factors(kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = compressed(kind)
    save_compactified(model, tmp_path / "base")
    slim = slim_layers(model)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    adapted_names = {n.removeprefix("base_model.model.") for n, m in adapted.named_modules()
                     if hasattr(m, "lora_A")}
    factors = {n for n, m in model.named_modules()
               if n.endswith((".kept", ".others", ".first", ".second", ".mix", ".input", ".output"))}
    factors |= slim
    assert factors and factors <= adapted_names
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    ids = lengths()[0][0]
    adapted(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        trained = adapted(input_ids=ids).logits
    adapted.save_pretrained(tmp_path / "adapters")
    again = peft.PeftModel.from_pretrained(load_compactified(tmp_path / "base"), tmp_path / "adapters")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-6)
        merged = again.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["kept rows", "slim"])
def test_bitsandbytes_reaches_the_factors_and_fails_loudly_where_it_cannot_follow(kind, tmp_path):
    """transformers' ``replace_with_bnb_linear`` (what ``from_pretrained`` runs for a
    ``BitsAndBytesConfig``) converts every ``nn.Linear`` of a compressed model, factors and
    slim projections included. Loading a compressed folder with a bitsandbytes config stops with
    transformers' error (a checkpoint has one quantization method), and compactify refuses a
    model bitsandbytes loaded, naming the first quantized module, before touching it."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    model = compressed(kind)
    model.save_pretrained(tmp_path / "compressed")
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    replace_with_bnb_linear(model, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert linears == {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    with pytest.raises(ValueError, match="quantized with TensorNetworkConfig"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "compressed",
                                             quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    build("llama").save_pretrained(tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    types = [type(m) for m in loaded.modules()]
    with pytest.raises(ArgumentError, match=r"^model\.layers\.0\.self_attn\.q_proj holds "
                       r"quantized weights \(Int8Params, torch\.int8\)"):
        compactify(loaded, ratio=0.6, progress=False)
    assert [type(m) for m in loaded.modules()] == types


@pytest.mark.parametrize("bits, match", [
    (8, r"^model\.layers\.0\.self_attn\.q_proj holds quantized weights \(Int8Tensor"),
    (4, r"matched no nn\.Linear.*model\.layers\.0\.self_attn\.q_proj is quantized")])
def test_compactify_refuses_a_quantized_model_before_touching_it(bits, match):
    """int8 (torchao's tensors: the SVD would fail deep inside them, with no ``pow``) or int4
    (the library's own layers): one line naming a quantized module; the model is as it was."""
    if bits == 8:
        pytest.importorskip("torchao")
    model = build("llama")
    quantize(model, bits)
    expected, types = eager(model), [type(m) for m in model.modules()]
    with pytest.raises(ArgumentError, match=match):
        compactify(model, ratio=0.6, progress=False)
    assert [type(m) for m in model.modules()] == types
    for out, ref in zip(eager(model), expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
