"""Perplexity at equal parameters: SVD, whitened SVD (SVD-LLM), MPO, MPO with data-aware fit.

    python benchmarks/bench_quality.py [--chi 64] [--calibration-tokens 4096] [--tokens 8192]

For each chi, every attention/MLP linear of SmolLM2 is replaced by

* ``mpo``       TT-SVD of the weight (no data);
* ``mpo+fit``   the same, then fitted to the calibration activations block by block
                (``compactify(..., calibration=...)``);
* ``svd``       truncated SVD with the same parameter count per layer as the MPO
                (rank ``r = params / (in + out)``);
* ``wsvd``      activation-whitened SVD (SVD-LLM: Cholesky of the input covariance, SVD of
                ``W L``), same ranks, covariances from the dense model.

Calibration on Emma, perplexity on held-out Persuasion. The SVD baselines are written back as
dense matrices (only their perplexity and parameter count matter here). Results go to
``docs/results/bench_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tensornet_llm import compactify
from tensornet_llm.calibrate import as_batches, collect_covariances
from tensornet_llm.data import HELD_OUT_TEXT, token_batches, tokenize_text
from tensornet_llm.evaluate import perplexity
from tensornet_llm.fit import whitened_svd
from tensornet_llm.models import load_smollm2
from tensornet_llm.targets import find_targets

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_TEXT = "austen_emma.txt"


def low_rank_baseline(model, ranks: dict[str, int], covs=None) -> None:
    """Replace each target's weight by its rank-r (whitened) SVD approximation, in place."""
    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        w = linear.weight.detach().double()
        if covs is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
        else:
            approx = whitened_svd(w, covs.covariance(name), rank)
        with torch.no_grad():
            linear.weight.copy_(approx.to(linear.weight.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chi", type=int, nargs="+", default=[64])
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    held_out = tokenize_text(tokenizer, HELD_OUT_TEXT, args.tokens)
    calib = list(token_batches(tokenize_text(tokenizer, CALIBRATION_TEXT, args.calibration_tokens),
                               seq_len=512, batch_size=4))
    dense_ppl = perplexity(model, held_out)
    print(f"dense perplexity {dense_ppl:.2f}", flush=True)
    targets = dict(find_targets(model)[0])
    covs = collect_covariances(model, as_batches(calib), targets)
    rows = []
    for chi in args.chi:
        for method in ("mpo", "mpo+fit"):
            model, _ = load_smollm2()
            t0 = time.perf_counter()
            report = compactify(model, chi=chi, progress=False,
                                calibration=calib if method == "mpo+fit" else None,
                                fit_steps=args.fit_steps)
            seconds = time.perf_counter() - t0
            rows.append({"method": method, "chi": chi, "kept": report.kept_fraction,
                         "seconds": seconds, "perplexity": perplexity(model, held_out)})
            print(json.dumps(rows[-1]), flush=True)
        ranks = {r.name: max(1, r.params_after // (r.in_features + r.out_features))
                 for r in report.layers}
        kept = sum(ranks[n] * (targets[n].in_features + targets[n].out_features) for n in ranks)
        kept /= report.target_params_before
        for method in ("svd", "wsvd"):
            model, _ = load_smollm2()
            t0 = time.perf_counter()
            low_rank_baseline(model, ranks, covs if method == "wsvd" else None)
            rows.append({"method": method, "chi": chi, "kept": kept,
                         "seconds": time.perf_counter() - t0,
                         "perplexity": perplexity(model, held_out)})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"calibration": f"{CALIBRATION_TEXT}, {args.calibration_tokens} tokens",
            "held_out": f"{HELD_OUT_TEXT}, {held_out.numel()} tokens", "dense_perplexity": dense_ppl,
            "fit_steps": args.fit_steps, "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Quality at equal parameters (SmolLM2-135M, no fine-tuning)", "",
             f"Calibration: {meta['calibration']}; perplexity on {meta['held_out']} (512-token "
             f"windows); dense perplexity {dense_ppl:.2f}. Written by `benchmarks/bench_quality.py`.",
             "", "| chi | method | targeted params kept | time (s) | perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {r['chi']} | {r['method']} | {r['kept']:.1%} | {r['seconds']:.1f} | "
              f"{r['perplexity']:.4g} |" for r in rows]
    (args.out / "bench_quality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
