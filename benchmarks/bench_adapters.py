"""LoRA on a compressed model: one adapter per whole layer, or peft's own on the nn.Linear factors.

    python benchmarks/bench_adapters.py [--keep 0.8] [--rank 8] [--steps 40] [--out DIR]

SmolLM2-135M compressed with ``compactify(ratio=keep, calibration=calibration_mix(...))``
(kept-rows layers), then trained two ways from the same start, the same data and optimiser:

* **whole layer**: ``tensornet_llm.lora_config(target_modules=[q, k, v, o, gate, up, down])``,
  one adapter ``B A`` beside each compressed layer (and on the projections left dense);
* **factors**: a plain ``peft.LoraConfig(target_modules="all-linear")``, peft's own adapters on
  every ``nn.Linear``, the compressed layers' ``kept`` / ``others`` factors included (these
  merge exactly).

Both with rank ``--rank``, alpha twice the rank, AdamW (lr ``--lr``) for ``--steps`` steps of
4 x 256 ``healing_mix`` tokens; perplexity on ``--tokens`` held-out tokens of every domain
before and after. Writes ``<out>/bench_adapters.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import peft
import torch

from tensornet_llm import compactify, lora_config
from tensornet_llm.helpers.data import calibration_mix, healing_mix
from tensornet_llm.helpers.evaluate import perplexity_table

from harness import RESULTS, machine, smollm2, write_results

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def train(model, config, batches: list, steps: int, lr: float) -> tuple[torch.nn.Module, dict]:
    """``model`` with adapters from ``config`` after ``steps`` AdamW steps; trainable count and
    seconds."""
    adapted = peft.get_peft_model(copy.deepcopy(model), config)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    adapted.train()
    start = time.perf_counter()
    for step in range(steps):
        ids = batches[step % len(batches)]
        adapted(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    info = {"trainable": sum(p.numel() for p in params), "seconds": time.perf_counter() - start}
    return adapted.eval(), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens per domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 0 < args.keep < 1 or args.rank < 1 or args.steps < 1:
        parser.error("--keep must lie in (0, 1); --rank and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tokenizer = smollm2()
    model = copy.deepcopy(dense)
    compactify(model, ratio=args.keep, progress=False,
               calibration=calibration_mix(tokenizer, args.calibration_tokens, seq_len=512))
    batches = healing_mix(tokenizer, args.steps * 4 * 256, seq_len=256, batch_size=4)
    rows = [{"label": "before", "trainable": 0, "seconds": 0.0,
             "perplexity": perplexity_table(model, tokenizer, args.tokens)}]
    alpha = 2 * args.rank
    for label, config in (
            ("whole layer (lora_config)",
             lora_config(r=args.rank, lora_alpha=alpha, target_modules=PROJECTIONS)),
            ("factors (LoraConfig all-linear)",
             peft.LoraConfig(r=args.rank, lora_alpha=alpha, target_modules="all-linear"))):
        adapted, info = train(model, config, batches, args.steps, args.lr)
        rows.append({"label": label, **info,
                     "perplexity": perplexity_table(adapted, tokenizer, args.tokens)})
        print(rows[-1], flush=True)
    names = list(rows[0]["perplexity"])
    lines = [f"# LoRA on a compressed model: whole layers or their factors (SmolLM2-135M, keep "
             f"{args.keep:.0%})", "",
             f"Rank {args.rank}, alpha {alpha}, {args.steps} AdamW steps (lr {args.lr}) of 4 x 256 "
             f"`healing_mix` tokens; held-out perplexity on {args.tokens} tokens per domain. "
             "Written by `benchmarks/bench_adapters.py` (one run).", "",
             "| adapters | trainable | train seconds | " + " | ".join(names)
             + " | geometric mean |", "|" + "---|" * (len(names) + 4)]
    for r in rows:
        ppl = r["perplexity"]
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['seconds']:.0f} | "
                     + " | ".join(f"{ppl[n]:.2f}" for n in names)
                     + f" | {geomean(ppl.values()):.2f} |")
    meta = machine(keep=args.keep, rank=args.rank, steps=args.steps, lr=args.lr,
                   calibration_tokens=args.calibration_tokens, tokens=args.tokens)
    write_results(args.out, "bench_adapters", meta, rows, lines)


if __name__ == "__main__":
    main()
