"""Fit the cost-model weights of ``tensornet_llm.layers.contract`` to measured layer timings.

Reads ``docs/results/bench_layers.json`` (written by ``bench_layers.py``), recomputes for every
measured strategy its FLOPs, elements moved and kernel count, and searches a grid of the three
weights in ``cost = flops + (MATMUL_FLOP_WEIGHT - 1) * dense_matmul_flops + FLOPS_PER_ELEMENT *
elements + FLOPS_PER_KERNEL * kernels`` for the triple whose choices are within 10% of the faster
measured strategy in the most cells (ties: the smallest worst-case slowdown). Prints the best
triple and, for comparison, the current constants' score on the same data.

    python benchmarks/fit_cost_model.py [docs/results/bench_layers.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import opt_einsum

from tensornet_llm import MPOLinear, TTNSLinear
from tensornet_llm.layers.contract import (
    BATCH, FLOPS_PER_ELEMENT, FLOPS_PER_KERNEL, MATMUL_FLOP_WEIGHT, _step_costs, _symbol_sizes,
    get_plan,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"mpo": MPOLinear, "ttns": TTNSLinear}


def features(row: dict) -> dict[str, np.ndarray]:
    layer = METHODS[row["method"]](row["in"], row["out"], row["chi"], row["n_sites"], device="meta")
    spec, tokens = layer.spec, row["tokens"]
    plan = get_plan(spec, tokens)
    sizes = {**_symbol_sizes(spec), opt_einsum.get_symbol(BATCH): tokens}
    nf, nm = _step_costs(plan.network.contraction_list, sizes)
    df, dm = _step_costs(plan.dense.contraction_list, sizes)
    n_in, n_out = spec.in_size, spec.out_size
    # Columns: other FLOPs, dense-matmul FLOPs, elements moved, kernels.
    return {
        "network": np.array([nf, 0.0, nm, len(plan.network.contraction_list)]),
        "dense": np.array([df, 2.0 * tokens * n_in * n_out,
                           dm + 3 * n_in * n_out + tokens * (n_in + n_out),
                           len(plan.dense.contraction_list) + 2]),
    }


def score(rows, feats, matmul: float, per_element: float, per_kernel: float) -> tuple[int, float]:
    """(cells within 10% of the faster strategy, worst slowdown) for one triple of weights."""
    weights = np.array([1.0, matmul, per_element, per_kernel])
    good, worst = 0, 1.0
    for r, f in zip(rows, feats):
        # Ties go to dense, as in ContractionPlan.choose.
        pick = min(("dense", "network"), key=lambda s: float(f[s] @ weights))
        ratio = r["seconds"][pick] / min(r["seconds"]["network"], r["seconds"]["dense"])
        good += ratio <= 1.10
        worst = max(worst, ratio)
    return good, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timings", type=Path, nargs="?",
                        default=ROOT / "docs" / "results" / "bench_layers.json",
                        help="bench_layers.json to fit (default: %(default)s)")
    path = parser.parse_args().timings
    rows = json.loads(path.read_text())["rows"]
    feats = [features(r) for r in rows]
    grid = [(m, e, k) for m in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
            for e in (0, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)
            for k in (0, 1e4, 3e4, 1e5, 2e5, 3e5, 1e6, 3e6, 1e7)]
    results = {triple: score(rows, feats, *triple) for triple in grid}
    best = max(grid, key=lambda p: (results[p][0], -results[p][1]))
    good, worst = results[best]
    print(f"best: MATMUL_FLOP_WEIGHT = {best[0]}, FLOPS_PER_ELEMENT = {best[1]}, "
          f"FLOPS_PER_KERNEL = {best[2]:.3g}: within 10% in {good}/{len(rows)} cells, "
          f"worst {worst:.2f}x")
    good, worst = score(rows, feats, MATMUL_FLOP_WEIGHT, FLOPS_PER_ELEMENT, FLOPS_PER_KERNEL)
    print(f"current: MATMUL_FLOP_WEIGHT = {MATMUL_FLOP_WEIGHT}, FLOPS_PER_ELEMENT = "
          f"{FLOPS_PER_ELEMENT}, FLOPS_PER_KERNEL = {FLOPS_PER_KERNEL:.3g}: within 10% in "
          f"{good}/{len(rows)} cells, worst {worst:.2f}x")


if __name__ == "__main__":
    main()
