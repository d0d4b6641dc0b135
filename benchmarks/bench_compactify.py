"""compactify on the real SmolLM2-135M: wall time, parameters kept and held-out perplexity.

    python benchmarks/bench_compactify.py [--chi 32 64 128] [--methods mpo ttns] [--tokens 8192]

No calibration and no healing: this measures the plain weight decomposition. Results go to
``docs/results/bench_compactify.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tensornet_llm import compactify
from tensornet_llm.helpers.data import HELD_OUT_TEXT, tokenize_text
from tensornet_llm.helpers.evaluate import model_size_bytes, perplexity
from tensornet_llm.helpers.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chi", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--methods", nargs="+", default=["mpo", "ttns"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    ids = tokenize_text(tokenizer, HELD_OUT_TEXT, args.tokens)
    dense = {
        "params": sum(p.numel() for p in model.parameters()),
        "mb": model_size_bytes(model) / 1e6,
        "perplexity": perplexity(model, ids, tokenizer=tokenizer),
    }
    print(f"dense: {dense}", flush=True)
    rows = []
    for method in args.methods:
        for chi in args.chi:
            model, _ = load_smollm2()
            t0 = time.perf_counter()
            report = compactify(model, chi=chi, method=method, progress=False)
            seconds = time.perf_counter() - t0
            row = {
                "method": method, "chi": chi, "seconds": seconds,
                "target_kept": report.kept_fraction, "model_kept": report.model_kept_fraction,
                "params": report.model_params_after, "mb": model_size_bytes(model) / 1e6,
                "mean_rel_error": sum(r.rel_error for r in report.layers) / len(report.layers),
                "perplexity": perplexity(model, ids, tokenizer=tokenizer),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "text": HELD_OUT_TEXT, "tokens": int(ids.numel())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_compactify.json").write_text(
        json.dumps({"meta": meta, "dense": dense, "rows": rows}, indent=1))
    lines = [
        "# compactify on SmolLM2-135M-Instruct (no calibration, no healing)", "",
        f"{meta['machine']}, torch {meta['torch']}; perplexity on {meta['tokens']} tokens of "
        f"{meta['text']} (512-token windows). Written by `benchmarks/bench_compactify.py`.", "",
        "| method | chi | compactify time (s) | targeted params kept | model params | size (MB) "
        "| mean weight rel. error | perplexity |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | - | - | 100% | {dense['params']:,} | {dense['mb']:.1f} | 0 | "
        f"{dense['perplexity']:.2f} |",
    ]
    lines += [
        f"| {r['method']} | {r['chi']} | {r['seconds']:.1f} | {r['target_kept']:.1%} | "
        f"{r['params']:,} | {r['mb']:.1f} | {r['mean_rel_error']:.3f} | {r['perplexity']:.4g} |"
        for r in rows
    ]
    (args.out / "bench_compactify.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
