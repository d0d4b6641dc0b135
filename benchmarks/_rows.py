"""What the held-out-domain benchmarks share: resumable rows, and one measured row."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from torch import nn

from tensornet_llm.compress.targets import find_targets
from tensornet_llm.helpers.evaluate import compare_to_dense, perplexity_table
from tensornet_llm.helpers.models import load_smollm2


def resume(path: Path, meta: dict, fresh: bool, parser) -> tuple[dict, list[dict]]:
    """``(meta, rows)`` saved at ``path`` by an earlier run with the same settings, or ``meta``
    and no rows (``fresh``, or nothing saved); other settings stop the run with an error."""
    if not path.is_file() or fresh:
        return meta, []
    saved = json.loads(path.read_text())
    differ = {k: v for k, v in meta.items() if saved["meta"].get(k) != v}
    if differ:
        parser.error(f"{path} was measured with other settings ({sorted(differ)}); "
                     "use --fresh or the same settings")
    return saved["meta"], saved["rows"]


def held_out_row(compress: Callable, tokenizer, tokens: int, dense: dict[str, float]) -> dict:
    """A fresh SmolLM2 compressed by ``compress(model) -> CompactifyReport`` (timed), then
    scored on ``tokens`` held-out tokens of every domain against ``dense``."""
    student, _ = load_smollm2()
    start = time.perf_counter()
    report = compress(student)
    seconds = time.perf_counter() - start
    table = perplexity_table(student, tokenizer, tokens)
    return {"seconds": seconds, "kept": report.kept_fraction, "perplexity": table,
            "ratios": compare_to_dense(table, dense), "choices": report.choices()}


def domain_table(dense: dict[str, float], rows: list[dict],
                 leading: dict[str, Callable[[dict], str]]) -> list[str]:
    """Markdown lines: a row per measured row (its ``leading`` cells, then perplexity and ratio
    per domain, geometric mean, worst, compress time), dense first."""
    names = list(dense)
    heads = [*leading, *names, "geometric mean", "worst", "compress time"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads),
             "| dense | " + "| " * (len(leading) - 1) + " | ".join(f"{dense[n]:.2f}" for n in names)
             + " | 1.00x | 1.00x | |"]
    for r in rows:
        ratios = r["ratios"]
        cells = [cell(r) for cell in leading.values()]
        cells += [f"{r['perplexity'][n]:.2f} ({ratios[n]:.2f}x)" for n in names]
        cells += [f"{ratios['geomean']:.2f}x", f"{ratios['worst']:.2f}x", f"{r['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_leaving_dense(model: nn.Module, keep: float, exclude: list[str]) -> float:
    """The ``ratio`` for ``compactify(model, ratio=..., exclude=exclude)`` that keeps ``keep`` of
    the default targets' parameters in all, the excluded modules counted whole (left dense):
    the same model size as ``ratio=keep`` without ``exclude``."""
    def count(modules: list[tuple[str, nn.Module]]) -> int:
        return sum(p.numel() for _, m in modules for p in m.parameters(recurse=False))

    total = count(find_targets(model)[0])
    rest = count(find_targets(model, exclude=exclude)[0])
    ratio = (keep * total - (total - rest)) / rest
    if not 0 < ratio <= 1:
        raise SystemExit(f"--exclude {' '.join(exclude)}: those modules hold more than keep "
                         f"{keep:.0%} of the parameters")
    return ratio

