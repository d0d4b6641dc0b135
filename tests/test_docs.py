"""The docs run as written: getting-started's Python blocks, and the API reference is current."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.slow
def test_getting_started_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOCS / "getting-started.md")
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"getting-started.md block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "under ratio=0.5" in printed and "MPOLinear" in printed
    assert (tmp_path / "smollm2-small" / "tensornet.json").is_file()


def test_api_reference_is_current():
    result = subprocess.run([sys.executable, str(DOCS / "gen_api.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_api_reference_covers_every_public_name():
    import tensornet_llm

    text = (DOCS / "api.md").read_text()
    assert all(f"### `{name}`" in text for name in tensornet_llm.__all__)


def test_docs_links_resolve():
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("script", sorted(
    p.relative_to(DOCS.parent) for folder in ("examples", "benchmarks", "scripts")
    for p in (DOCS.parent / folder).glob("[!_]*.py")), ids=str)
def test_example_and_benchmark_scripts_import_and_parse_arguments(script, monkeypatch, capsys):
    """Every script imports (its imports of the package are current) and answers --help.

    Run in-process with ``runpy`` so torch and transformers are imported once for all scripts."""
    path = DOCS.parent / script
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.syspath_prepend(str(path.parent))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_quality_benchmark_report_is_written_from_rows(tmp_path, monkeypatch):
    """bench_quality's writer: both texts' tables, a missing cell left blank, and the plot."""
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(DOCS.parent / "benchmarks"))
    import bench_quality

    meta = {"calibration": "c.txt, 8 tokens", "held_out": "p.txt, 8 tokens",
            "held_out_wiki": "w.txt, 8 tokens", "fit_steps": 1, "threads": 1,
            "dense_perplexity": 40.0, "dense_perplexity_wiki": 20.0}
    rows = [{"method": m, "keep": k, "kept": k, "seconds": 1.0, "perplexity": p * k_mult,
             "perplexity_wiki": 2 * p * k_mult}
            for m, p in (("svd", 1e7), ("wsvd", 100.0)) for k, k_mult in ((0.9, 1), (0.5, 3))]
    rows = [r for r in rows if not (r["method"] == "svd" and r["keep"] == 0.5)]
    bench_quality.write(tmp_path, meta, rows)
    text = (tmp_path / "bench_quality.md").read_text()
    assert "| wsvd | 100 (1 s; 90.0%) | 300 (1 s; 50.0%) |" in text
    assert "| svd | 1e+07 (1 s; 90.0%) |  |" in text
    assert "| wsvd | 10x | 30x |" in text  # the Wikipedia ratios: 200 / 20, 600 / 20
    assert (tmp_path / "bench_quality.png").stat().st_size > 10_000
