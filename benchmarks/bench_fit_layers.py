"""Activation-weighted error of single SmolLM2 layers: TT-SVD, the data-aware fit at several
step counts, and whitened SVD (SVD-LLM) at the same parameter count.

    python benchmarks/bench_fit_layers.py [--chi 48] [--calibration-tokens 2048]

Covariances from the dense model on Emma. Error is ``||(W - W_hat) L|| / ||W L||`` with
``C = L L^T``. Writes ``docs/results/bench_fit_layers.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tensornet_llm import MPOLinear
from tensornet_llm.compress.calibrate import as_batches, collect_covariances
from tensornet_llm.helpers.data import token_batches, tokenize_text
from tensornet_llm.compress.fit import fit_weighted, weighted_error, whitened_svd
from tensornet_llm.helpers.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["model.layers.10.mlp.up_proj", "model.layers.10.self_attn.q_proj",
          "model.layers.20.mlp.down_proj"]
STEPS = (30, 100, 300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chi", type=int, default=48)
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    ids = tokenize_text(tokenizer, "austen_emma.txt", args.calibration_tokens)
    modules = {n: model.get_submodule(n) for n in LAYERS}
    covs = collect_covariances(model, as_batches(token_batches(ids, 512, 4)), modules)
    lines = ["# Data-aware fit of single SmolLM2 layers", "",
             f"MPO chi {args.chi}, 3 sites; covariances from {ids.numel()} tokens of Emma through "
             "the dense model. Activation-weighted relative error (lower is better); fit times in "
             "seconds on 2 CPU threads. Written by `benchmarks/bench_fit_layers.py`.", "",
             "| layer | params kept | TT-SVD | " + " | ".join(f"fit {s} steps" for s in STEPS)
             + " | whitened SVD, same params |", "|---|---|---|" + "---|" * (len(STEPS) + 1)]
    for name, module in modules.items():
        w, cov = module.weight.detach(), covs.covariance(name)
        base = MPOLinear.from_linear(module, chi=args.chi)
        rank = max(1, base.num_parameters // (w.shape[0] + w.shape[1]))
        cells = [f"{base.num_parameters / w.numel():.0%}",
                 f"{weighted_error(base.to_dense().detach(), w, cov):.3f}"]
        for steps in STEPS:
            layer = MPOLinear.from_linear(module, chi=args.chi)
            t0 = time.perf_counter()
            fit_weighted(layer, w, cov, steps=steps)
            cells.append(f"{weighted_error(layer.to_dense().detach(), w, cov):.3f} "
                         f"({time.perf_counter() - t0:.1f} s)")
        cells.append(f"{weighted_error(whitened_svd(w, cov, rank), w, cov):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    (ROOT / "docs" / "results" / "bench_fit_layers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
