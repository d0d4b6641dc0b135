"""One process of the multi-process healing test (launched by tests/test_heal_distributed.py).

    python heal_worker.py OUT [--concatenate] [--precision P] [--checkpoint DIR]
                              [--crash-after K]

Heals a tiny compactified LLaMA on 8 fixed batches (or, with ``--concatenate``, on the 4
concatenations of consecutive pairs) with :func:`heal`'s defaults (learning rate, warm-up and
cosine schedule, clipping, trained parameters, mixed precision unless ``--precision`` names
one) for ``STEPS`` steps, enough to pass the warm-up into the decay, and, on the main process,
saves its parameters and losses to OUT. ``--crash-after K`` exits after step K (after any
checkpoint of that step), as an interrupted run would.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import build  # noqa: E402

from tensornet_llm import HealConfig, compactify, heal  # noqa: E402

STEPS = HealConfig.warmup_steps + 6  # the warm-up, then six steps of the cosine decay

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--concatenate", action="store_true")
ap.add_argument("--precision")
ap.add_argument("--checkpoint")
ap.add_argument("--crash-after", type=int)
args = ap.parse_args()

torch.set_num_threads(1)
model = build("llama")
compactify(model, chi=4, progress=False)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(2, 96, (2, 12), generator=g) for _ in range(8)]
if args.concatenate:
    batches = [torch.cat(batches[i:i + 2]) for i in range(0, len(batches), 2)]
options = {} if args.precision is None else {"mixed_precision": args.precision}
if args.checkpoint is not None:
    # One checkpoint inside the decay (and one at the end): a resumed run must pick up the
    # schedule there, not start the warm-up again.
    options.update(checkpoint_dir=args.checkpoint, checkpoint_every=HealConfig.warmup_steps + 2)


def crash(step, _):
    if step == args.crash_after:
        raise SystemExit(3)


result = heal(model, batches, steps=STEPS, progress=False, **options,
              callback=None if args.crash_after is None else crash)
if int(os.environ.get("RANK", "0")) == 0:
    torch.save({"state": model.state_dict(), "losses": result.losses, "tokens": result.tokens,
                "resumed_from": result.resumed_from, "precision": result.mixed_precision},
               args.out)
