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

from models import build, inputs
from tensornet_llm import (
    CompactifyConfig, compactify, load_compactified, quantize, save_compactified,
)
from tensornet_llm.errors import CheckpointError

KINDS = {
    "kept rows": dict(ratio=0.6, method="low-rank"),
    "low-rank": dict(ratio=0.6, method="low-rank", config=CompactifyConfig(interpolative=False)),
    "mpo": dict(chi=4, method="mpo", n_sites=3),
    "ttns": dict(chi=4, method="ttns", n_sites=4),
    "quantized": dict(chi=4, method="mpo", n_sites=3),
}


def compressed(kind):
    model = build("llama")
    compactify(model, progress=False, **KINDS[kind])
    if kind == "quantized":
        quantize(model, 8)
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


def test_a_streamed_folder_loads_with_from_pretrained(tmp_path):
    from tensornet_llm import compactify_pretrained

    build("llama").save_pretrained(tmp_path / "source")
    compactify_pretrained(tmp_path / "source", tmp_path / "out", chi=6, method="low-rank",
                          progress=False)
    batch = inputs("llama")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), batch),
                               logits(load_compactified(tmp_path / "out"), batch), rtol=0, atol=0)


def test_without_the_import_loading_fails_instead_of_initialising_at_random(tmp_path):
    save_compactified(compressed("kept rows"), tmp_path / "m")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "size mismatch" in run.stderr or "ignore_mismatched_sizes" in run.stderr
    assert "tensornet" in run.stderr  # transformers names the unknown quantization method


def test_cross_layer_folders_point_to_load_compactified(tmp_path):
    model = build("llama")
    compactify(model, ratio=0.7, cross_layer=2, progress=False)
    with pytest.raises(CheckpointError, match="load_compactified"):
        model.save_pretrained(tmp_path / "m")
    save_compactified(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="load_compactified"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
