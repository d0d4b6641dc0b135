"""Seconds per step of healing with the default recipe, SmolLM2-135M at one keep.

    python benchmarks/bench_heal_step.py [--keep 0.5] [--steps 24] [--out DIR]

The recipe is ``bench_pareto.py``'s: ``heal(model, healing_mix(tokenizer, ...), teacher=dense)``
with batches of 4 x 256 tokens, distillation from the dense model, bf16 autocast where the CPU
has AMX (``mixed_precision="auto"``), lr 3e-4 and 20 warm-up steps. The compressed model is
``bench_pareto.py``'s cached one at that keep when it exists (calibrated on the mixture), else
``compactify(model, ratio=keep)`` without calibration (speed does not depend on the data).

A step's time is the wall time between two of ``heal``'s per-step callbacks (forward of teacher
and student, loss, backward, optimiser). The first ``--skip`` steps are left out (allocation and
warm-up); the table gives the median and the mean of the rest, and the steps a 30-minute budget
affords at the median. Run it on another version of the library with ``PYTHONPATH`` pointing at
that checkout to compare. Writes ``<out>/bench_heal_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tensornet_llm
from tensornet_llm import heal, load_compactified
from tensornet_llm.helpers.data import healing_mix
from tensornet_llm.helpers.models import default_cache_dir

from harness import RESULTS, compressed, machine, smollm2, write_results

PARETO_MODEL = "pareto-keep{keep}-mix16384-rows8"  # bench_pareto.py's cache name


def student_model(dense, keep: float) -> tuple[torch.nn.Module, str]:
    cached = default_cache_dir() / "bench" / PARETO_MODEL.format(keep=keep)
    if (cached / "tensornet.json").is_file():
        return load_compactified(cached), f"bench_pareto's cached model ({cached.name})"
    return compressed(dense, keep)[0].train(), "compactify(ratio=keep) without calibration"


def write_table(out: Path, rows: list[dict]) -> None:
    """``<out>/bench_heal_step.{json,md}`` from all rows so far."""
    lines = ["# Seconds per healing step (SmolLM2-135M, default recipe)", "",
             "Batches of 4 x 256 tokens, distilled from the dense model. Written by "
             "`benchmarks/bench_heal_step.py`; one row per run, in the order they ran.", "",
             "| run | keep | train | precision | threads | steps timed | median (s) | mean (s) "
             "| steps in 30 min at the median |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['keep']:.0%} | {r.get('train', 'all')} | "
                     f"{r['mixed_precision']} | "
                     f"{r['threads']} | {r['steps_timed']} | {r['median_s']:.2f} | "
                     f"{r['mean_s']:.2f} | {1800 / r['median_s']:.0f} |")
    write_results(out, "bench_heal_step", machine(), rows, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip", type=int, default=4, help="first steps left out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", help="heal(train=...): what the steps update (default: "
                        "heal's default)")
    parser.add_argument("--label", default="", help="a name for this run in the table")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error("--steps must exceed --skip")
    torch.set_num_threads(args.threads)
    dense, tokenizer = smollm2()
    model, source = student_model(dense, args.keep)
    batches = healing_mix(tokenizer, 4 * 256 * args.steps, seq_len=256, batch_size=4)
    stamps = [time.perf_counter()]
    options = {"train": args.train} if args.train else {}  # older versions know no train
    result = heal(model, batches, steps=args.steps, lr=3e-4, warmup_steps=20, teacher=dense,
                  progress=False, callback=lambda step, _: stamps.append(time.perf_counter()),
                  **options)
    times = [b - a for a, b in zip(stamps, stamps[1:])][args.skip:]
    row = {"label": args.label or tensornet_llm.__file__, "keep": args.keep, "model": source,
           "mixed_precision": result.mixed_precision, "threads": args.threads,
           "train": getattr(result, "train", "all"),  # older versions trained all
           "steps_timed": len(times), "median_s": statistics.median(times),
           "mean_s": statistics.fmean(times), "step_seconds": times}
    print(json.dumps({k: v for k, v in row.items() if k != "step_seconds"}), flush=True)
    path = args.out / "bench_heal_step.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows.append(row)
    write_table(args.out, rows)


if __name__ == "__main__":
    main()
