"""Streaming compression: block by block from a checkpoint, the same model as in memory."""

import json
from pathlib import Path

import pytest
import torch

from models import build, inputs
from tensornet_llm import CompactifyConfig, compactify, compactify_pretrained, load_compactified
from tensornet_llm.compress import stream as streaming
from tensornet_llm.errors import (
    ArgumentError, CheckpointError, InputFileError, OutputExistsError,
)

IDS = torch.randint(2, 96, (2, 16), generator=torch.Generator().manual_seed(1))
CALIBRATION = [torch.randint(2, 96, (1, 24), generator=torch.Generator().manual_seed(i))
               for i in range(3)]
SETTINGS = {
    "chi": dict(chi=4),
    "chi, calibrated": dict(chi=4, calibration=CALIBRATION, fit_steps=5),
    "ratio": dict(ratio=0.6),
    "ratio, calibrated": dict(ratio=0.6, calibration=CALIBRATION, fit_steps=5),
    "low-rank, ratio, calibrated": dict(ratio=0.5, method="low-rank", calibration=CALIBRATION),
}


def checkpoint(tmp_path: Path, arch: str = "llama", dtype=torch.float32) -> tuple[Path, object]:
    # t5: two stacks of two blocks, where block 1 still reads block 0's position bias
    model = build(arch, layers=2 if arch == "t5" else 3)
    source = tmp_path / f"{arch}-source"
    model.to(dtype).save_pretrained(source, max_shard_size="20KB")  # several shards
    return source, model


def in_memory(source: Path, options: dict):
    from transformers import AutoConfig
    import transformers

    cls = getattr(transformers, AutoConfig.from_pretrained(source).architectures[0])
    model = cls.from_pretrained(source, dtype=torch.float32).eval()
    # what streaming does: no loss gradients, no slim MLPs or attention (the budget prices
    # modules alone)
    config = CompactifyConfig(gradients=False, slim_mlp=False, slim_attention=False) \
        if "ratio" in options else None
    report = compactify(model, config=config, progress=False, **options)
    return model, report


CASES = [("llama", setting) for setting in SETTINGS] + [
    # gpt2: tied embeddings, Conv1D; t5: two stacks, and later blocks read block 0's outputs
    (arch, setting) for arch in ("gpt2", "t5") for setting in ("chi", "ratio, calibrated")]


@pytest.mark.parametrize("arch, setting", CASES)
def test_streamed_equals_in_memory(tmp_path, arch, setting):
    source, _ = checkpoint(tmp_path, arch)
    options = SETTINGS[setting]
    report = compactify_pretrained(source, tmp_path / "out", progress=False, **options)
    reference, expected = in_memory(source, options)
    streamed = load_compactified(tmp_path / "out")
    assert [r.name for r in report.layers] == [r.name for r in expected.layers]
    assert [(r.chi, r.method) for r in report.layers] == [(r.chi, r.method) for r in expected.layers]
    assert report.model_params_after == expected.model_params_after
    batch = inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(streamed(**batch).logits, reference(**batch).logits, rtol=0,
                                   atol=1e-5)
    shards = {p.name for p in (tmp_path / "out").glob("*.safetensors")}
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == shards and len(shards) > 3  # one per block


def test_half_precision_checkpoints_are_read_and_cast(tmp_path):
    source, _ = checkpoint(tmp_path, dtype=torch.bfloat16)
    compactify_pretrained(source, tmp_path / "out", chi=4, progress=False)
    reference, _ = in_memory(source, dict(chi=4))
    streamed = load_compactified(tmp_path / "out")
    assert {p.dtype for p in streamed.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(streamed(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-5)


def test_at_most_two_blocks_are_in_memory(tmp_path, monkeypatch):
    source, _ = checkpoint(tmp_path)
    seen = []
    load = streaming._Stream.load

    def counting(self, prefix):
        load(self, prefix)
        layers = self.model.model.layers
        seen.append(sum(not next(b.parameters()).is_meta for b in layers))

    monkeypatch.setattr(streaming._Stream, "load", counting)
    compactify_pretrained(source, tmp_path / "a", chi=4, progress=False)
    assert max(seen) == 1  # without calibration: one block at a time
    seen.clear()
    compactify_pretrained(source, tmp_path / "b", ratio=0.6, calibration=CALIBRATION,
                          progress=False)
    assert max(seen) == 2  # the block being fitted and the one before, until replayed


def test_the_output_directory_is_checked_before_any_work(tmp_path, monkeypatch):
    source, _ = checkpoint(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    monkeypatch.setattr(streaming, "_open", lambda *a: pytest.fail("work started"))
    with pytest.raises(OutputExistsError, match="taken"):
        compactify_pretrained(source, tmp_path / "taken", chi=4, progress=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("options, message", [
    (dict(chi=4, match_dense=True), "match_dense"),
    (dict(chi=4, bogus=1), "bogus"),
    (dict(chi=4, dtype=torch.int8), "dtype"),
    (dict(chi=4, ratio=0.5), "exclusive"),
])
def test_bad_options_are_refused(tmp_path, options, message):
    source, _ = checkpoint(tmp_path)
    with pytest.raises(ArgumentError, match=message):
        compactify_pretrained(source, tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_broken_sources_name_the_file(tmp_path):
    with pytest.raises(InputFileError, match="nowhere"):
        compactify_pretrained(tmp_path / "nowhere", tmp_path / "out", chi=4)
    source, _ = checkpoint(tmp_path)
    shard = sorted(source.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name):
        compactify_pretrained(source, tmp_path / "out", chi=4, progress=False)
    index = source / "model.safetensors.index.json"
    index.write_text("{")
    with pytest.raises(CheckpointError, match="index"):
        compactify_pretrained(source, tmp_path / "out", chi=4, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_tensors_is_refused(tmp_path):
    source, _ = checkpoint(tmp_path)
    index = source / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].pop("model.layers.1.mlp.up_proj.weight")
    index.write_text(json.dumps(data))
    shard_keys = streaming.CheckpointReader(source).files
    if "model.layers.1.mlp.up_proj.weight" in shard_keys:  # still in its shard: rewrite it away
        from safetensors.torch import load_file, save_file

        path = shard_keys["model.layers.1.mlp.up_proj.weight"]
        tensors = load_file(path)
        tensors.pop("model.layers.1.mlp.up_proj.weight")
        save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj"):
        compactify_pretrained(source, tmp_path / "out", chi=4, progress=False)


def test_the_cli_streams_a_directory_with_its_tokenizer(tmp_path, capsys):
    from models import char_tokenizer
    from tensornet_llm.cli import main

    source, _ = checkpoint(tmp_path)
    char_tokenizer().save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 40)
    out = tmp_path / "out"
    assert main(["compress", str(source), "--ratio", "0.6", "--stream", "--calibration",
                 str(text), "--calibration-tokens", "1024", "--fit-steps", "3", "--out",
                 str(out), "--quiet"]) == 0
    assert "saved to" in capsys.readouterr().out
    saved = json.loads((out / "tensornet.json").read_text())
    assert saved["compactify"]["stream"] is True and saved["compactify"]["ratio"] == 0.6
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["target_kept_fraction"] <= 0.6
    assert (out / "tokenizer_config.json").is_file()
    from tensornet_llm.cli import load_any

    model, tokenizer = load_any(str(out))
    assert tokenizer is not None
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_the_cli_refuses_to_stream_what_is_not_a_directory(tmp_path, capsys):
    from tensornet_llm.cli import main

    assert main(["compress", "smollm2", "--chi", "4", "--stream", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--stream" in err and err.count("\n") == 1


def test_an_interrupt_leaves_no_output_and_no_temporary_files(tmp_path, monkeypatch):
    source, _ = checkpoint(tmp_path)
    calls = []
    build_one = streaming.build_layer

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in the second block, after the first was written
            raise KeyboardInterrupt
        return build_one(*args, **kwargs)

    monkeypatch.setattr(streaming, "build_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compactify_pretrained(source, tmp_path / "out", chi=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-source"]


def test_a_truncated_output_shard_is_named_on_loading(tmp_path):
    source, _ = checkpoint(tmp_path)
    compactify_pretrained(source, tmp_path / "out", chi=4, progress=False)
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match=shard.name):
        load_compactified(tmp_path / "out")
    (tmp_path / "out" / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_compactified(tmp_path / "out")


def test_streamed_budget_prices_calls(tmp_path):
    """call_cost reaches the streamed budget: at the same ratio every low-rank layer then saves
    more parameters than a call costs (without it, some save fewer)."""
    source, _ = checkpoint(tmp_path)
    saved = {}
    for cost in (0, 300):
        report = compactify_pretrained(source, tmp_path / f"out{cost}", ratio=0.6, fit_steps=0,
                                       calibration=CALIBRATION, call_cost=cost, progress=False)
        assert report.kept_fraction <= 0.6
        saved[cost] = [r.params_before - r.params_after for r in report.layers]
    assert any(s <= 300 for s in saved[0])
    assert saved[300] and all(s > 300 for s in saved[300])
