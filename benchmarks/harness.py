"""What every benchmark shares: timing, the models it measures, and writing its results.

* **Timing.** :func:`interleaved` runs every variant once per round, in turn, in the same
  process, for several rounds, so drift and interference hit all alike; ``ratio`` (from
  :mod:`tensornet_llm.helpers.speed`) compares a variant with the reference: the fastest
  rounds, and the median and range of the ratio within a round. End-to-end ``generate`` timing is
  :func:`tensornet_llm.helpers.speed.time_generate`, the same code the demo runs.
* **Models.** :func:`smollm2` (the bundled model, in a dtype), :func:`compressed` (a compactified
  copy), :func:`timed_models` (dense and the keeps a speed benchmark asks for),
  :func:`held_out_row` (compress a fresh copy, time it, score every held-out domain).
* **Results.** One current result per benchmark: ``docs/results/<stem>.json`` (settings, machine
  and rows) and ``<stem>.md`` (the table the docs cite), by :func:`write_results`;
  :func:`resume` lets a long benchmark add rows to its file run by run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tensornet_llm import CompactifyConfig, compactify
from tensornet_llm.compress.targets import find_targets
from tensornet_llm.helpers.evaluate import compare_to_dense, perplexity_table
from tensornet_llm.helpers.models import load_smollm2
from tensornet_llm.helpers.speed import ratio

__all__ = ["ROOT", "RESULTS", "DTYPES", "interleaved", "ratio", "speed_arguments", "smollm2",
           "compressed", "timed_models", "held_out_row", "ratio_leaving_dense", "machine",
           "processor", "write_results", "resume", "domain_table", "pyplot"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- timing

def interleaved(calls: dict[str, Callable[[], Any]], rounds: int, repeat: int = 1,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every entry of ``calls`` in each of ``rounds`` rounds (each round
    calls every entry ``repeat`` times in turn and records the mean), after ``warmup`` calls
    each."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            times[name].append((time.perf_counter() - start) / repeat)
    return times


def speed_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """``--keep``, ``--dtype``, ``--prompt``, ``--rounds``, ``--threads`` and ``--out``."""
    parser.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.5])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)


# ---------------------------------------------------------------- models

def smollm2(dtype: str = "float32") -> tuple[nn.Module, Any]:
    """The bundled SmolLM2-135M-Instruct in ``dtype``, eval mode, and its tokenizer."""
    model, tokenizer = load_smollm2()
    return model.to(DTYPES[dtype]).eval(), tokenizer


def compressed(dense: nn.Module, keep: float, config: CompactifyConfig | None = None,
               calibration: list | None = None) -> tuple[nn.Module, Any]:
    """A compactified copy of ``dense`` at ``ratio=keep`` (eval mode) and its report."""
    model = copy.deepcopy(dense)
    report = compactify(model, ratio=keep, calibration=calibration, progress=False,
                        config=config)
    return model.eval(), report


def timed_models(args: argparse.Namespace, parser: argparse.ArgumentParser
                 ) -> dict[str, nn.Module]:
    """Dense SmolLM2 in ``args.dtype`` and ``compactify(model, ratio=keep)`` at each
    ``args.keep`` (default layouts, no calibration: speed does not depend on the weights'
    values), after checking the options and setting the threads."""
    if not all(0 < k < 1 for k in args.keep):
        parser.error("--keep values must lie in (0, 1)")
    if args.rounds < 1 or args.prompt < 2:
        parser.error("--rounds must be at least 1 and --prompt at least 2")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, _ = smollm2(args.dtype)
    return {"dense": dense, **{f"keep {keep:.0%}": compressed(dense, keep)[0]
                               for keep in args.keep}}


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


def target_parameters(model: nn.Module, exclude: list[str] | None = None) -> int:
    """Parameters of the default targets (the attention and MLP linears), less ``exclude``."""
    return sum(p.numel() for _, m in find_targets(model, exclude=exclude)[0]
               for p in m.parameters(recurse=False))


def ratio_leaving_dense(model: nn.Module, keep: float, exclude: list[str]) -> float:
    """The ``ratio`` for ``compactify(model, ratio=..., exclude=exclude)`` that keeps ``keep`` of
    the default targets' parameters in all, the excluded modules counted whole (left dense)."""
    total = target_parameters(model)
    rest = target_parameters(model, exclude)
    share = (keep * total - (total - rest)) / rest
    if not 0 < share <= 1:
        raise SystemExit(f"--exclude {' '.join(exclude)}: those modules hold more than keep "
                         f"{keep:.0%} of the parameters")
    return share


# ---------------------------------------------------------------- results

#: Processor features that change which CPU kernels run (bfloat16 and int8 matmuls).
_KERNEL_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def processor() -> str:
    """The processor a run measured on: architecture, model name and the kernel-relevant
    features it has (``x86_64, AMD EPYC, avx512f avx512_bf16``), from ``/proc/cpuinfo`` where
    there is one. Speed ratios differ between processors, so runs on different ones never
    share a results file (:func:`resume` refuses)."""
    arch = platform.machine() or platform.processor() or "unknown"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return arch
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines()
                                                 if ":" in line)}
    flags = set(fields.get("flags", "").split())
    name = fields.get("model name", "")
    return ", ".join(p for p in (arch, name, " ".join(f for f in _KERNEL_FLAGS if f in flags))
                     if p)


def machine(**extra: Any) -> dict[str, Any]:
    """Where and how a run measured: processor (:func:`processor`), threads, torch; plus
    ``extra`` settings."""
    return {**extra, "threads": torch.get_num_threads(), "machine": processor(),
            "torch": torch.__version__}


def write_results(out: Path, stem: str, meta: dict, rows: list[dict], lines: list[str]) -> None:
    """``<out>/<stem>.json`` (``meta`` and ``rows``) and ``<out>/<stem>.md`` (``lines``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'{stem}.md'}")


def resume(path: Path, meta: dict, fresh: bool, parser, afresh: str = "--fresh"
           ) -> tuple[dict, list[dict]]:
    """``(meta, rows)`` saved at ``path`` by an earlier run with the same settings (and
    machine), or ``meta`` and no rows (``fresh``, or nothing saved); other settings stop the
    run with an error that names ``afresh``, how the benchmark starts a new file."""
    if not path.is_file() or fresh:
        return meta, []
    saved = json.loads(path.read_text())
    differ = {k: v for k, v in meta.items() if saved["meta"].get(k) != v}
    if differ:
        parser.error(f"{path} was measured with other settings ({sorted(differ)}); "
                     f"run with {afresh} or the same settings")
    return saved["meta"], saved["rows"]


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


def pyplot():
    """matplotlib's pyplot without a display, or None where matplotlib is not installed (the
    tables are written either way)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
