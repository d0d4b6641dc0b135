"""The LM head as a target (``CompactifyConfig.lm_head``) on SmolLM2-135M: quality and speed.

    python benchmarks/bench_lm_head.py [--head-keep 0.75 0.5] [--keep 0.8]
                                       [--calibration-tokens 16384] [--tokens 8192] [--rounds 7]

Two measurements, on held-out text of every domain (as ``bench_domains.py``):

* **The head alone**: ``compactify(model, ratio=h, targets=["lm_head"], calibration=...)`` at
  each ``--head-keep`` (the blocks dense; the head untied first, see below), its perplexity, and the head's time per decoded token
  (batch 1, one token, interleaved with the dense head in the same process, best of
  ``--rounds``, median and range in brackets).
* **The budget free to cut the head**: SmolLM2's head is tied to its input embedding, so the
  budget leaves it dense (a factored copy would add parameters). To see what it does with an
  untied head, the table is copied into its own head first; then at each ``--keep``,
  ``compactify(ratio=keep)`` against ``compactify(ratio=r, lm_head=True)`` with ``r`` keeping the
  same parameters in all (the head's 28.3M counted whole when dense), and the head's rank.

Writes ``docs/results/bench_lm_head.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tensornet_llm import compactify
from tensornet_llm.helpers.data import calibration_mix
from tensornet_llm.helpers.evaluate import perplexity_table
from tensornet_llm.helpers.models import load_smollm2

from harness import RESULTS, domain_table, held_out_row, interleaved, machine, target_parameters, \
    write_results


def untied(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its LM head holding its own copy of the tied table."""
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def head_speed(head: torch.nn.Module, dense: torch.nn.Module, rounds: int) -> dict:
    """The compressed head's speed against the dense one on one token (batch 1)."""
    x = torch.randn(1, 1, dense.in_features)
    with torch.inference_mode():
        times = interleaved({"dense": lambda: dense(x), "head": lambda: head(x)}, rounds,
                            repeat=50, warmup=20)
    per_round = [d / h for d, h in zip(times["dense"], times["head"])]
    return {"dense_us": min(times["dense"]) * 1e6, "head_us": min(times["head"]) * 1e6,
            "speedup": min(times["dense"]) / min(times["head"]),
            "median": statistics.median(per_round), "low": min(per_round), "high": max(per_round)}


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    head_rows = [r for r in rows if r["kind"] == "head alone"]
    budget_rows = [r for r in rows if r["kind"] != "head alone"]
    lines = ["# The LM head as a target (SmolLM2-135M, no fine-tuning)", "",
             f"Perplexity on {meta['tokens']} held-out tokens of each domain (512-token windows), "
             f"calibrated on {meta['calibration_tokens']} tokens of the mixture; "
             f"{meta['threads']} CPU threads ({meta['machine']}, torch {meta['torch']}). Written by "
             "`benchmarks/bench_lm_head.py`.", "",
             "## The head alone (blocks dense)", "",
             "`compactify(model, ratio=h, targets=['lm_head'], calibration=...)`. Head speed: "
             "one token, batch 1, against the dense head in the same run; fastest rounds, then "
             "the median (range) of the per-round ratios.", ""]
    lines += domain_table(meta["dense"], head_rows, {
        "head keep": lambda r: f"{r['keep']:.0%} ({r['layout']}, rank {r['rank']})",
        "head speed": lambda r: (f"{r['speed']['speedup']:.2f}x ({r['speed']['median']:.2f}x, "
                                 f"{r['speed']['low']:.2f}x-{r['speed']['high']:.2f}x)")})
    lines += ["", "## The budget free to cut an untied head", "",
              "The head untied first (its own copy of the table: 28.3M more parameters); "
              "`ratio=keep` (head dense) against `lm_head=True` at the ratio that keeps the same "
              "parameters in all.", ""]
    lines += domain_table(meta["dense"], budget_rows, {
        "keep": lambda r: f"{r['keep']:.0%}",
        "head offered": lambda r: (f"yes (ratio {r['ratio']:.3f}): "
                                   + (f"rank {r['rank']}" if r["rank"] else "left dense"))
        if r["kind"] == "head offered" else "no"})
    write_results(out, "bench_lm_head", meta, rows, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-keep", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.8])
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not all(0 < k < 1 for k in [*args.head_keep, *args.keep]):
        parser.error("--head-keep and --keep values must lie in (0, 1)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    meta = machine(tokens=args.tokens, calibration_tokens=args.calibration_tokens)
    meta["dense"] = perplexity_table(model, tokenizer, args.tokens)
    data = calibration_mix(tokenizer, args.calibration_tokens, seq_len=512)
    rows: list[dict] = []

    def measured(**options) -> tuple[dict, torch.nn.Module, int | None]:
        """A fresh SmolLM2, its head untied, ``compactify(**options)`` on the calibration text,
        scored on held-out text; with its head and the head's rank (``None``: left dense)."""
        found = {}

        def compress(student):
            report = compactify(untied(student), calibration=data, progress=False, **options)
            found["head"] = student.lm_head
            found["rank"] = next((r.chi for r in report.layers if r.name == "lm_head"), None)
            return report

        row = held_out_row(compress, tokenizer, args.tokens, meta["dense"])
        return row, found["head"], found["rank"]

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "choices"}), flush=True)
        write(args.out, meta, rows)

    for keep in args.head_keep:
        row, head, rank = measured(ratio=keep, targets=["lm_head"])
        record({"kind": "head alone", "keep": keep, "rank": rank, "layout": type(head).__name__,
                "speed": head_speed(head, model.lm_head, args.rounds), **row})
    blocks = target_parameters(model)
    head_params = model.lm_head.weight.numel()
    for keep in args.keep:
        for offered in (False, True):
            ratio = (keep * blocks + head_params) / (blocks + head_params) if offered else keep
            row, _, rank = measured(ratio=ratio, lm_head=offered)
            record({"kind": "head offered" if offered else "head dense", "keep": keep,
                    "ratio": ratio, "rank": rank, **row})

if __name__ == "__main__":
    main()
