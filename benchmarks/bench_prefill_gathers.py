"""What the kept-rows layers' output gathers cost in prefill (SmolLM2-135M).

A kept-rows layer (``InterpolativeLinear``, the default low-rank storage) computes its outputs
in the order ``[kept rows, other rows]`` and then gathers them back into the weight's row
order: one pass over a ``(tokens, out)`` tensor that ``nn.Linear`` does not make. This times
one prefill forward (``--prompt`` tokens, batch 1, logits of the last position only) of the
dense model and of ``compactify(model, ratio=keep)`` at each ``--keep`` (default layouts, no
calibration: speed does not depend on the weights' values), and of two *timing-only* variants
of every compressed model whose layers skip that gather and return their outputs unordered:

* **no gather in gate/up**: only the MLPs' ``gate_proj`` and ``up_proj``, the two widest
  outputs, whose gathers a shared row order for the pair (with the permutation folded into
  ``down_proj``'s input) could remove without changing what the model computes;
* **no gather anywhere**: every kept-rows layer, the most that removing gathers can give.

Since stop 38 ``compactify`` gives each MLP's ``gate_proj`` and ``up_proj`` one row order and
runs the MLP without their gathers (``share_mlp_rows``): the ``keep N%`` rows time that, and the
variants are made from ``keep N%, own rows`` (``CompactifyConfig(share_mlp_rows=False)``, each
layer with its own rows and gathers, as before), so the shared order can be compared with the
bound it was built to reach.

In a 2-byte dtype on the CPU a kept-rows layer orders its outputs without a gather, by
multiplying with ``U = P^T [I; Y]`` built on each call; there the variants skip that instead
(building ``U`` and the multiply-adds of its identity rows). The variants compute wrong outputs
on purpose (their features are out of order); they bound what an implementation without the
ordering work could reach, nothing more. Models are interleaved
round by round in one process; the fastest of ``--rounds`` rounds counts (the first round
warms up). Writes ``<out>/bench_prefill_gathers.{json,md}``.

    python benchmarks/bench_prefill_gathers.py                    # keep 80% and 50%, float32
    python benchmarks/bench_prefill_gathers.py --dtype bfloat16 \
        --out docs/results/bench_prefill_gathers_bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import types

import torch
from torch import nn

from _speed import run_meta, speed_arguments, timed_models, write_results
from tensornet_llm.layers.interpolative import InterpolativeLinear, unordered_outputs

WIDE = ("gate_proj", "up_proj")  # the MLP's input-side pair: same input, elementwise product


def unordered_forward(self: InterpolativeLinear, x: torch.Tensor) -> torch.Tensor:
    """``[x Z^T, x Z^T Y^T] + b`` left in kept-rows order (no gather): timing only."""
    y_core, z_core = self.cores._parameters.values()
    r = z_core.shape[0]
    out = unordered_outputs(x, z_core.view(r, self.in_features), y_core.view(-1, r))
    if self.bias is not None:
        out.add_(self.bias)
    return out.view(*x.shape[:-1], self.out_features)


def without_gathers(model: nn.Module, only: tuple[str, ...] | None) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose kept-rows layers (those named ``*.<one of only>``, or all)
    skip the output gather; and how many layers that is."""
    model = copy.deepcopy(model)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, InterpolativeLinear) and (
                only is None or name.rsplit(".", 1)[-1] in only):
            module.forward = types.MethodType(unordered_forward, module)
            count += 1
    return model, count


@torch.inference_mode()
def prefill_seconds(model: nn.Module, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=prompt, logits_to_keep=1, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    speed_arguments(parser, rounds=7)
    args = parser.parse_args()
    models: dict[str, nn.Module] = {}
    skipped: dict[str, int] = {}
    for label, model in timed_models(args, parser, own_rows=True).items():
        models[label], skipped[label] = model, 0
        if not label.endswith("own rows"):
            continue
        for variant, only in (("no gather in gate/up", WIDE), ("no gather anywhere", None)):
            name = f"{label}, {variant}"
            models[name], skipped[name] = without_gathers(model, only)
    prompt = torch.randint(100, 10000, (1, args.prompt))
    best = dict.fromkeys(models, math.inf)
    for round_ in range(args.rounds + 1):  # the first round warms up
        for name, model in models.items():
            seconds = prefill_seconds(model, prompt)
            if round_:
                best[name] = min(best[name], seconds)
    rows = [{"model": name, "gathers_skipped": skipped[name], "prefill_ms": s * 1e3,
             "tokens_per_s": args.prompt / s, "vs_dense": best["dense"] / s}
            for name, s in best.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    meta = run_meta(args)
    lines = [
        "# Prefill: what the kept-rows layers' output gathers cost (SmolLM2-135M)", "",
        f"One forward of a {args.prompt}-token prompt, batch 1, {args.dtype}, {args.threads} "
        f"CPU threads ({meta['machine']}, torch {meta['torch']}); fastest of {args.rounds} "
        "interleaved rounds. The *no gather* rows are timing-only variants whose layers leave "
        "their outputs unordered (wrong outputs): a bound on what removing the gathers could "
        "give. Written by `benchmarks/bench_prefill_gathers.py`.", "",
        "| model | layers without gather | prefill | tokens/s | vs dense |",
        "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['gathers_skipped']} | {r['prefill_ms']:.0f} ms | "
                     f"{r['tokens_per_s']:.0f} | {r['vs_dense']:.2f}x |")
    write_results(args.out, "bench_prefill_gathers", meta, rows, lines)


if __name__ == "__main__":
    main()
