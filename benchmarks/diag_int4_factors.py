"""Why int4 costs more on low-rank factors than on dense weights: per layer of a compactified
SmolLM2, the relative error of the int4 product ``U V`` against int4 on the dense weight, each
factor's own rounding error, how spread out the entries are (max / rms per row), and what
re-fitting one factor to the other's rounded values recovers.

    python benchmarks/diag_int4_factors.py [--model DIR] [--layers 9]

``--model``: a directory written by ``save_compactified`` (default: the keep-50% model that
``bench_pareto.py`` caches). Prints one line per low-rank layer; writes nothing.
"""

from __future__ import annotations

import argparse

import torch

from tensornet_llm import load_compactified
from tensornet_llm.helpers.models import default_cache_dir, load_smollm2
from tensornet_llm.layers.quantized import INT4_GROUP_SIZE, QuantizedWeight


def rounded(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return QuantizedWeight(t.float(), 4, INT4_GROUP_SIZE, channel_dim)().to(t)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def spread(t: torch.Tensor) -> float:
    return float((t.abs().amax(1) / t.pow(2).mean(1).sqrt()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(default_cache_dir() / "bench" /
                                               "pareto-keep0.5-mix16384-rows8"))
    parser.add_argument("--layers", type=int, default=9)
    args = parser.parse_args()
    model = load_compactified(args.model).eval()
    dense = dict(load_smollm2()[0].named_modules())
    shown = 0
    for name, module in model.named_modules():
        if not getattr(module, "is_low_rank", False) or shown == args.layers:
            continue
        shown += 1
        u, v = (c.detach().double() for c in module.cores)
        a, b = u.reshape(u.shape[1], u.shape[-1]), v.reshape(v.shape[0], v.shape[2])
        w, wd = a @ b, dense[name].weight.detach().double()
        # Channels as quantize() picks them for these cores: U per rank column, V per rank row.
        aq, bq = rounded(u, -1).reshape(a.shape), rounded(v, 0).reshape(b.shape)
        refit = torch.linalg.lstsq(bq.T, w.T).solution.T  # U fitted to the rounded V
        print(f"{name:34s} rank {a.shape[1]:4d}  int4 U V {relative(aq @ bq, w):.3f}  "
              f"int4 dense {relative(rounded(wd, 0), wd):.3f}  U alone {relative(aq, a):.3f}  "
              f"V alone {relative(bq, b):.3f}  refit U {relative(rounded(refit, -1) @ bq, w):.3f}  "
              f"max/rms V {spread(b):.1f} dense {spread(wd):.1f}", flush=True)


if __name__ == "__main__":
    main()
