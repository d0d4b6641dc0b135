"""Tensor-network layers versus dense ``nn.Linear``, side by side on the same input.

For each layer shape, method, site count, chi and token count this times, interleaved round by
round so that machine drift hits all variants alike:

* ``linear``   dense ``nn.Linear`` of the same shape
* ``network``  input contracted through the cores (opt_einsum path, cached)
* ``dense``    cores contracted to the dense weight, then one matmul
* ``auto``     the layer's own per-call choice (the cost model)
* ``tuned``    the choice after ``autotune`` (timed separately, before its choice is scored)
* ``einsum``   plain ``torch.einsum`` on the network equation, no path (left to right)

and records the FLOPs of each. Results go to ``docs/results/bench_layers.json`` and a Markdown
table ``docs/results/bench_layers.md``.

    python benchmarks/bench_layers.py            # full grid (~15 min on 2 CPU cores)
    python benchmarks/bench_layers.py --quick    # small grid, a minute
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from harness import RESULTS, interleaved, machine, write_results

from tensornet_llm import MPOLinear, TTNSLinear, autotune
from tensornet_llm.layers.contract import get_plan

METHODS = {"mpo": MPOLinear, "ttns": TTNSLinear}


def time_variants(fns: dict, rounds: int) -> dict[str, float]:
    """Fastest seconds per call of each function over interleaved rounds.

    The minimum, not the median: on a shared machine interference only ever adds time, so the
    fastest round is the best estimate of what the code costs.
    """
    return {name: min(times) for name, times in interleaved(fns, rounds).items()}


def left_to_right_flops(layer, tokens: int) -> float:
    """FLOPs of the network equation contracted left to right, as pathless torch.einsum does."""
    import opt_einsum

    spec = layer.spec
    shapes = [(tokens, *(spec.size(l) for l in spec.in_legs)), *spec.core_shapes]
    path = [(0, 1)] * (len(shapes) - 1)
    _, info = opt_einsum.contract_path(spec.network_equation(), *shapes, shapes=True, optimize=path)
    return float(info.opt_cost)


def einsum_without_path(layer, x):
    spec = layer.spec
    xs = torch.nn.functional.pad(x, (0, spec.in_size - layer.in_features))
    xs = xs.reshape(x.shape[0], *(spec.size(l) for l in spec.in_legs))
    with torch.backends.opt_einsum.flags(enabled=False):
        return torch.einsum(spec.network_equation(), xs, *layer._operands())


def fmt_ms(seconds: float | None) -> str:
    return "skipped" if seconds is None else f"{seconds * 1e3:.3f}"


def run(grid: dict, rounds_scale: float) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for in_f, out_f in grid["shapes"]:
        linear = nn.Linear(in_f, out_f)
        for method, cls in METHODS.items():
            if method not in grid.get("methods", METHODS):
                continue
            for n_sites in grid["n_sites"]:
                for chi in grid["chi"]:
                    layer = cls(in_f, out_f, chi, n_sites)
                    einsum_per_token = 0.0  # measured at the previous token count
                    for tokens in grid["tokens"]:
                        x = torch.randn(tokens, in_f)
                        plan = get_plan(layer.spec, tokens)

                        def strat(s):
                            def call():
                                layer.strategy = s
                                return layer(x)
                            return call

                        fns = {
                            "linear": lambda: linear(x),
                            "network": strat("network"),
                            "dense": strat("dense"),
                            "auto": strat("auto"),
                        }
                        with torch.inference_mode():
                            rounds = 60 if tokens <= 16 else (8 if tokens < 2048 else 2)
                            t = time_variants(fns, max(2, int(rounds * rounds_scale)))
                            # The pathless einsum is a slow reference: one call is enough, and
                            # none where the last measurement extrapolates past 2 s a call.
                            naive = left_to_right_flops(layer, tokens)
                            t["einsum"] = None
                            if einsum_per_token * tokens <= 2.0:
                                t0 = time.perf_counter()
                                einsum_without_path(layer, x)
                                t["einsum"] = time.perf_counter() - t0
                                einsum_per_token = t["einsum"] / tokens
                            # Measured choice: autotune's own timings decide, the ones above
                            # score the decision (so a lucky round cannot grade itself).
                            tuned = autotune(layer, [tokens])[0].choice
                        best = min(t["network"], t["dense"])
                        row = {
                            "in": in_f, "out": out_f, "method": method, "n_sites": n_sites,
                            "chi": chi, "tokens": tokens, "bond_dims": list(layer.bond_dims),
                            "params": sum(c.numel() for c in layer.cores),
                            "dense_params": in_f * out_f,
                            "seconds": t,
                            "flops": {
                                "linear": 2.0 * tokens * in_f * out_f,
                                "network": plan.flops("network", tokens),
                                "dense": plan.flops("dense", tokens),
                                "einsum": naive,
                            },
                            "auto_choice": plan.choose(tokens),
                            # Decision quality: time of the strategy auto picks over the faster.
                            "auto_over_best": t[plan.choose(tokens)] / best,
                            # End to end, dispatch included (noisier: a separate measurement).
                            "auto_call_over_best": t["auto"] / best,
                            "tuned_choice": tuned,
                            "tuned_over_best": t[tuned] / best,
                            "linear_over_auto": t["linear"] / t["auto"],
                        }
                        rows.append(row)
                        print(
                            f"{in_f:>5}->{out_f:<5} {method:4} N={n_sites} chi={chi:<4} T={tokens:<5}"
                            f" linear {t['linear']*1e3:8.3f}ms  network {t['network']*1e3:8.3f}"
                            f"  dense {t['dense']*1e3:8.3f}  auto {t['auto']*1e3:8.3f}"
                            f" ({row['auto_choice']:7}, choice {row['auto_over_best']:.2f}x best,"
                            f" call {row['auto_call_over_best']:.2f}x; tuned {tuned:7}"
                            f" {row['tuned_over_best']:.2f}x)"
                            f"  einsum {fmt_ms(t['einsum']):>8}  speedup vs linear"
                            f" {row['linear_over_auto']:.2f}x", flush=True,
                        )
    return rows


def summarise(rows: list[dict]) -> dict:
    within = [r for r in rows if r["auto_over_best"] <= 1.10]
    cheap = [
        r for r in rows
        if r["tokens"] == 1 and r["flops"]["network"] < 0.5 * r["flops"]["linear"]
    ]
    faster = [r for r in cheap if r["linear_over_auto"] > 1.0]
    return {
        "cells": len(rows),
        "auto_within_10pct_of_best": len(within),
        "worst_auto_over_best": max(r["auto_over_best"] for r in rows),
        "tuned_within_10pct_of_best": sum(r["tuned_over_best"] <= 1.10 for r in rows),
        "worst_tuned_over_best": max(r["tuned_over_best"] for r in rows),
        "median_auto_call_over_best": sorted(r["auto_call_over_best"] for r in rows)[len(rows) // 2],
        "one_token_cells_with_network_flops_under_half_dense": len(cheap),
        "of_those_faster_than_linear": len(faster),
    }


def markdown(rows: list[dict], summary: dict, meta: dict) -> list[str]:
    lines = [
        "# Layer benchmark: tensor network vs dense nn.Linear",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; threads {meta['threads']}; "
        "float32, inference mode. Times are the fastest of interleaved rounds in milliseconds "
        "(pathless einsum: one call, skipped where the previous token count extrapolates past 2 s).",
        "Written by `benchmarks/bench_layers.py`; raw data in `bench_layers.json`.",
        "",
        "| summary | value |", "|---|---|",
        *[f"| {k.replace('_', ' ')} | {v if not isinstance(v, float) else f'{v:.2f}'} |"
          for k, v in summary.items()],
        "",
        "`choice / best`: time of the strategy auto picks by the cost model over the faster of"
        " the two (the decision); `auto / best`: the auto call itself, dispatch included, measured"
        " separately; `tuned / best`: the strategy `autotune` picks from its own timings, scored"
        " by these.",
        "",
        "| shape | method | N | chi | params kept | tokens | linear | network | dense | auto"
        " (choice) | choice / best | auto / best | tuned (choice) | tuned / best | einsum no path"
        " | linear / auto | GFLOP net / dense-lin |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["seconds"]
        lines.append(
            f"| {r['in']}->{r['out']} | {r['method']} | {r['n_sites']} | {r['chi']} | "
            f"{r['params'] / r['dense_params']:.1%} | {r['tokens']} | {s['linear']*1e3:.3f} | "
            f"{s['network']*1e3:.3f} | {s['dense']*1e3:.3f} | {s['auto']*1e3:.3f} "
            f"({r['auto_choice']}) | {r['auto_over_best']:.2f} | {r['auto_call_over_best']:.2f} | "
            f"{r['tuned_choice']} | {r['tuned_over_best']:.2f} | "
            f"{fmt_ms(s['einsum'])} | "
            f"{r['linear_over_auto']:.2f} | {r['flops']['network']/1e9:.3g} / "
            f"{r['flops']['linear']/1e9:.3g} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid for a smoke run")
    parser.add_argument("--shapes", nargs="+", help="only these shapes, e.g. 4096x11008")
    parser.add_argument("--n-sites", type=int, nargs="+", help="only these site counts")
    parser.add_argument("--chi", type=int, nargs="+", help="only these bond dimensions")
    parser.add_argument("--tokens", type=int, nargs="+", help="only these token counts")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="only these")
    parser.add_argument("--stem", help="results file name (default: bench_layers, or "
                        "bench_layers_quick with --quick)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        grid = {"shapes": [(576, 1536), (1536, 576)], "n_sites": [3], "chi": [16, 64],
                "tokens": [1, 16, 512]}
        stem, scale = "bench_layers_quick", 0.25
    else:
        grid = {"shapes": [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008)],
                "n_sites": [3, 4], "chi": [16, 64], "tokens": [1, 16, 512, 2048]}
        stem, scale = "bench_layers", 1.0
    for key in ("n_sites", "chi", "tokens"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    if args.shapes:
        grid["shapes"] = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    grid["methods"] = args.methods or sorted(METHODS)
    stem = args.stem or stem
    rows = run(grid, scale)
    summary = summarise(rows)
    print(json.dumps(summary, indent=2))
    meta = machine(grid=grid, summary=summary)
    write_results(args.out, stem, meta, rows, markdown(rows, summary, meta))


if __name__ == "__main__":
    main()
