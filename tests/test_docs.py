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
    pytest.importorskip("torchao")  # the walkthrough quantizes to int8, through the torchao extra
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
    for p in (DOCS.parent / folder).glob("*.py") if "__main__" in p.read_text()), ids=str)
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


def readme_layout() -> set[str]:
    """The paths the README's layout tree names (``tensornet_llm/...``, files and folders),
    read from its indentation (two spaces a level)."""
    text = (DOCS.parent / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    stack: list[tuple[int, str]] = []
    paths = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([p for _, p in stack] + [name.rstrip("/")])
        paths.add(path)
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
    return {p for p in paths if p.startswith("tensornet_llm")}


def test_readme_layout_lists_every_module_and_nothing_else():
    package = DOCS.parent / "tensornet_llm"
    modules = {str(p.relative_to(DOCS.parent)) for p in package.rglob("*.py")}
    named = readme_layout()
    assert {p for p in named if p.endswith(".py")} == modules
    for path in named - modules:  # the folders it names exist
        assert (DOCS.parent / path).is_dir(), path


def markdown_table(text: str, heading: str | None = None) -> list[dict[str, str]]:
    """The first table in ``text`` (after ``heading``), one dict per row (header -> cell)."""
    part = text if heading is None else text.split(heading, 1)[1]
    lines = [l for l in part.splitlines() if l.startswith("|")]
    rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines]
    block = []
    for row in rows[2:]:
        if len(row) != len(rows[0]):
            break
        block.append(dict(zip(rows[0], row)))
    return block


def test_readme_is_short_and_its_headline_comes_from_the_results_file():
    readme = (DOCS.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_screen = "\n".join(readme.splitlines()[:60])
    assert "make demo" in first_screen and "make test" in first_screen
    assert "## What it buys" in first_screen
    headline = markdown_table(readme, "## What it buys")
    results = {r["model"]: r for r in markdown_table(
        (DOCS / "results" / "bench_pareto.md").read_text())}
    assert len(headline) >= 4
    for row in headline:
        source = results[row["model"]]
        assert {k: v for k, v in row.items()} == {k: source[k] for k in row}, row["model"]

