"""What the SmolLM2 speed benchmarks share: their common options, and the models they time."""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
from torch import nn

from tensornet_llm import CompactifyConfig, compactify
from tensornet_llm.helpers.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def speed_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """``--keep``, ``--dtype``, ``--prompt``, ``--rounds``, ``--threads`` and ``--out``."""
    parser.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.5])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")


def timed_models(args: argparse.Namespace, parser: argparse.ArgumentParser,
                 own_rows: bool = False) -> dict[str, nn.Module]:
    """Dense SmolLM2 in ``args.dtype`` and ``compactify(model, ratio=keep)`` at each
    ``args.keep`` (default layouts, no calibration: speed does not depend on the weights'
    values), in eval mode, after checking the options and setting the threads. ``own_rows``:
    also each keep with ``CompactifyConfig(share_mlp_rows=False)`` (labelled ``", own rows"``),
    whose MLPs gather their ``gate_proj`` and ``up_proj`` outputs as before stop 38."""
    if not all(0 < k < 1 for k in args.keep):
        parser.error("--keep values must lie in (0, 1)")
    if args.rounds < 1 or args.prompt < 2:
        parser.error("--rounds must be at least 1 and --prompt at least 2")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, _ = load_smollm2()
    dense = dense.to(DTYPES[args.dtype]).eval()
    models = {"dense": dense}
    for keep in args.keep:
        for suffix, share in (("", True), *([(", own rows", False)] if own_rows else [])):
            model = copy.deepcopy(dense)
            compactify(model, ratio=keep, progress=False,
                       config=CompactifyConfig(share_mlp_rows=share))
            models[f"keep {keep:.0%}{suffix}"] = model.eval()
    return models


def run_meta(args: argparse.Namespace, **extra) -> dict:
    """The settings and machine of a run, for its results file."""
    return {"dtype": args.dtype, "prompt": args.prompt, **extra, "rounds": args.rounds,
            "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__}


def write_results(out: Path, stem: str, meta: dict, rows: list[dict], lines: list[str]) -> None:
    """``<out>/<stem>.json`` (``meta`` and ``rows``) and ``<out>/<stem>.md`` (``lines``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'{stem}.md'}")
