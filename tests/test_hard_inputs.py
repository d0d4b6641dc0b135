"""Hard inputs: broken checkpoints give one line naming the file, in the API and the CLI, and the
package installs from a wheel with its texts."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from models import build, char_tokenizer
from tensornet_llm import compactify, load_compactified, save_compactified
from tensornet_llm.cli import main
from tensornet_llm.errors import CheckpointError, InputFileError, TensornetError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build("llama")
    compactify(model, chi=3, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "model"
    save_compactified(model, out, tokenizer=char_tokenizer())
    return out


def copy_of(saved: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def test_truncated_weights_are_one_line_naming_the_file(saved, tmp_path, capsys):
    path = copy_of(saved, tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_compactified(path)
    assert main(["eval", str(path), "--text", "austen_persuasion.txt", "--tokens", "64",
                 "--window", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err


def test_broken_structure_file_names_the_file(saved, tmp_path, capsys):
    path = copy_of(saved, tmp_path)
    (path / "tensornet.json").write_text('{"format_version": 1,\n')
    assert main(["eval", str(path), "--tokens", "64", "--window", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tensornet.json" in err and "not valid JSON" in err and err.count("\n") == 1


def test_a_directory_without_a_structure_file(tmp_path):
    with pytest.raises(InputFileError, match="no tensornet.json"):
        load_compactified(tmp_path)


def _mutations():
    """Edits of tensornet.json: drop a key, or set one (anywhere in the tree) to another value."""
    values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10_000), st.text(max_size=8),
                       st.lists(st.integers(0, 9), max_size=4), st.dictionaries(
                           st.text(max_size=5), st.integers(), max_size=2))
    return st.tuples(st.integers(0, 10_000), st.sampled_from(["drop", "set"]), values)


def _mutate(node, choice: int, action: str, value):
    """Apply one edit at the ``choice``-th place of the JSON tree (depth first)."""
    places = []

    def walk(n):
        if isinstance(n, dict):
            for k in list(n):
                places.append((n, k))
                walk(n[k])
        elif isinstance(n, list):
            for i in range(len(n)):
                places.append((n, i))
                walk(n[i])

    walk(node)
    container, key = places[choice % len(places)]
    if action == "drop" and isinstance(container, dict):
        del container[key]
    else:
        container[key] = value


@given(edits=st.lists(_mutations(), min_size=1, max_size=3))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_mutated_structure_file_raises_only_documented_errors(saved, tmp_path, edits):
    path = tmp_path / "mutated"
    if not path.exists():
        path = copy_of(saved, tmp_path)
        path.rename(tmp_path / "mutated")
        path = tmp_path / "mutated"
    original = json.loads((saved / "tensornet.json").read_text())
    structure = json.loads(json.dumps(original))
    for choice, action, value in edits:
        _mutate(structure, choice, action, value)
    (path / "tensornet.json").write_text(json.dumps(structure))
    try:
        load_compactified(path)
    except TensornetError as exc:
        assert "\n" not in str(exc)


@pytest.mark.slow
def test_the_wheel_installs_with_its_texts_and_runs_from_elsewhere(tmp_path):
    """A non-editable install: the wheel holds the bundled texts, and the CLI compresses the
    bundled model from another directory."""
    import importlib.util

    dist = tmp_path / "dist"
    # Without build isolation where setuptools is at hand (no download); pip fetches it otherwise.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                    "-q", "-w", str(dist), str(ROOT)], check=True, capture_output=True)
    wheel = next(dist.glob("tensornet_llm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "tensornet_llm/helpers/texts/austen_persuasion.txt" in names
    assert "tensornet_llm/helpers/texts/python_code.txt" in names
    # The licence as an SPDX expression (a TOML table is deprecated, an error from 2027-02-18).
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = ("import tensornet_llm, sys; from tensornet_llm.helpers.data import domain_text; "
            "assert tensornet_llm.__file__.startswith(sys.argv[1]), tensornet_llm.__file__; "
            "assert len(domain_text('code', 'held_out')[0]) > 1000")
    subprocess.run([sys.executable, "-c", code, str(site)], check=True, cwd=elsewhere, env=env)
    result = subprocess.run(
        [sys.executable, "-m", "tensornet_llm.cli", "compress", "smollm2", "--chi", "16",
         "--no-calibration", "--quiet", "--out", "out"],
        cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (elsewhere / "out" / "tensornet.json").is_file()


def test_nan_activations_in_calibration_name_the_module_and_leave_the_model(tmp_path):
    import torch

    from tensornet_llm.errors import NonFiniteActivationError

    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # an overflowing block: every activation after it is NaN
        model.model.layers[1].input_layernorm.weight.fill_(float("nan"))
    before["model.layers.1.input_layernorm.weight"].fill_(float("nan"))
    calibration = [torch.randint(2, 90, (1, 16))]
    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        compactify(model, chi=3, calibration=calibration, progress=False)
    with pytest.raises(NonFiniteActivationError, match="NaN or Inf"):
        compactify(model, ratio=0.5, calibration=calibration, progress=False)
    from tensornet_llm import TensorNetworkLinear

    # Block 0 was replaced before block 1's calibration failed: the swap was undone.
    assert not any(isinstance(m, TensorNetworkLinear) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())


@pytest.mark.parametrize("data, message", [
    ([], "is empty"),
    ([__import__("torch").zeros(1, 0, dtype=__import__("torch").long)], "item 0 has 0 tokens"),
    (["some text"], "token-id tensors"),
])
def test_empty_or_bad_calibration_is_refused_before_any_work(data, message):
    model = build("llama")
    with pytest.raises(TensornetError, match=message):
        compactify(model, chi=3, calibration=data, progress=False)


def test_healing_needs_two_tokens_per_sequence():
    import torch

    from tensornet_llm import heal

    model = build("llama")
    with pytest.raises(TensornetError, match="batches: item 1 has 1 tokens"):
        heal(model, [torch.randint(2, 90, (1, 8)), torch.randint(2, 90, (2, 1))], steps=1,
             progress=False)


@pytest.mark.parametrize("option", ["--calibration-tokens", "--fit-steps"])
def test_cli_refuses_counts_out_of_range_before_work(option, tmp_path, capsys):
    value = "-1" if option == "--fit-steps" else "0"
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "smollm2", "--chi", "4", option, value, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and option in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit", [
    lambda c: "{not json",
    lambda c: json.dumps({**json.loads(c), "hidden_size": 48}),       # shapes no longer match
    lambda c: json.dumps({**json.loads(c), "num_hidden_layers": 1}),  # tensors left over
    lambda c: json.dumps({k: v for k, v in json.loads(c).items() if k != "model_type"}),
])
def test_a_broken_or_mismatched_config_is_one_line_naming_a_file(saved, tmp_path, edit, capsys):
    path = copy_of(saved, tmp_path)
    config = path / "config.json"
    config.write_text(edit(config.read_text()))
    with pytest.raises(TensornetError, match=r"config\.json|tensornet\.json|model\.safetensors"):
        load_compactified(path)
    assert main(["eval", str(path), "--tokens", "64", "--window", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1


def test_token_ids_beyond_the_vocabulary_are_refused_before_any_work(tmp_path):
    import torch

    from tensornet_llm import compactify_pretrained, heal, profile_sensitivity

    model = build("llama")  # 96 rows
    foreign = [torch.tensor([[5, 7, 96, 3]])]
    for call in (lambda: compactify(model, chi=3, calibration=foreign, progress=False),
                 lambda: heal(model, foreign, steps=1, progress=False),
                 lambda: profile_sensitivity(model, foreign, cache_dir=False, progress=False)):
        with pytest.raises(TensornetError, match="item 0 holds token ids in \\[3, 96\\].*96 rows"):
            call()
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(TensornetError, match="96 rows"):
        compactify_pretrained(tmp_path / "src", tmp_path / "out", chi=3, calibration=foreign)
    assert not (tmp_path / "out").exists()
