"""One decoded token through many layers of one shape: where a low-rank layer's decode time goes.

Decode at batch 1 reads every weight once per token, from memory rather than cache, so its
time should follow the bytes read. This measures how closely it does, layer by layer: for each
shape, dtype and keep it builds ``--megabytes`` of distinct dense ``nn.Linear`` layers (so the
weights stream from memory as in a model) and the same number of

* ``kept rows``    the default low-rank layout (:class:`InterpolativeLinear`),
                   rank ``r`` with ``r (in + out - r)`` = keep of the dense parameters;
* ``two factors``  ``W = U V`` (:class:`MPOLinear`, low rank), ``r (in + out)`` = keep,

ranks rounded down to a multiple of 8 as the budget rounds them. One round calls every layer of
a variant once with one token, variants interleaved round by round; the fastest round counts.
``speed`` is dense time over the variant's time (above 1: faster); ``bytes`` is the variant's
weight bytes over dense. A layer whose time followed its bytes would have
``speed = 1 / bytes``.

    python benchmarks/bench_decode_layers.py                 # SmolLM2's shapes, ~2 minutes
    python benchmarks/bench_decode_layers.py --shapes 4096x11008 --megabytes 1024
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

from tensornet_llm.compress.budget import RANK_MULTIPLE
from tensornet_llm.layers import Layout

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rank_for(keep: float, n_in: int, n_out: int, kept_rows: bool) -> int:
    """The largest multiple of 8 whose layer holds at most ``keep`` of the dense parameters."""
    budget = keep * n_in * n_out
    if kept_rows:  # r (in + out - r) <= budget, the smaller root
        s = n_in + n_out
        r = (s - math.sqrt(s * s - 4 * budget)) / 2
    else:
        r = budget / (n_in + n_out)
    return max(RANK_MULTIPLE, int(r) // RANK_MULTIPLE * RANK_MULTIPLE)


def copies_of(layer: nn.Module, n: int) -> list[nn.Module]:
    """``n`` layers with their own storage (deep copies), so no two share cached weights."""
    return [layer] + [copy.deepcopy(layer) for _ in range(n - 1)]


@torch.no_grad()
def measure(n_in: int, n_out: int, dtype: torch.dtype, keeps: list[float], megabytes: float,
            rounds: int) -> list[dict]:
    count = max(4, math.ceil(megabytes * 2**20 / (n_in * n_out * dtype.itemsize)))
    weight = torch.randn(n_out, n_in) / math.sqrt(n_in)
    dense = nn.Linear(n_in, n_out, bias=False)
    dense.weight.copy_(weight)
    variants = {"dense": copies_of(dense.to(dtype), count)}
    ranks = {}
    for keep in keeps:
        for kept_rows, form in ((True, "kept rows"), (False, "two factors")):
            r = rank_for(keep, n_in, n_out, kept_rows)
            layer = Layout.low_rank(n_in, n_out, rows=kept_rows).decompose(weight, None, r)
            variants[(keep, form)] = copies_of(layer.to(dtype), count)
            ranks[(keep, form)] = r
    x = torch.randn(1, 1, n_in, dtype=dtype)
    best = {name: math.inf for name in variants}
    for _ in range(rounds + 1):  # the first round warms up
        for name, layers in variants.items():
            t0 = time.perf_counter()
            for layer in layers:
                layer(x)
            best[name] = min(best[name], time.perf_counter() - t0)
    dense_bytes = n_in * n_out
    rows = []
    for name, layers in variants.items():
        params = sum(p.numel() for p in layers[0].parameters())
        keep, form = (None, "dense") if name == "dense" else name
        rows.append({
            "shape": f"{n_in}x{n_out}", "dtype": str(dtype).removeprefix("torch."),
            "keep": keep, "form": form, "rank": ranks.get(name), "layers": count,
            "us_per_layer": best[name] / count * 1e6, "bytes": params / dense_bytes,
            "speed": best["dense"] / best[name],
            "gb_per_s": params * dtype.itemsize * count / best[name] / 1e9,
        })
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| shape (in x out) | dtype | keep | form | rank | bytes vs dense | time per layer "
             "| speed vs dense | bytes-proportional speed | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        keep = "" if r["keep"] is None else f"{r['keep']:.0%}"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {keep} | {r['form']} | {r['rank'] or ''} | "
            f"{r['bytes']:.2f} | {r['us_per_layer']:.1f} us | {r['speed']:.2f}x | "
            f"{1 / r['bytes']:.2f}x | {r['gb_per_s']:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+",
                        default=["576x576", "576x192", "576x1536", "1536x576"],
                        help="in x out, e.g. 576x1536 (default: SmolLM2-135M's)")
    parser.add_argument("--keep", nargs="+", type=float, default=[0.8, 0.5])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--megabytes", type=float, default=384,
                        help="dense weight bytes per variant, far above the CPU's caches")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "bench_decode_layers"))
    args = parser.parse_args()
    shapes = []
    for shape in args.shapes:
        try:
            n_in, n_out = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            parser.error(f"--shapes: {shape!r} is not IN x OUT, e.g. 576x1536")
        shapes.append((shape, n_in, n_out))
    if not all(0 < k < 1 for k in args.keep):
        parser.error("--keep values must lie in (0, 1)")
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtypes:
        for shape, n_in, n_out in shapes:
            print(f"{shape} {dtype} ...", flush=True)
            rows += measure(n_in, n_out, DTYPES[dtype], args.keep, args.megabytes, args.rounds)
    meta = {"threads": args.threads, "megabytes": args.megabytes, "rounds": args.rounds,
            "machine": platform.machine(), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = ["# One decoded token per layer: time against bytes", "",
            f"Batch 1, one token, {args.threads} CPU threads ({meta['machine']}, torch "
            f"{meta['torch']}); each variant is {args.megabytes:.0f} MB of distinct dense "
            "layers or as many low-rank ones, so weights come from memory; fastest of "
            f"{args.rounds} interleaved rounds. Written by `benchmarks/bench_decode_layers.py`.",
            "", *table(rows), "",
            "\"bytes-proportional speed\": what the layer would reach if its time followed the "
            "bytes it reads (1 / bytes vs dense)."]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
