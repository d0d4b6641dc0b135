"""Alternating sweeps against L-BFGS on the same cross-layer objective (SmolLM2-135M layers).

    python benchmarks/bench_sweeps.py [--blocks 12 13 14 15] [--keep 0.5] [--sweeps 6]
                                      [--lbfgs-steps 10 30 100]

For groups of SmolLM2's same-role modules (blocks ``--blocks``, input covariances from 4,096
tokens of ``calibration_mix``), both fits start from the same closed form (Basis Sharing for a
shared input basis, plus the top eigenvectors for a shared output basis) and minimise the same
summed output error ``sum_l ||(W_l - U C_l V) X_l||^2``:

* sweeps: :func:`~tensornet_llm.compress.sweeps.fit_group`, one node at a time in closed form
  (the input basis by preconditioned conjugate gradients);
* L-BFGS: every node at once with ``torch.optim.LBFGS`` (strong Wolfe line search, float64), as
  the per-layer fit of ``compactify`` does.

Reported per group: the relative output error after each sweep and after each L-BFGS budget, the
seconds each took, and the time the sweeps needed to reach L-BFGS's final error. Written to
``docs/results/bench_sweeps.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tensornet_llm.compress.calibrate import as_batches, collect_covariances
from tensornet_llm.compress.sweeps import fit_group, group_ranks
from tensornet_llm.helpers.data import calibration_mix
from tensornet_llm.helpers.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
ROLES = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]


def lbfgs(weights, covs, start, steps: int) -> tuple[float, float]:
    """L-BFGS on every node of ``start`` (a GroupFit) for ``steps`` iterations: the relative
    output error reached and the seconds taken."""
    ws = [w.detach().double() for w in weights]
    cs = [c.double() for c in covs]
    params = [p.detach().clone().contiguous().requires_grad_(True) for p in
              [start.in_basis, start.out_basis, *start.cores] if p is not None]
    has_in, has_out = start.in_basis is not None, start.out_basis is not None
    reference = sum(float(((w @ c) * w).sum()) for w, c in zip(ws, cs))

    def loss() -> torch.Tensor:
        rest = list(params)
        v = rest.pop(0) if has_in else None
        u = rest.pop(0) if has_out else None
        total = 0.0
        for w, c, core in zip(ws, cs, rest):
            fit = core @ v if v is not None else core
            fit = u @ fit if u is not None else fit
            e = w - fit
            total = total + ((e @ c) * e).sum()
        return total / reference

    optimizer = torch.optim.LBFGS(params, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                                  tolerance_change=1e-15)

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    t0 = time.perf_counter()
    optimizer.step(closure)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        return float(loss()) ** 0.5, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[12, 13, 14, 15])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--sweeps", type=int, default=6)
    parser.add_argument("--lbfgs-steps", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    names = {r: [f"model.layers.{b}.{r}" for b in args.blocks] for r in ROLES}
    modules = {n: model.get_submodule(n) for ns in names.values() for n in ns}
    collector = collect_covariances(model, as_batches(calibration_mix(tokenizer, 4096)), modules)
    rows = []
    for role, ns in names.items():
        weights = [modules[n].weight.detach() for n in ns]
        covs = [collector.covariance(n) for n in ns]
        out_f, in_f = weights[0].shape
        for side in ("input", "both"):
            in_rank, out_rank = group_ranks(side, in_f, out_f, len(ns), args.keep)
            swept = fit_group(weights, covs, side=side, in_rank=in_rank, out_rank=out_rank,
                              sweeps=args.sweeps)
            start = fit_group(weights, covs, side=side, in_rank=in_rank, out_rank=out_rank,
                              sweeps=0)
            runs = [(steps, *lbfgs(weights, covs, start, steps)) for steps in args.lbfgs_steps]
            final = runs[-1][1]
            reach = next((t for h, t in zip(swept.history, swept.times) if h <= final), None)
            rows.append({"role": role, "side": side, "ranks": [in_rank, out_rank],
                         "start_seconds": start.seconds,
                         "sweeps": [{"sweep": i, "error": h, "seconds": t} for i, (h, t)
                                    in enumerate(zip(swept.history, swept.times))],
                         "lbfgs": [{"steps": s, "error": e, "seconds": t} for s, e, t in runs],
                         "sweeps_reach_lbfgs_final_seconds": reach})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"blocks": args.blocks, "keep": args.keep, "threads": torch.get_num_threads()}
    (args.out / "bench_sweeps.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Sweeps against L-BFGS on the cross-layer objective (SmolLM2-135M)", "",
             f"Groups of blocks {args.blocks}, keep {args.keep:.0%} of the group's parameters, "
             f"same start for both (Basis Sharing's closed form); relative output error "
             f"`sqrt(sum_l ||E_l X_l||^2 / sum_l ||W_l X_l||^2)` on 4,096 calibration tokens. "
             f"{meta['threads']} CPU threads. Written by `benchmarks/bench_sweeps.py`.", "",
             "| role | side | ranks (in, out) | start | after 1 / 2 / last sweep (seconds) | "
             "L-BFGS steps: error (seconds) | sweeps reach L-BFGS's last error in |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sweeps"]
        sweeps = " / ".join(f"{x['error']:.4f} ({x['seconds']:.1f} s)"
                            for x in (s[1], s[min(2, len(s) - 1)], s[-1]))
        lb = "; ".join(f"{x['steps']}: {x['error']:.4f} ({x['seconds']:.1f} s)" for x in r["lbfgs"])
        reach = r["sweeps_reach_lbfgs_final_seconds"]
        lines.append(f"| {r['role']} | {r['side']} | {r['ranks'][0]}, {r['ranks'][1]} | "
                     f"{s[0]['error']:.4f} | {sweeps} | {lb} | "
                     + (f"{reach:.1f} s" if reach is not None else "not reached") + " |")
    (args.out / "bench_sweeps.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
