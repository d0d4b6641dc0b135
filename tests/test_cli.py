"""The command line: compress and eval, errors as one line with a non-zero exit."""

import json

import pytest

from models import build
from tensornet_llm import TensorNetworkLinear, load_compactified
from tensornet_llm.cli import main


@pytest.fixture
def tiny_dir(tmp_path):
    model = build("llama")
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    return path


def test_compress_writes_a_loadable_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dir), "--chi", "3", "--method", "ttns", "--exclude",
                 "layers.0.", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "saved to" in printed
    model = load_compactified(out)
    names = [n for n, m in model.named_modules() if isinstance(m, TensorNetworkLinear)]
    assert names and all(n.startswith("model.layers.1.") for n in names)
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["modules"] == len(names)
    structure = json.loads((out / "tensornet.json").read_text())
    assert structure["compactify"]["chi"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "no/such/dir", "--chi", "4", "--out", "x"], "MODEL"),
        (["compress", "{tiny}", "--chi", "4", "--n-sites", "0", "--out", "{out}"], "n_sites"),
        (["compress", "{tiny}", "--chi", "4", "--exclude", "re:(", "--out", "{out}"], "regex"),
    ],
)
def test_errors_are_one_line_and_write_nothing(tiny_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    argv = [a.format(tiny=tiny_dir, out=out) for a in argv] + ["--quiet"]
    assert main(argv) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("tensornet-llm: error:") and message in errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_bad_chi_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "smollm2", "--chi", "0", "--out", "x"])
    assert exc.value.code == 2 and "--chi" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["compress", str(tiny_dir), "--chi", "3", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_smollm2_json(capsys):
    assert main(["eval", "smollm2", "--text", "austen_persuasion.txt", "--tokens", "512",
                 "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 512 and 5 < result["perplexity"] < 200
    assert result["parameters"] == 134_515_008
