"""One process of the multi-process healing test (launched by tests/test_heal_distributed.py).

    python heal_worker.py OUT [--concatenate] [--steps N] [--checkpoint DIR]

Heals a tiny compactified LLaMA on 8 fixed batches (or, with ``--concatenate``, on the 4
concatenations of consecutive pairs) and, on the main process, saves its parameters and
losses to OUT.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import build  # noqa: E402

from tensornet_llm import compactify, heal  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--concatenate", action="store_true")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--checkpoint")
args = ap.parse_args()

torch.set_num_threads(1)
model = build("llama")
compactify(model, chi=4, progress=False)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(2, 96, (2, 12), generator=g) for _ in range(8)]
if args.concatenate:
    batches = [torch.cat(batches[i:i + 2]) for i in range(0, len(batches), 2)]
result = heal(model, batches, steps=args.steps, lr=1e-2, warmup_steps=0, schedule="constant",
              mixed_precision="no", progress=False, checkpoint_dir=args.checkpoint,
              checkpoint_every=1)
if int(__import__("os").environ.get("RANK", "0")) == 0:
    torch.save({"state": model.state_dict(), "losses": result.losses, "tokens": result.tokens,
                "resumed_from": result.resumed_from}, args.out)
