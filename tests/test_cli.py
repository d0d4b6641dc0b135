"""The command line: compress and eval, errors as one line with a non-zero exit."""

import json
from pathlib import Path

import pytest

from models import build, char_tokenizer
from tensornet_llm import HealConfig, TensorNetworkLinear, load_compactified
from tensornet_llm.cli import main


@pytest.fixture
def tiny_dir(tmp_path):
    model = build("llama")
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("It is a truth universally acknowledged, that a single man in possession of a "
                    "good fortune, must be in want of a wife. " * 40)
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


def test_compress_by_ratio_with_calibration(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dir), "--ratio", "0.5", "--calibration", str(text_file),
                 "--calibration-tokens", "1024", "--fit-steps", "3", "--out", str(out),
                 "--quiet"]) == 0
    assert "under ratio=0.5" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["target_kept_fraction"] <= 0.5
    assert json.loads((out / "tensornet.json").read_text())["compactify"]["ratio"] == 0.5
    assert json.loads((out / "tensornet.json").read_text())["compactify"]["low_rank"] is True


def test_compress_no_low_rank_keeps_the_method_layout(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["compress", str(tiny_dir), "--ratio", "0.5", "--no-low-rank", "--no-slim-mlp",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {row["method"] for row in report["layers"]} == {"mpo"}


def test_compress_no_weigh_outputs_is_recorded_and_fits_unweighted(tiny_dir, text_file, tmp_path):
    reports = {}
    for flag in ([], ["--no-weigh-outputs"]):
        out = tmp_path / ("plain" if flag else "weighted")
        assert main(["compress", str(tiny_dir), "--ratio", "0.5", "--calibration", str(text_file),
                     "--calibration-tokens", "512", "--fit-steps", "2", *flag, "--out", str(out),
                     "--quiet"]) == 0
        settings = json.loads((out / "tensornet.json").read_text())["compactify"]
        assert settings["weigh_outputs"] is (not flag)
        reports[bool(flag)] = json.loads((out / "report.json").read_text())
    notes = {k: " ".join(r.get("notes", [])) for k, r in reports.items()}
    assert "Gauss-Newton loss estimate" in notes[False]
    assert "Gauss-Newton loss estimate" not in notes[True]
    assert "K-FAC" not in notes[False]


def test_compress_output_metric_full_is_recorded(tiny_dir, text_file, tmp_path):
    out = tmp_path / "kfac"
    assert main(["compress", str(tiny_dir), "--ratio", "0.5", "--calibration", str(text_file),
                 "--calibration-tokens", "512", "--fit-steps", "2", "--output-metric", "full",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "tensornet.json").read_text())["compactify"]["output_metric"] == "full"
    assert "K-FAC" in " ".join(json.loads((out / "report.json").read_text()).get("notes", []))


def test_profile_writes_tables_and_plots(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "profile"
    assert main(["profile", str(tiny_dir), "--calibration", str(text_file), "--calibration-tokens",
                 "256", "--seq", "64", "--no-cache", "--out", str(out), "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"sensitivity.json", "sensitivity.txt", "entanglement.json", "summary.json",
            "sensitivity.png", "entanglement.png"} <= names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modules"] == 14 and -1 <= summary["spearman_entropy_vs_sensitivity"] <= 1
    assert "model.layers.1.mlp.up_proj" in capsys.readouterr().out


def test_heal_then_quantize_then_eval(tiny_dir, text_file, tmp_path, capsys):
    compressed, healed, quantized = tmp_path / "c", tmp_path / "h", tmp_path / "q"
    assert main(["compress", str(tiny_dir), "--chi", "4", "--method", "low-rank", "--out",
                 str(compressed), "--quiet"]) == 0
    second = tmp_path / "second.txt"
    second.write_text("Emma Woodhouse, handsome, clever, and rich. " * 40)
    assert main(["heal", str(compressed), "--text", str(text_file), str(second), "--steps", "8",
                 "--lr", "3e-3", "--batch", "2", "--seq", "32", "--teacher", str(tiny_dir),
                 "--quantize-aware", "4", "--out", str(healed), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "low-rank layers stored as two factors" in printed  # what int4 rounds
    assert f"now run 'tensornet-llm quantize {healed} --bits 4" in printed
    history = json.loads((healed / "healing.json").read_text())
    assert len(history["losses"]) == 8 and history["losses"][-1] < history["losses"][0]
    record = json.loads((healed / "tensornet.json").read_text())["healing"]
    assert record["text"] == [str(text_file), str(second)] and record["quantize_aware"] == 4
    assert record["train"] == "all"  # quantization-aware: the embedding table learns its rounding
    assert record["lr"] == history["lr"] == 3e-3
    assert main(["quantize", str(healed), "--bits", "4", "--out", str(quantized)]) == 0
    capsys.readouterr()
    assert main(["eval", str(quantized), "--text", str(text_file), "--tokens", "1024",
                 "--window", "64", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] < 96  # better than uniform over the vocabulary


def test_heal_needs_a_compressed_model(tiny_dir, text_file, tmp_path, capsys):
    assert main(["heal", str(tiny_dir), "--text", str(text_file), "--steps", "1", "--out",
                 str(tmp_path / "h"), "--quiet"]) == 2
    assert "written by 'compress'" in capsys.readouterr().err


def test_heal_trains_the_blocks_by_default_and_refuses_contradicting_flags(
        tiny_dir, text_file, tmp_path, capsys):
    compressed = tmp_path / "c"
    assert main(["compress", str(tiny_dir), "--chi", "4", "--out", str(compressed), "--quiet"]) == 0
    assert main(["heal", str(compressed), "--text", str(text_file), "--steps", "1", "--train",
                 "all", "--cores-only", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--cores-only and --train all" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    for flags, trained in (([], "blocks"), (["--train", "all"], "all"), (["--cores-only"], "cores")):
        out = tmp_path / f"h{trained}"
        assert main(["heal", str(compressed), "--text", str(text_file), "--steps", "1", "--batch",
                     "2", "--seq", "32", "--no-teacher", *flags, "--out", str(out), "--quiet"]) == 0
        assert json.loads((out / "tensornet.json").read_text())["healing"]["train"] == trained


@pytest.mark.parametrize("argv", [["compress", "smollm2", "--chi", "8", "--ratio", "0.5", "--out", "x"],
                                  ["compress", "smollm2", "--ratio", "1.5", "--out", "x"],
                                  ["compress", "smollm2", "--out", "x"]])
def test_chi_xor_ratio_is_checked_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and ("--ratio" in capsys.readouterr().err)


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


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_that_cannot_be_created_is_refused_before_any_work(tiny_dir, capsys):
    # /proc refuses new directories even to root, whom permission bits do not stop.
    assert main(["compress", str(tiny_dir), "--chi", "8", "--no-calibration", "--out",
                 "/proc/forbidden/x", "--quiet"]) == 2
    printed = capsys.readouterr()
    errors = [l for l in printed.err.splitlines() if l.strip()]
    assert len(errors) == 1 and errors[0].startswith("tensornet-llm: error: cannot create")
    assert "MPOLinear" not in printed.out  # no report: nothing was compressed


def test_bad_chi_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "smollm2", "--chi", "0", "--out", "x"])
    assert exc.value.code == 2 and "--chi" in capsys.readouterr().err


@pytest.mark.parametrize("minutes", ["0", "-1", "inf", "soon"])
def test_a_bad_healing_budget_is_rejected_by_the_parser(minutes, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["heal", "x", "--steps", "10", "--max-minutes", minutes, "--out", "y"])
    assert exc.value.code == 2 and "--max-minutes" in capsys.readouterr().err


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


def test_defaults_calibrate_and_heal_on_the_mixture_distil_from_the_source_eval_every_domain(
        tiny_dir, tmp_path, capsys):
    compressed, healed = tmp_path / "c", tmp_path / "h"
    assert main(["compress", str(tiny_dir), "--ratio", "0.6", "--calibration-tokens", "1024",
                 "--fit-steps", "2", "--out", str(compressed), "--quiet"]) == 0
    settings = json.loads((compressed / "tensornet.json").read_text())["compactify"]
    assert settings["calibration"] == "mixture" and settings["calibration_tokens"] == 1024
    capsys.readouterr()
    assert main(["heal", str(compressed), "--steps", "2", "--tokens", "1024", "--seq", "32",
                 "--batch", "2", "--out", str(healed), "--quiet"]) == 0
    assert f"distilling from {tiny_dir}" in capsys.readouterr().out
    record = json.loads((healed / "tensornet.json").read_text())["healing"]
    assert record["teacher"] == str(tiny_dir) and record["text"] == "mixture"
    assert record["check_tokens"] == 2048 and record["on_rise"] == "stop"
    assert record["lr"] == HealConfig.lr == 3e-4  # heal()'s default, the measured recipe
    history = json.loads((healed / "healing.json").read_text())
    assert [step for step, _ in history["checks"]] == [0, 2]  # before and after
    assert main(["heal", str(compressed), "--steps", "1", "--tokens", "1024", "--seq", "32",
                 "--batch", "2", "--check-tokens", "0", "--out", str(healed), "--overwrite",
                 "--quiet"]) == 0
    assert json.loads((healed / "healing.json").read_text())["checks"] == []
    capsys.readouterr()
    assert main(["eval", str(healed), "--tokens", "128", "--window", "64", "--dense",
                 str(tiny_dir), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["perplexity"]) == ["fiction", "encyclopedia", "technical", "code"]
    assert result["ratio_to_dense"]["geomean"] > 0


def test_compress_low_rank_factors_stores_two_factors(tiny_dir, tmp_path):
    kinds = {}
    for flag in ([], ["--low-rank-factors"]):
        out = tmp_path / ("factors" if flag else "rows")
        assert main(["compress", str(tiny_dir), "--chi", "4", "--method", "low-rank", *flag,
                     "--out", str(out), "--quiet"]) == 0
        structure = json.loads((out / "tensornet.json").read_text())
        assert structure["compactify"]["low_rank_storage"] == ("factors" if flag else "kept rows")
        kinds[bool(flag)] = {m["method"] for m in structure["modules"].values()}
    assert kinds == {False: {"kept-rows"}, True: {"low-rank"}}


def test_compress_min_saving_is_passed_and_recorded(tiny_dir, tmp_path, capsys):
    out = tmp_path / "saving"
    assert main(["compress", str(tiny_dir), "--ratio", "0.8", "--min-saving", "0.5",
                 "--no-calibration", "--out", str(out), "--quiet"]) == 0
    structure = json.loads((out / "tensornet.json").read_text())
    assert structure["compactify"]["min_saving"] == 0.5
    report = json.loads((out / "report.json").read_text())
    assert report["layers"] and all(
        layer["params_after"] <= 0.5 * layer["params_before"] for layer in report["layers"])
    # Without a budget it means nothing: refused in one line, nothing written.
    assert main(["compress", str(tiny_dir), "--chi", "4", "--min-saving", "0.5",
                 "--out", str(tmp_path / "refused"), "--quiet"]) != 0
    assert "min_saving" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_compress_call_cost_is_passed_and_recorded(tiny_dir, tmp_path, capsys):
    out = tmp_path / "calls"
    assert main(["compress", str(tiny_dir), "--ratio", "0.8", "--call-cost", "400",
                 "--calibration-tokens", "256", "--fit-steps", "0", "--out", str(out),
                 "--quiet"]) == 0
    structure = json.loads((out / "tensornet.json").read_text())
    assert structure["compactify"]["call_cost"] == 400
    report = json.loads((out / "report.json").read_text())
    low_rank = [layer for layer in report["layers"]
                if structure["modules"].get(layer["name"], {}).get("method") == "kept-rows"]
    assert all(layer["params_before"] - layer["params_after"] > 400 for layer in low_rank)
    refused = ["--out", str(tmp_path / "refused"), "--quiet"]
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_dir), "--ratio", "0.8", "--call-cost", "-5", *refused])
    assert "--call-cost: must be a number >= 0" in capsys.readouterr().err
    assert main(["compress", str(tiny_dir), "--chi", "4", "--call-cost", "5", *refused]) != 0
    assert "call_cost" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_options_of_settings_take_default_and_help_from_the_dataclasses():
    """Every option named after a field of CompactifyConfig / HealConfig / QuantizeConfig has
    that field's default and a help text from its docstring: one source for both."""
    import argparse
    import dataclasses

    from tensornet_llm import CompactifyConfig, QuantizeConfig
    from tensornet_llm.cli import build_parser
    from tensornet_llm.cli_options import field_help

    commands = {"compress": CompactifyConfig, "heal": HealConfig, "quantize": QuantizeConfig}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = 0
    for command, cls in commands.items():
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING
                    else f.default_factory() for f in dataclasses.fields(cls)}
        helps = field_help(cls)
        for action in sub.choices[command]._actions:
            if action.dest in defaults:
                seen += 1
                assert action.default == defaults[action.dest], (command, action.dest)
                assert action.help and (action.dest not in helps or helps[action.dest] in
                                        action.help or action.option_strings[0] in (
                                            "--low-rank-factors", "--quantize-aware",
                                            "--keep-embeddings", "--keep-dense", "--chi",
                                            "--ratio")), (command, action.dest)
    assert seen >= 25
    assert field_help(HealConfig)["lr"] == "peak learning rate of AdamW"
