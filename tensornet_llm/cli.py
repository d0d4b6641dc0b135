"""Command line: ``tensornet-llm compress`` and ``tensornet-llm eval``.

    tensornet-llm compress smollm2 --chi 64 --out smollm2-chi64
    tensornet-llm compress path/to/hf-model-dir --chi 32 --method ttns --exclude layers.0. --out out/
    tensornet-llm compress model.gguf --chi 48 --out out/
    tensornet-llm compress smollm2 --chi 64 --calibration austen_emma.txt --out smollm2-fit
    tensornet-llm eval smollm2-chi64 --text data/austen_persuasion.txt

MODEL is ``smollm2`` (the bundled SmolLM2-135M-Instruct), a GGUF file, a Hugging Face model
directory, or a directory written by ``compress``. Errors print one line and exit with status 2;
outputs are written to a temporary directory and renamed into place, never half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["main", "load_any"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """An error reported as one line."""


def load_any(spec: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer or None)`` from ``smollm2``, a GGUF file, a Hugging Face directory or
    a compactified directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import load_gguf, load_smollm2
    from .serialization import STRUCTURE_FILE, load_compactified

    if spec == "smollm2":
        return load_smollm2(dtype=dtype)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype)
    if not path.is_dir():
        raise CliError(f"MODEL {spec!r} is not 'smollm2', a .gguf file or a model directory")
    if (path / STRUCTURE_FILE).is_file():
        model = load_compactified(path, dtype=dtype)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    else:
        raise CliError(f"{path} has neither config.json nor {STRUCTURE_FILE}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def _chi(value: str) -> int:
    try:
        chi = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}") from None
    if chi < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {chi}")
    return chi


def cmd_compress(args: argparse.Namespace) -> None:
    from .compactify import compactify
    from .serialization import save_compactified

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} exists; pass --overwrite to replace it")
    model, tokenizer = load_any(args.model, DTYPES[args.dtype])
    calibration = None
    if args.calibration:
        from .data import token_batches, tokenize_text

        if tokenizer is None:
            raise CliError(f"{args.model} has no tokenizer to read --calibration with")
        ids = tokenize_text(tokenizer, args.calibration, args.calibration_tokens)
        calibration = list(token_batches(ids, seq_len=512, batch_size=4))
        if not calibration:
            raise CliError(f"--calibration {args.calibration} has fewer than 512 tokens")
    report = compactify(
        model, chi=args.chi, method=args.method, n_sites=args.n_sites, tol=args.tol,
        exclude=args.exclude or None, calibration=calibration, fit_steps=args.fit_steps,
        progress=not args.quiet,
    )
    print(report)
    settings = {"chi": args.chi, "method": args.method, "n_sites": args.n_sites, "tol": args.tol,
                "exclude": args.exclude, "source": args.model, "calibration": args.calibration,
                "calibration_tokens": args.calibration_tokens if args.calibration else None,
                "fit_steps": args.fit_steps if args.calibration else None}
    save_compactified(model, out, tokenizer=tokenizer, compactify=settings)
    (out / "report.json").write_text(report.to_json())
    print(f"saved to {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .data import tokenize_text
    from .evaluate import model_size_bytes, perplexity

    model, tokenizer = load_any(args.model, DTYPES[args.dtype])
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer; save one with the model")
    ids = tokenize_text(tokenizer, args.text, args.tokens)
    if ids.numel() < args.window:
        raise CliError(f"--text has {ids.numel()} tokens, fewer than --window {args.window}")
    t0 = time.perf_counter()
    ppl = perplexity(model, ids, window=args.window, progress=not args.quiet)
    result = {
        "model": args.model, "text": str(args.text), "tokens": int(ids.numel() // args.window * args.window),
        "window": args.window, "perplexity": ppl,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_mb": model_size_bytes(model) / 1e6, "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(result, indent=2) if args.json else (
        f"perplexity {ppl:.3f} on {result['tokens']} tokens of {args.text} "
        f"({args.window}-token windows); {result['parameters']:,} parameters, "
        f"{result['size_mb']:.1f} MB"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensornet-llm", description="Compress transformer language models with tensor networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="tensorize a model's attention and MLP layers and save it")
    p.add_argument("model", help="smollm2, a .gguf file, or a Hugging Face model directory")
    p.add_argument("--chi", type=_chi, required=True, help="bond dimension (integer >= 1)")
    p.add_argument("--method", choices=["mpo", "ttns"], default="mpo")
    p.add_argument("--n-sites", type=int, default=3, help="sites per layer (default 3)")
    p.add_argument("--tol", type=float, help="relative weight tolerance; bonds may keep fewer values")
    p.add_argument("--exclude", nargs="*", help="module patterns to keep dense, e.g. layers.0.")
    p.add_argument("--calibration", help="text file (or bundled name) to fit the layers to; "
                   "without it the weights alone are decomposed")
    p.add_argument("--calibration-tokens", type=int, default=4096,
                   help="calibration tokens, in 512-token windows (default 4096)")
    p.add_argument("--fit-steps", type=int, default=50, help="L-BFGS steps per layer (default 50)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity, parameters and size of a model")
    p.add_argument("model", help="a directory written by compress, smollm2, a .gguf or a HF directory")
    p.add_argument("--text", required=True, help="a text file, or a bundled text name")
    p.add_argument("--tokens", type=int, default=8192, help="tokens to score (default 8192)")
    p.add_argument("--window", type=int, default=512, help="window length (default 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"tensornet-llm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
