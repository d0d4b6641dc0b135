"""Compress SmolLM2-135M to half its attention/MLP parameters, then heal it on Austen.

    python examples/heal_smollm2.py [--keep 0.5] [--steps 300] [--work smollm2-heal]

1. ``compactify(ratio=keep, calibration=Emma)``: chi per layer under the budget, each layer fitted
   to its activations (saved to ``WORK/compressed``; reused when present).
2. ``heal``: next-token loss plus distillation from the dense model's logits, on 65,536 tokens
   of each Austen novel but Persuasion (one pass in 320 steps), batches of 4 x 256 tokens, bf16
   autocast where the CPU has AMX (``mixed_precision="auto"``). The training state is
   checkpointed to ``WORK/checkpoint`` every 25 steps: interrupt the script and rerun it to
   continue.
3. Held-out perplexity (Persuasion) before and after; the healed model goes to ``WORK/healed``.

Run time on 2 CPU cores (Xeon with AMX): a few minutes for step 1 and a few seconds per
healing step (``benchmarks/bench_heal_step.py`` times the default recipe's steps). The held-out
quality of healing on every domain is ``benchmarks/bench_pareto.py --heal-keep``'s to measure;
this script scores one held-out novel.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from tensornet_llm import compactify, heal, load_compactified, save_compactified
from tensornet_llm.helpers.data import (CALIBRATION_TEXTS, HEALING_TEXTS, HELD_OUT_TEXT, text_batches,
                                 tokenize_text)
from tensornet_llm.helpers.evaluate import perplexity
from tensornet_llm.helpers.models import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of parameters kept")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    parser.add_argument("--work", type=Path, default=Path("smollm2-heal"))
    args = parser.parse_args()
    torch.manual_seed(0)

    teacher, tokenizer = load_smollm2()
    held_out = tokenize_text(tokenizer, HELD_OUT_TEXT, args.tokens)
    compressed = args.work / "compressed"
    if (compressed / "tensornet.json").is_file():
        model = load_compactified(compressed)
        print(f"loaded {compressed}")
    else:
        model = copy.deepcopy(teacher)
        calib = text_batches(tokenizer, CALIBRATION_TEXTS[0], 4096, seq_len=512)
        report = compactify(model, ratio=args.keep, calibration=calib)
        print(report.summary())
        save_compactified(model, compressed, tokenizer=tokenizer)
    dense_ppl = perplexity(teacher, held_out, tokenizer=tokenizer)
    before = perplexity(model, held_out, tokenizer=tokenizer)
    print(f"perplexity: dense {dense_ppl:.2f}, compressed {before:.2f}")

    batches = text_batches(tokenizer, HEALING_TEXTS, 65536 * len(HEALING_TEXTS))
    result = heal(model, batches, steps=args.steps, lr=args.lr, teacher=teacher,
                  warmup_steps=20, checkpoint_dir=args.work / "checkpoint", checkpoint_every=25)
    after = perplexity(model, held_out, tokenizer=tokenizer)
    print(f"healed {result.steps} steps ({result.resumed_from} from an earlier run, "
          f"mixed precision {result.mixed_precision}) in {result.seconds:.0f} s; "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    print(f"perplexity: dense {dense_ppl:.2f}, compressed {before:.2f}, healed {after:.2f} "
          f"({after / dense_ppl:.2f}x dense)")
    save_compactified(model, args.work / "healed", tokenizer=tokenizer)
    print(f"saved {args.work / 'healed'}")


if __name__ == "__main__":
    main()
