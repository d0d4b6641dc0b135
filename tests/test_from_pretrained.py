"""Plain transformers loading of a compressed folder: ``AutoModelForCausalLM.from_pretrained``
after ``import tensornet_llm`` rebuilds the compressed model (logits equal to
``load_compactified``'s, exactly); ``model.save_pretrained`` writes such a folder; without the
import, loading stops with an error instead of initialising layers at random."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import ARCHS, build, calibration, inputs
from tensornet_llm import (
    CompactifyConfig, compactify, load_compactified, quantize, save_compactified,
)
from tensornet_llm.errors import CheckpointError

KINDS = {
    "kept rows": dict(ratio=0.6, method="low-rank"),
    "low-rank": dict(ratio=0.6, method="low-rank", config=CompactifyConfig(interpolative=False)),
    "mpo": dict(chi=4, method="mpo", n_sites=3),
    "ttns": dict(chi=4, method="ttns", n_sites=4),
    "int8": dict(ratio=0.6, method="low-rank"),  # torchao's Int8Tensor in every nn.Linear
    "int4": dict(chi=4, method="mpo", n_sites=3),  # the library's own quantized layers
    "slim": dict(ratio=0.5, targets=["mlp"], calibration=calibration()),  # smaller nn.Linear
    # smaller nn.Linear with torchao's weights, written as their parts: the markers sit at
    # the keys those weights leave free
    "slim int8": dict(ratio=0.5, targets=["mlp"], calibration=calibration()),
}
BITS = {"int8": 8, "int4": 4, "slim int8": 8}


def compressed(kind):
    model = build("llama")
    compactify(model, progress=False, **KINDS[kind])
    if BITS.get(kind) == 8:
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
    if kind in BITS:
        quantize(model, BITS[kind])
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("save", ["save_compactified", "save_pretrained"])
def test_from_pretrained_rebuilds_the_compressed_model(kind, save, tmp_path):
    model = compressed(kind)
    batch = inputs("llama")
    expected = logits(model, batch)
    folder = tmp_path / "m"
    if save == "save_compactified":
        save_compactified(model, folder)
    else:
        model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "tensornet"
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    if save == "save_compactified":  # the library's own loader agrees
        torch.testing.assert_close(logits(load_compactified(folder), batch), expected, rtol=0,
                                   atol=0)
    loaded.save_pretrained(tmp_path / "again")  # and it saves again
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(logits(again, batch), expected, rtol=0, atol=0)


def test_dtype_device_map_and_shards(tmp_path):
    model = compressed("kept rows")
    batch = inputs("llama")
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="auto")
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.kept.weight.dtype == torch.bfloat16
    assert half.model.layers[0].self_attn.q_proj.order.dtype == torch.long
    torch.testing.assert_close(logits(half, batch).float(), expected, rtol=0, atol=0.1)
    half.float()  # an ordinary float model, not a "quantized" one transformers would refuse


@pytest.mark.parametrize("kind", ["kept rows", "int8"])
def test_both_loaders_give_the_dtype_asked_for_alike(kind, tmp_path):
    if kind == "int8":
        pytest.importorskip("torchao")
    model = compressed(kind)
    save_compactified(model, tmp_path / "m")  # which both loaders read
    batch = inputs("llama")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    same = load_compactified(tmp_path / "m", dtype=torch.bfloat16)
    for loaded in (half, same):  # torchao's tensors too; buffers as transformers keeps them
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
        assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    out = logits(half, batch)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(logits(same, batch), out, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), logits(model, batch), rtol=0, atol=0.1)


def test_a_streamed_folder_loads_with_from_pretrained(tmp_path):
    from tensornet_llm import compactify_pretrained

    build("llama").save_pretrained(tmp_path / "source")
    compactify_pretrained(tmp_path / "source", tmp_path / "out", chi=6, method="low-rank",
                          progress=False)
    batch = inputs("llama")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), batch),
                               logits(load_compactified(tmp_path / "out"), batch), rtol=0, atol=0)


def plain_transformers(code: str, *args) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python without this library imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["kept rows", "int8", "slim", "slim int8"])
def test_without_the_import_loading_fails_instead_of_initialising_at_random(kind, tmp_path):
    model = compressed(kind)
    save_compactified(model, tmp_path / "m") if kind != "slim int8" else \
        model.save_pretrained(tmp_path / "m")
    run = plain_transformers("import sys\nfrom transformers import AutoModelForCausalLM\n"
                             "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n", tmp_path / "m")
    assert run.returncode != 0
    assert "size mismatch" in run.stderr or "ignore_mismatched_sizes" in run.stderr
    assert "tensornet" in run.stderr  # transformers names the unknown quantization method


@pytest.mark.parametrize("save", ["save_compactified", "save_pretrained"])
def test_a_dense_model_in_int8_is_a_plain_torchao_checkpoint(save, tmp_path):
    """Nothing compressed, every linear and the tied table int8 through torchao: the folder is
    torchao's own, which transformers loads without this library (same logits, still tied)."""
    pytest.importorskip("torchao")
    config_fn, cls = ARCHS["llama"]
    config = config_fn()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = cls(config).eval()
    quantize(model, 8)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = inputs("llama")
    torch.save((batch, logits(model, batch)), tmp_path / "expected.pt")
    save_compactified(model, tmp_path / "m") if save == "save_compactified" \
        else model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    run = plain_transformers(
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "batch, expected = torch.load(sys.argv[2])\n"
        "assert type(m.lm_head.weight).__name__ == 'Int8Tensor'\n"
        "assert m.lm_head.weight is m.model.embed_tokens.weight\n"
        "torch.testing.assert_close(m(**batch).logits.detach(), expected, rtol=0, atol=0)\n",
        tmp_path / "m", tmp_path / "expected.pt")
    assert run.returncode == 0, run.stderr[-2000:]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # and with the import
    if save == "save_compactified":
        again = load_compactified(tmp_path / "m")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    torch.testing.assert_close(logits(again, batch), logits(model, batch), rtol=0, atol=0)


def test_cross_layer_folders_point_to_load_compactified(tmp_path):
    model = build("llama")
    compactify(model, ratio=0.7, cross_layer=2, progress=False)
    with pytest.raises(CheckpointError, match="load_compactified"):
        model.save_pretrained(tmp_path / "m")
    save_compactified(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="load_compactified"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


@pytest.mark.parametrize("arch, keep", [("gpt2", 0.8), ("falcon", 0.8), ("gemma2", 0.8),
                                        ("gemma2", None)])
def test_int8_models_of_other_architectures_load_with_the_same_logits(arch, keep, tmp_path):
    """GPT-2: kept-rows layers rounded as a plain ``nn.Linear`` where the architecture has a
    ``Conv1D`` (weight ``(in, out)``); Falcon: its ``FalconLinear`` (``x @ weight.T``, which
    torchao's tensor cannot run) in the library's int8 layer; Gemma: the scaled embedding's
    ``embed_scale``, a buffer no checkpoint holds, which transformers' torchao loader leaves
    uninitialised (dense or compressed alike). Loading without the import fails."""
    pytest.importorskip("torchao")
    model = build(arch, layers=3)
    if keep is not None:
        compactify(model, ratio=keep, calibration=calibration(), progress=False)
    quantize(model, 8)
    batch = inputs(arch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    if arch == "gemma2" and keep is None:  # the one folder with nothing compressed
        save_compactified(model, tmp_path / "c")  # the library's folder both loaders read
        for load in (load_compactified, AutoModelForCausalLM.from_pretrained):
            torch.testing.assert_close(logits(load(tmp_path / "c"), batch), expected, rtol=0, atol=0)
        run = plain_transformers("import sys\nfrom transformers import AutoModelForCausalLM\n"
                                 "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n",
                                 tmp_path / "m")
        assert run.returncode != 0 and "ignore_mismatched_sizes" in run.stderr


@pytest.mark.parametrize("save", ["save_compactified", "save_pretrained"])
def test_a_tied_table_in_int4_is_saved_once_and_loads_shared(save, tmp_path):
    """The library's int4 table that GPT-2's embedding and LM head share: written once (under
    the embedding's name), shared again by ``from_pretrained``, not tied by transformers (the
    head's ``weight`` is the dequantized one, not a parameter)."""
    model = build("gpt2", layers=2)
    compactify(model, chi=4, progress=False)
    quantize(model, 4)
    assert model.lm_head.qweight is model.transformer.wte.qweight
    batch = inputs("gpt2")
    expected = logits(model, batch)
    save_compactified(model, tmp_path / "m") if save == "save_compactified" \
        else model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.lm_head.qweight is loaded.transformer.wte.qweight
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(logits(again, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["t5", "gemma2"])
def test_a_loaded_model_computes_bit_for_bit_wherever_the_file_put_its_tensors(arch, tmp_path):
    """T5 with kept rows and slim MLPs, Gemma 2 with an MPO layer: tensors read from a
    safetensors file sit at the file's offsets, where MKL rounds some shapes differently (the
    logits were 7.7e-7 and 3e-8 off); both loaders give them fresh, aligned memory."""
    from tensornet_llm.saving.tensors import ALIGNMENT

    model = build(arch, layers=3 if arch == "t5" else None)
    compactify(model, ratio=0.5, calibration=calibration(), progress=False)
    batch = inputs(arch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "m")
    save_compactified(model, tmp_path / "c")
    for loaded in (type(model).from_pretrained(tmp_path / "m"), load_compactified(tmp_path / "c")):
        assert all(t.data_ptr() % ALIGNMENT == 0 for t in [*loaded.parameters(), *loaded.buffers()]
                   if t.numel())
        torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
