"""Weight-only int8 / int4 quantization: bounded rounding error, tying, save/load, validation."""

import copy
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from models import build, inputs
from tensornet_llm import compactify, load_compactified, save_compactified
from tensornet_llm.layers.quantized import (
    QuantizedEmbedding, QuantizedLinear, QuantizedTensorNetworkLinear, dequantize_tensor,
    quantize_tensor,
)
from tensornet_llm.saving.tensors import is_torchao_tensor
from tensornet_llm.train.qat import rounded_weights, rounding_plan
from tensornet_llm.errors import ArgumentError
from tensornet_llm.train.quantize import quantize
from test_compactify import assert_unchanged, snapshot


@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), bits=st.sampled_from([8, 4]),
       group=st.sampled_from([None, 2, 4, 6]), data=st.data())
@settings(max_examples=60, deadline=None)
def test_rounding_error_is_at_most_half_a_step(shape, bits, group, data):
    channel = data.draw(st.integers(0, len(shape) - 1))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float64)
    codes, scale = quantize_tensor(t, bits, group, channel)
    back = dequantize_tensor(codes, scale, tuple(shape), bits, group, channel, torch.float64)
    assert back.shape == t.shape
    # Each entry is within half a quantization step of its group's scale (fp16 scale rounding
    # adds at most 2^-11 relative).
    step = scale.double().max()
    assert float((back - t).abs().max()) <= 0.5 * float(step) * (1 + 1e-3) + 1e-3 * float(t.abs().max())
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)


def test_int4_decodes_every_code_and_packs_two_per_byte():
    t = torch.arange(-7, 8, dtype=torch.float32).reshape(1, 15) * 0.5  # scale 0.5 exactly
    codes, scale = quantize_tensor(t, 4, None, 0)
    assert codes.shape == (1, 8) and float(scale) == 0.5  # 15 codes padded to 16, 2 per byte
    torch.testing.assert_close(dequantize_tensor(codes, scale, (1, 15), 4), t, rtol=0, atol=0)


def test_short_rows_are_not_padded_to_a_long_group():
    codes, scale = quantize_tensor(torch.randn(10, 32), 4, 64, 0)
    assert codes.shape == (10, 16) and scale.shape == (10, 1)


@pytest.mark.parametrize("bits, bound", [(8, 0.03), (4, 0.5)])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_quantized_forward_is_close_and_round_trips(arch, bits, bound, tmp_path):
    if bits == 8:
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = build(arch)
    compactify(model, chi=6, progress=False)
    batch = inputs(arch)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        ref = model(**batch).logits
    report = quantize(model, bits)
    assert report.bytes_after < report.bytes_before / (3 if bits == 8 else 5)
    kinds = {type(m) for m in model.modules()}
    assert QuantizedTensorNetworkLinear in kinds  # MPO cores: written here for int8 too
    if bits == 8:  # every nn.Linear and nn.Embedding through torchao
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                assert is_torchao_tensor(m.weight), m
    else:
        assert {QuantizedEmbedding, QuantizedLinear} <= kinds
    assert not any(p.dtype == torch.float32 and p.dim() > 1 and not is_torchao_tensor(p)
                   for p in model.parameters())
    with torch.no_grad():
        out = model(**batch).logits
    assert float((out - ref).norm() / ref.norm()) < bound
    save_compactified(model, tmp_path / "q")
    loaded = load_compactified(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, out, rtol=0, atol=0)
    if tied:
        head, emb = loaded.get_output_embeddings(), loaded.get_input_embeddings()
        if bits == 8:
            assert head.weight is emb.weight
        else:
            assert head.qweight.codes.data_ptr() == emb.qweight.codes.data_ptr()


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_table_is_quantized_once_and_counted_once(bits):
    if bits == 8:
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    report = quantize(model, bits)
    if bits == 8:  # torchao alone would quantize the table twice, untied
        assert model.lm_head.weight is model.transformer.wte.weight
        assert is_torchao_tensor(model.lm_head.weight)
    else:
        assert model.lm_head.qweight is model.transformer.wte.qweight
    rows = {name: (before, after) for name, _, before, after in report.rows}
    assert rows["lm_head"] == (0, 0) and rows["transformer.wte"][1] > 0


def test_quantizing_only_cores_leaves_dense_layers_in_float():
    model = build("llama")
    compactify(model, chi=6, progress=False, exclude=["down_proj"])
    quantize(model, 4, dense=False, embeddings=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedTensorNetworkLinear)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)


def test_generate_runs_after_quantization():
    pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = build("llama")
    compactify(model, chi=6, progress=False)
    quantize(model, 8)
    out = model.generate(torch.tensor([[2, 3, 4]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3), "bits must be 8 or 4"),
    (dict(bits=4, group_size=3), "group_size must be None or an even integer"),
    (dict(bits=8, cores="yes"), "cores must be True or False"),
    (dict(bits=8, exclude=[""]), "exclude patterns must be non-empty"),
])
def test_bad_arguments_leave_the_model_untouched(kwargs, message):
    model = build("llama")
    compactify(model, chi=6, progress=False)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        quantize(model, **kwargs)
    assert_unchanged(model, snap)


def test_without_torchao_int4_works_and_int8_names_the_extra(monkeypatch):
    """torchao is an optional extra: int4 (the library's own layers) never imports it, and
    int8 says which extra to install before any module changes."""
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao: ImportError
    model = build("llama")
    compactify(model, chi=6, progress=False)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"torchao.*tensornet-llm\[torchao\]"):
        quantize(model, 8)
    assert_unchanged(model, snap)
    batch = inputs("llama")
    with torch.no_grad():
        ref = model(**batch).logits
    quantize(model, 4)
    assert isinstance(model.lm_head, QuantizedLinear)
    with torch.no_grad():
        out = model(**batch).logits
    assert float((out - ref).norm() / ref.norm()) < 0.5


def test_exclude_keeps_named_modules_in_float():
    pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = build("gpt2")
    twin = copy.deepcopy(model)
    quantize(model, 8, exclude=["h.0"])
    assert type(model.transformer.h[0].attn.c_attn) is type(twin.transformer.h[0].attn.c_attn)
    # GPT-2's Conv1D computes addmm with an (in, out) weight, which torchao does not implement
    assert isinstance(model.transformer.h[1].attn.c_attn, QuantizedLinear)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_rounded_weights_compute_exactly_what_quantize_builds(arch, bits):
    if bits == 8:
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
    # gpt2: a tied table and Conv1D weights stored (in, out); llama: low-rank and MPO cores;
    # falcon: dense FalconLinear (x @ weight.T), which int8 gives the library's layer.
    model = build(arch)
    compactify(model, chi=6, progress=False, exclude=["mlp"] if arch != "gpt2" else [])
    batch = inputs(arch)
    floats = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    quantize(twin, bits, exclude=["h.1.attn"])
    with torch.no_grad():
        expected = twin(**batch).logits
        with rounded_weights(model, bits, exclude=["h.1.attn"]):
            inside = model(**batch).logits
        after = model(**batch).logits
    # int8 through torchao multiplies by the integer codes, then scales: the same up to float
    # rounding; the hand-written layers dequantize first, bit for bit what the rounding gives.
    tolerance = dict(rtol=1e-5, atol=1e-6) if bits == 8 else dict(rtol=0, atol=0)
    torch.testing.assert_close(inside, expected, **tolerance)
    assert not torch.equal(after, inside)  # the float weights are back, bit for bit
    for k, v in model.state_dict().items():
        assert torch.equal(v, floats[k]), k
    planned = rounding_plan(model, bits, exclude=["h.1.attn"])
    assert len({id(p) for p, _ in planned}) == len(planned)  # a tied table is rounded once


def test_rounded_weights_restore_the_floats_when_the_block_raises():
    model = build("llama")
    floats = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="inside"):
        with rounded_weights(model, 4):
            raise RuntimeError("inside")
    assert all(torch.equal(v, floats[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("group", [None, 16, "tensor"])
def test_int8_table_lookup_converts_only_its_rows_and_equals_torchao(group, monkeypatch):
    quantization = pytest.importorskip("torchao.quantization")
    from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

    from tensornet_llm.saving import torchao_cpu

    torch.manual_seed(0)
    table = torch.nn.Embedding(300, 64)
    granularity = {None: PerRow(), 16: PerGroup(16), "tensor": PerTensor()}[group]
    quantization.quantize_(table, quantization.Int8WeightOnlyConfig(granularity=granularity),
                           filter_fn=lambda m, _: True)
    indices = torch.randint(0, 300, (3, 7))
    expected = table.weight.dequantize()[indices]  # torchao's arithmetic on the whole table
    torchao_cpu.register()
    if group != "tensor":  # one scale for every row: torchao's own whole-table lookup
        monkeypatch.setattr(type(table.weight), "dequantize", None)  # the whole table: unused
    with torch.no_grad():
        assert torch.equal(table(indices), expected)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(table, fullgraph=True)(indices), expected)


def _kernels_called(call, count: str | None = None):
    """The names of the operators ``call`` ran, or how often it ran ``count``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    names = [e.name for e in prof.events()]
    return set(names) if count is None else names.count(count)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, features", [((1, 1), (96, 40)), ((2, 5), (48, 7))])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned", "transposed"])
def test_int8_linear_in_half_precision_uses_the_fused_kernel_and_rounds_once(dtype, shape,
                                                                              features, layout):
    quantization = pytest.importorskip("torchao.quantization")
    from tensornet_llm.saving import torchao_cpu

    torch.manual_seed(0)
    linear = torch.nn.Linear(*features).to(dtype)
    quantization.quantize_(linear, quantization.Int8WeightOnlyConfig())
    torchao_cpu.register()
    x = torch.randn(*shape, features[0], dtype=dtype)
    if layout == "unaligned":  # 8 values (16 bytes) into a fresh, aligned buffer
        x = torch.cat([torch.zeros(8, dtype=dtype), x.flatten()])[8:].view(x.shape)
    elif layout == "transposed":  # rows x features, features not the fastest index
        x = x.reshape(-1, features[0]).T.contiguous().T
    weight = linear.weight.dequantize().double()  # torchao's own rounded weight, exactly
    exact = x.double() @ weight.T + linear.bias.double()
    with torch.no_grad():
        assert "aten::_weight_int8pack_mm" in _kernels_called(lambda: linear(x))
        out = linear(x)
    assert out.shape == (*x.shape[:-1], features[1]) and out.dtype == dtype
    # one product rounded to the dtype, then the bias added: two roundings of the output
    step = torch.finfo(dtype).eps * exact.abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 2 * step


@pytest.mark.parametrize("case", ["grad", "per group", "per tensor", "13 features",
                                  "unaligned weight", "compiled"])
def test_int8_linear_keeps_torchaos_code_where_the_fused_kernel_does_not_apply(case):
    quantization = pytest.importorskip("torchao.quantization")
    from torchao.quantization.granularity import PerGroup, PerTensor

    from tensornet_llm.saving import torchao_cpu

    torch.manual_seed(0)
    dtype = torch.bfloat16
    linear = torch.nn.Linear(13 if case == "13 features" else 64, 24).to(dtype)
    granularity = {"per group": PerGroup(16), "per tensor": PerTensor()}.get(case)
    config = quantization.Int8WeightOnlyConfig(
        **({"granularity": granularity} if granularity else {}))
    quantization.quantize_(linear, config)
    x = torch.randn(3, linear.in_features, dtype=dtype, requires_grad=case == "grad")
    if case == "unaligned weight":  # as a loaded checkpoint's view may sit
        values = linear.weight.qdata
        linear.weight.qdata = torch.cat([values.new_zeros(8), values.flatten()])[8:].view(
            values.shape)
    torchao_cpu.register()
    expected = torchao_cpu._torchao_linear(torch.nn.functional.linear, (), (x, linear.weight,
                                                                           linear.bias), {})
    if case == "compiled":
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(linear, fullgraph=True)(x)
        step = torch.finfo(dtype).eps * expected.abs().max().item()
        assert (out - expected).abs().max().item() <= 2 * step
        return
    assert "aten::_weight_int8pack_mm" not in _kernels_called(lambda: linear(x))
    out = linear(x)
    assert torch.equal(out, expected)
    if case == "grad":
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("blocks", [1, 5])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3)])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_int8_linear_in_float32_converts_its_weight_in_blocks_and_equals_torchao(
        blocks, shape, mode, monkeypatch):
    """In float32 a few rows are multiplied block by block from one reused buffer, never with a
    float copy of the whole weight; one block is torchao's own product bit for bit, several are
    the same sums (to float32 rounding). A prompt's rows keep torchao's code."""
    quantization = pytest.importorskip("torchao.quantization")
    from tensornet_llm.saving import torchao_cpu

    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 23)  # 23 rows of 40: 5 blocks of 5 rows, the last of 3
    quantization.quantize_(linear, quantization.Int8WeightOnlyConfig())
    monkeypatch.setattr(torchao_cpu, "BLOCK_ELEMENTS", 40 * 23 if blocks == 1 else 40 * 5)
    torchao_cpu.register()
    x = torch.randn(*shape, 40).transpose(0, 1)  # features not the fastest index of the rows

    def torchaos(inputs):
        return torchao_cpu._torchao_linear(torch.nn.functional.linear, (),
                                           (inputs, linear.weight, linear.bias), {})

    expected = torchaos(x)
    with getattr(torch, mode)():
        assert "aten::_to_copy" not in _kernels_called(lambda: linear(x))  # no float weight
        out = linear(x)
    with torch.no_grad():  # the buffer a call in inference mode made stays writable
        again = linear(x)
    assert out.shape == expected.shape and out.dtype == torch.float32
    if blocks == 1:
        assert torch.equal(out, expected) and torch.equal(again, expected)
    else:
        step = 4 * torch.finfo(torch.float32).eps * expected.abs().max().item()
        assert (out - expected).abs().max().item() <= step and torch.equal(again, out)
    prompt = torch.randn(torchao_cpu.FUSED_ROWS + 1, 40)
    with torch.no_grad():
        assert "aten::_to_copy" in _kernels_called(lambda: linear(prompt))
        assert torch.equal(linear(prompt), torchaos(prompt))


def test_int8_pads_ranks_and_mlp_widths_to_the_fused_kernels_blocks_and_computes_the_same():
    """A rank-5 low-rank layer and a gated MLP slimmed to width 40 become rank 16 and width 48
    with zeros: the model computes what the unpadded weights rounded alike compute."""
    pytest.importorskip("torchao")
    from tensornet_llm.compress.slim import slim_layers
    from tensornet_llm.layers.low_rank import LowRankLinear

    torch.manual_seed(0)
    model = build("llama")
    mlp = model.model.layers[0].mlp
    keep = torch.randperm(48)[:40].sort().values
    layers = slim_layers(mlp.gate_proj, mlp.up_proj, mlp.down_proj, keep,
                         mlp.down_proj.weight[:, keep])
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = layers
    attention = model.model.layers[1].self_attn
    w = attention.q_proj.weight
    u, s, vh = torch.linalg.svd(w.detach())
    attention.q_proj = LowRankLinear.from_factors(u[:, :5] * s[:5], vh[:5], attention.q_proj.bias)
    batch = inputs("llama")
    with torch.no_grad(), rounded_weights(model, 8):
        expected = model(**batch).logits
    report = quantize(model, 8)
    assert model.model.layers[1].self_attn.q_proj.rank == 16
    assert mlp.down_proj.in_features == mlp.gate_proj.out_features == 48
    assert all(m.in_features % 16 == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert {"low-rank", "linear"} <= {kind for _, kind, _, _ in report.rows}


def test_int8_pads_a_plain_slim_mlp_too():
    """GPT-2's MLP (``Conv1D`` projections, ``down(gelu(up(x)))``) slimmed to width 40: padded to
    48 with zeros (``up``'s bias too), computing what the unpadded weights rounded alike do."""
    pytest.importorskip("torchao")
    from tensornet_llm.compress.slim import slim_layers
    from tensornet_llm.layers.base import linear_weight

    torch.manual_seed(0)
    model = build("gpt2")
    mlp = model.transformer.h[0].mlp
    keep = torch.randperm(128)[:40].sort().values
    mlp.c_fc, mlp.c_proj = slim_layers(None, mlp.c_fc, mlp.c_proj, keep,
                                       linear_weight(mlp.c_proj)[0][:, keep])
    batch = inputs("gpt2")
    with torch.no_grad(), rounded_weights(model, 8):
        expected = model(**batch).logits
    quantize(model, 8)
    assert mlp.c_fc.out_features == mlp.c_proj.in_features == 48
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_int8_leaves_an_mlp_of_the_architectures_own_width_as_it_is():
    """Padding is for the widths compression chose: a dense model whose MLP width is not a
    multiple of 16 keeps it, and so stays an ordinary checkpoint (nothing resized)."""
    pytest.importorskip("torchao")
    import transformers as tf

    from models import LLAMA_LIKE
    from tensornet_llm.saving.structure import describe

    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**LLAMA_LIKE, "intermediate_size": 40})).eval()
    quantize(model, 8)
    assert model.model.layers[0].mlp.down_proj.in_features == 40
    assert "resized" not in describe(model)


@pytest.mark.parametrize("source", ["quantized", "load_compactified", "from_pretrained"])
def test_an_int8_model_in_bfloat16_decodes_every_linear_through_the_fused_kernel(source,
                                                                                 tmp_path):
    """Also after loading: a checkpoint leaves int8 values at unaligned addresses, which the
    loaders copy into aligned memory (else the kernel would not apply)."""
    pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    model = build("llama")
    compactify(model, ratio=0.5, progress=False)
    model = model.to(torch.bfloat16)
    quantize(model, 8)
    if source == "load_compactified":
        save_compactified(model, tmp_path / "m")
        model = load_compactified(tmp_path / "m")
    elif source == "from_pretrained":
        model.save_pretrained(tmp_path / "m")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_torchao_tensor(m.weight) for m in linears)
    ids = inputs("llama")["input_ids"][:1]
    with torch.no_grad():
        past = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        fused = _kernels_called(lambda: model(input_ids=ids[:, -1:], past_key_values=past,
                                               use_cache=True), count="aten::_weight_int8pack_mm")
    assert fused == len(linears)


@pytest.mark.parametrize("arch, bits, refused", [
    ("falcon", 8, None),  # FalconLinear (x @ weight.T): torchao cannot run it, the library's layer can
    ("falcon", 4, None),
    ("gemma2", 8, None),  # the scaled embedding keeps its scale under torchao's int8
    ("gemma2", 4, "model.embed_tokens"),  # a plain int4 lookup would drop it
    ("opt", 4, "model.decoder.embed_positions"),  # reads an attention mask, not token ids
])
def test_a_module_with_a_forward_of_its_own_is_kept_or_refused(arch, bits, refused):
    if bits == 8:
        pytest.importorskip("torchao")
    model = build(arch)
    batch = inputs(arch)
    with torch.no_grad():
        ref = model(**batch).logits
    if refused:
        snap = snapshot(model)
        with pytest.raises(ArgumentError, match=rf"{refused} .*exclude=\['{refused}'\]"):
            quantize(model, bits)
        assert_unchanged(model, snap)
        quantize(model, bits, exclude=[refused])  # the way out the error names
    else:
        quantize(model, bits)
    with torch.no_grad():
        out = model(**batch).logits
    assert float((out - ref).norm() / ref.norm()) < (0.03 if bits == 8 else 0.5)
    if arch == "falcon":  # quantized one way or the other, not left in float
        block = model.transformer.h[0].self_attention.dense
        assert isinstance(block, QuantizedLinear) or is_torchao_tensor(block.weight)
    if arch == "gemma2" and bits == 8:
        assert type(model.model.embed_tokens).__name__ == "Gemma2TextScaledWordEmbedding"
