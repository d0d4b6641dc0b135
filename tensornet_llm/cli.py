"""Command line: ``tensornet-llm compress | eval | profile | heal | quantize``.

    tensornet-llm compress smollm2 --chi 64 --out smollm2-chi64
    tensornet-llm compress path/to/hf-model-dir --chi 32 --method ttns --exclude layers.0. --out out/
    tensornet-llm compress model.gguf --chi 48 --out out/
    tensornet-llm compress path/to/hf-model-dir --ratio 0.5 --stream --out out/  # block by block
    tensornet-llm compress smollm2 --ratio 0.8 --out smollm2-r80     # calibrated on the mixture
    tensornet-llm eval smollm2-r80 --dense smollm2      # held-out perplexity of every domain
    tensornet-llm eval smollm2-r80 --text austen_persuasion.txt
    tensornet-llm profile smollm2 --out smollm2-profile
    tensornet-llm heal smollm2-r80 --steps 200 --teacher smollm2 --out healed
    tensornet-llm quantize healed --bits 8 --out healed-int8

MODEL is ``smollm2`` (the bundled SmolLM2-135M-Instruct), a GGUF file, a Hugging Face model
directory, or a directory written by ``compress``. Bad input (the library's own
:class:`~tensornet_llm.errors.TensornetError`) prints one line and exits with status 2; anything
else is a bug and shows its traceback. ``--out`` is checked before any work: an existing path
needs ``--overwrite``, and one that cannot be created is refused. Every file of an output is
written to a temporary directory that is renamed into place, never half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .cli_options import add_field, settings_from
from .compress.config import OUTPUT_METRICS, CompactifyConfig
from .errors import TensornetError, first_line
from .train.heal import HealConfig
from .train.quantize_selection import QuantizeConfig

__all__ = ["main", "load_any"]

#: ``--dtype`` choices; ``auto`` (the default) keeps the checkpoint's own dtype (its config's
#: ``dtype``; float32 for a de-quantized GGUF file), as ``from_pretrained(dtype="auto")`` does.
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class CliError(TensornetError):
    """A bad command line, reported as one line."""


def load_any(spec: str, dtype: torch.dtype | None = None):
    """``(model, tokenizer or None)`` from ``smollm2``, a GGUF file, a Hugging Face directory or
    a compactified directory, in ``dtype`` (``None``: the checkpoint's own; float32 for GGUF,
    whose quantized weights are de-quantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .helpers.models import load_gguf, load_smollm2
    from .saving.serialization import STRUCTURE_FILE, load_compactified

    if spec == "smollm2":
        return load_smollm2(dtype=dtype or torch.float32)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype or torch.float32)
    if not path.is_dir():
        raise CliError(f"MODEL {spec!r} is not 'smollm2', a .gguf file or a model directory")
    if (path / STRUCTURE_FILE).is_file():
        model = load_compactified(path, dtype=dtype)
    elif (path / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()
        except (OSError, ValueError) as exc:  # transformers' words for a broken directory
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CliError(f"MODEL {path} cannot be loaded as a Hugging Face model: {first}"
                           ) from exc
    else:
        raise CliError(f"{path} has neither config.json nor {STRUCTURE_FILE}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def _at_least(lowest: int):
    """An argparse type: an integer >= ``lowest``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {lowest}, got {value!r}") from None
        if number < lowest:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lowest}, got {number}")
        return number

    return parse


_chi = _positive = _at_least(1)
_non_negative = _at_least(0)


def _number(ok: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    """An argparse type: a number for which ``ok`` holds (``allowed`` says which, in errors)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value!r}") from None
        if not ok(number):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {number}")
        return number

    return parse


_fraction = _number(lambda v: 0 < v <= 1, "a number in (0, 1]")
_saving = _number(lambda v: 0 <= v < 1, "a number in [0, 1)")
_positive_float = _number(lambda v: v > 0 and math.isfinite(v), "a positive number")
_non_negative_float = _number(lambda v: v >= 0 and math.isfinite(v), "a number >= 0")


def _text_batches(model_name: str, tokenizer, text: str | list[str] | None, n_tokens: int | None,
                  seq_len: int, batch_size: int, option: str, model=None) -> list:
    """Token windows ``(batch, seq_len + 1)`` of one text file or several, for calibration or
    healing; without a text, the bundled mixture of every domain's fit part. Each window starts
    with the start token of ``tokenizer`` and ``model`` (or its config)."""
    from .helpers.data import healing_mix, text_batches

    if tokenizer is None:
        raise CliError(f"{model_name} has no tokenizer to read {option} with")
    if text is None:
        return healing_mix(tokenizer, n_tokens or 65536, seq_len, batch_size, model=model)
    names = [text] if isinstance(text, str) else text
    batches = text_batches(tokenizer, names, n_tokens, seq_len, batch_size, model=model)
    if not batches:
        raise CliError(f"{option} {' '.join(names)} has fewer than {seq_len} tokens")
    return batches


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``--out`` without ``--overwrite``, and one that cannot be created,
    before any work starts."""
    from .helpers.files import check_output

    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CliError(f"--out {out} exists; pass --overwrite to replace it")
    check_output(out, overwrite=True)


def cmd_compress(args: argparse.Namespace) -> None:
    from .compress.compactify import compactify
    from .saving.serialization import save_compactified

    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.stream:
        return _compress_streaming(args, out)
    model, tokenizer = load_any(args.model, DTYPES[args.dtype])
    calibration = None
    if not args.no_calibration:  # a file, or by default the mixture of every domain's fit part
        calibration = _text_batches(args.model, tokenizer, args.calibration,
                                    args.calibration_tokens, 512, 4, "--calibration", model)
    report = compactify(model, calibration=calibration, progress=not args.quiet,
                        config=CompactifyConfig(**settings_from(args, CompactifyConfig)))
    print(report)
    save_compactified(model, out, tokenizer=tokenizer, overwrite=args.overwrite,
                      files={"report.json": report.to_json()}, compactify=_settings(args))
    print(f"saved to {out}")


def _settings(args: argparse.Namespace) -> dict:
    """The command's settings, recorded in the output's ``tensornet.json``."""
    calibrated = not args.no_calibration
    return {"chi": args.chi, "ratio": args.ratio, "method": args.method,
            "n_sites": args.n_sites, "tol": args.tol, "exclude": args.exclude,
            "source": args.model, "stream": args.stream,
            "calibration": args.calibration or "mixture" if calibrated else None,
            "calibration_tokens": args.calibration_tokens if calibrated else None,
            "fit_steps": args.fit_steps if calibrated else None,
            "low_rank": args.low_rank if args.ratio is not None else None,
            "weigh_outputs": (args.weigh_outputs
                              if args.ratio is not None and calibrated and not args.stream
                              else None),
            "output_metric": (args.output_metric
                              if args.ratio is not None and calibrated and not args.stream
                              and args.weigh_outputs else None),
            "cross_layer": args.cross_layer, "low_rank_storage":
                "kept rows" if args.interpolative else "factors",
            "min_saving": args.min_saving if args.ratio is not None else None,
            "call_cost": args.call_cost if args.ratio is not None else None,
            "slim_mlp": (args.slim_mlp if args.ratio is not None and calibrated
                         and not args.stream else None),
            "slim_attention": (args.slim_attention if args.ratio is not None and calibrated
                               and not args.stream else None),
            "lm_head": args.lm_head}


def _saved_dtype(config) -> torch.dtype:
    """The floating dtype a Hugging Face config names (float32 where it names none)."""
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    return saved if isinstance(saved, torch.dtype) and saved.is_floating_point else torch.float32


def _compress_streaming(args: argparse.Namespace, out: Path) -> None:
    """``compress DIR --stream``: block by block from the checkpoint, never the whole model."""
    from transformers import AutoConfig, AutoTokenizer

    from .compress.stream import compactify_pretrained

    source = Path(args.model)
    if not (source / "config.json").is_file():
        raise CliError(f"--stream reads a Hugging Face model directory with safetensors "
                       f"weights; MODEL {args.model!r} is not one")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:  # transformers' words for a broken config
        raise CliError(f"{source / 'config.json'} cannot be read: {first_line(exc)}") from exc
    calibration = None
    if not args.no_calibration:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        calibration = _text_batches(args.model, tokenizer, args.calibration,
                                    args.calibration_tokens, 512, 4, "--calibration", config)
    options = {k: v for k, v in settings_from(
        args, CompactifyConfig, skip=("weigh_outputs", "output_metric")).items() if v is not None}
    report = compactify_pretrained(source, out, calibration=calibration,
                                   dtype=DTYPES[args.dtype] or _saved_dtype(config),
                                   overwrite=args.overwrite,
                                   progress=not args.quiet, metadata={"compactify": _settings(args)},
                                   **options)
    print(report)
    print(f"saved to {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .helpers.data import tokenize_text
    from .helpers.evaluate import model_size_bytes, perplexity

    model, tokenizer = load_any(args.model, DTYPES[args.dtype])
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer; save one with the model")
    if args.text is None:
        return _eval_domains(args, model, tokenizer)
    ids = tokenize_text(tokenizer, args.text, args.tokens)
    if ids.numel() < args.window:
        raise CliError(f"--text has {ids.numel()} tokens, fewer than --window {args.window}")
    t0 = time.perf_counter()
    ppl = perplexity(model, ids, window=args.window, progress=not args.quiet, tokenizer=tokenizer)
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


def _eval_domains(args: argparse.Namespace, model, tokenizer) -> None:
    """Perplexity on the held-out part of every bundled domain, with ratios to ``--dense``."""
    from .helpers.evaluate import compare_to_dense, model_size_bytes, perplexity_table

    t0 = time.perf_counter()
    table = perplexity_table(model, tokenizer, args.tokens, window=args.window,
                             progress=not args.quiet)
    result = {"model": args.model, "tokens_per_domain": args.tokens, "window": args.window,
              "perplexity": table, "parameters": sum(p.numel() for p in model.parameters()),
              "size_mb": model_size_bytes(model) / 1e6}
    if args.dense:
        dense = perplexity_table(load_any(args.dense, DTYPES[args.dtype])[0], tokenizer,
                                 args.tokens, window=args.window, progress=not args.quiet)
        result["dense_perplexity"] = dense
        result["ratio_to_dense"] = compare_to_dense(table, dense)
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result, indent=2))
        return
    ratios = result.get("ratio_to_dense", {})
    for name, ppl in table.items():
        extra = f"  ({ratios[name]:.2f}x dense)" if ratios else ""
        print(f"{name:<14} perplexity {ppl:9.3f}{extra}")
    if ratios:
        print(f"geometric mean of the ratios {ratios['geomean']:.3f}x, worst {ratios['worst']:.3f}x")
    print(f"held-out text, {args.tokens} tokens per domain ({args.window}-token windows); "
          f"{result['parameters']:,} parameters, {result['size_mb']:.1f} MB")


def cmd_profile(args: argparse.Namespace) -> None:
    from .compress.profiling import profile_model

    out = Path(args.out)
    _check_out(out, args.overwrite)
    model, tokenizer = load_any(args.model, DTYPES[args.dtype])
    batches = _text_batches(args.model, tokenizer, args.calibration, args.calibration_tokens,
                            args.seq, 4, "--calibration", model)
    summary = profile_model(model, batches, out, keep=args.keep, method=args.method,
                            n_sites=args.n_sites, progress=not args.quiet,
                            cache_dir=False if args.no_cache else None,
                            overwrite=args.overwrite)
    print((out / "sensitivity.txt").read_text(), end="")
    print(json.dumps({k: v for k, v in summary.items() if k != "most_sensitive"}, indent=2))
    print(f"saved to {out}")


def cmd_heal(args: argparse.Namespace) -> None:
    from .train.heal import heal
    from .saving.serialization import STRUCTURE_FILE, save_compactified

    if args.cores_only and args.train not in (None, "cores"):
        raise CliError(f"--cores-only and --train {args.train} contradict each other: give one")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if not (Path(args.model) / STRUCTURE_FILE).is_file():
        raise CliError(f"MODEL {args.model!r} must be a directory written by 'compress'")
    # Trained in float32 (autocast computes in bf16 where heal's mixed precision says so).
    model, tokenizer = load_any(args.model, torch.float32)
    teacher_name = args.teacher
    if teacher_name is None and not args.no_teacher:
        # Distil from the dense model the directory was compressed from, when it can be had.
        structure = json.loads((Path(args.model) / STRUCTURE_FILE).read_text())
        source = (structure.get("compactify") or {}).get("source")
        if source == "smollm2" or (source and Path(source).exists()):
            teacher_name = source
            print(f"distilling from {source} (the model {args.model} was compressed from; "
                  "--no-teacher to train on the text alone)")
    teacher = load_any(teacher_name, torch.float32)[0] if teacher_name else None
    batches = _text_batches(args.model, tokenizer, args.text, args.tokens, args.seq, args.batch,
                            "--text", model)
    check = None
    if args.check_tokens:  # text of every domain that healing never reads
        from .helpers.data import check_mix

        check = check_mix(tokenizer, args.check_tokens, seq_len=min(512, args.check_tokens),
                          model=model)
    if args.quantize:  # quantize() rounds kept-rows low-rank layers as two factors
        from .train.quantize import low_rank_as_factors

        converted = low_rank_as_factors(model)
        if converted:
            print(f"{converted} low-rank layers stored as two factors, the form "
                  f"'quantize --bits {args.quantize}' rounds")
    result = heal(model, batches, teacher=teacher, check=check, progress=not args.quiet,
                  **{**settings_from(args, HealConfig),
                     **({"train": "cores"} if args.cores_only else {})})
    save_compactified(model, out, tokenizer=tokenizer, overwrite=args.overwrite,
                      files={"healing.json": json.dumps(result.to_dict())},
                      healing={"source": args.model,
                               "text": [str(t) for t in args.text] if args.text else "mixture",
                               "steps": result.steps, "max_minutes": args.max_minutes,
                               "lr": result.lr, "teacher": teacher_name,
                               "train": result.train,
                               "check_tokens": args.check_tokens, "on_rise": args.on_rise,
                               "quantize_aware": args.quantize,
                               "stopped_early": result.stopped_early})
    first, last = result.losses[0], result.losses[-1]
    print(f"healed {result.steps} steps in {result.seconds:.0f} s"
          + (" (out of time)" if result.out_of_time else "") + f": loss {first:.4f} -> {last:.4f}")
    if result.checks:
        (_, start), best = result.checks[0], min(v for _, v in result.checks)
        print(f"check perplexity (every domain, text healing never read): {start:.2f} -> "
              f"{result.checks[-1][1]:.2f}, best {best:.2f} at step {result.best_step}"
              + ("; stopped there, as it rose after" if result.stopped_early else "")
              + (f" (int{args.quantize} weights)" if args.quantize else ""))
    print(f"saved to {out}")
    if args.quantize:
        print(f"trained for int{args.quantize}: now run 'tensornet-llm quantize {out} "
              f"--bits {args.quantize} --out ...' (default groups)")


def cmd_quantize(args: argparse.Namespace) -> None:
    from .train.quantize import quantize
    from .saving.serialization import save_compactified

    out = Path(args.out)
    _check_out(out, args.overwrite)
    model, tokenizer = load_any(args.model)
    report = quantize(model, **settings_from(args, QuantizeConfig))
    print(report.summary())
    save_compactified(model, out, tokenizer=tokenizer, overwrite=args.overwrite,
                      quantization={"source": args.model, "bits": args.bits,
                                    "group_size": report.group_size})
    print(f"saved to {out}")


def _dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="the dtype to load in (default: the checkpoint's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensornet-llm", description="Compress transformer language models with tensor networks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="tensorize a model's attention and MLP layers and save it")
    p.add_argument("model", help="smollm2, a .gguf file, or a Hugging Face model directory")
    size = p.add_mutually_exclusive_group(required=True)
    add_field(size, CompactifyConfig, "chi", type=_chi,
              help="bond dimension of every layer (integer >= 1)")
    add_field(size, CompactifyConfig, "ratio", type=_fraction,
              help="keep this fraction of the attention/MLP parameters, choosing chi per layer "
              "(with calibration: from the predicted loss increase)")
    add_field(p, CompactifyConfig, "method")
    add_field(p, CompactifyConfig, "n_sites")
    add_field(p, CompactifyConfig, "tol", type=float)
    add_field(p, CompactifyConfig, "exclude", nargs="*", metavar="PATTERN")
    p.add_argument("--calibration", help="text file (or bundled name) to fit the layers to "
                   "(default: the bundled mixture of fiction, encyclopedia, technical prose and "
                   "code)")
    p.add_argument("--no-calibration", action="store_true",
                   help="decompose the weights alone (fast, much worse without healing)")
    p.add_argument("--calibration-tokens", type=_positive, default=16384,
                   help="calibration tokens, in 512-token windows (default 16384: fewer fit the "
                   "calibration text's domain more and others less, see bench_domains.md)")
    add_field(p, CompactifyConfig, "fit_steps", type=_non_negative)
    add_field(p, CompactifyConfig, "low_rank")
    add_field(p, CompactifyConfig, "interpolative", "--low-rank-factors",
              help="store low-rank layers as two factors U, V (peft merges adapters into them "
              "by concatenation) instead of kept rows and their combinations, which hold the "
              "same rank in r^2 fewer parameters")
    add_field(p, CompactifyConfig, "min_saving", type=_saving)
    add_field(p, CompactifyConfig, "call_cost", type=_non_negative_float, metavar="PARAMS")
    add_field(p, CompactifyConfig, "slim_mlp")
    add_field(p, CompactifyConfig, "slim_attention")
    add_field(p, CompactifyConfig, "lm_head")
    add_field(p, CompactifyConfig, "weigh_outputs")
    add_field(p, CompactifyConfig, "output_metric", choices=OUTPUT_METRICS)
    add_field(p, CompactifyConfig, "cross_layer", type=_positive, metavar="G")
    _dtype_option(p)
    p.add_argument("--stream", action="store_true",
                   help="read a Hugging Face directory block by block and write the output as "
                        "it goes: memory for about two blocks, not the model")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity, parameters and size of a model")
    p.add_argument("model", help="a directory written by compress, smollm2, a .gguf or a HF directory")
    p.add_argument("--text", help="a text file, or a bundled text name (default: the held-out "
                   "part of every bundled domain, one perplexity each)")
    p.add_argument("--dense", help="with the default domains, also score this model (smollm2, "
                   ".gguf or directory) and print the ratios to it")
    p.add_argument("--tokens", type=_positive, default=8192, help="tokens to score (default 8192)")
    p.add_argument("--window", type=_positive, default=512, help="window length (default 512)")
    _dtype_option(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="layer sensitivity and entanglement tables and plots")
    p.add_argument("model", help="smollm2, a .gguf file, or a Hugging Face model directory")
    p.add_argument("--calibration", help="text file (or bundled name); default: the bundled "
                   "mixture of every domain")
    p.add_argument("--calibration-tokens", type=_positive, default=1024,
                   help="tokens the loss is measured on (default 1024)")
    p.add_argument("--seq", type=_positive, default=256, help="window length (default 256)")
    p.add_argument("--keep", type=_fraction, nargs="+", default=[0.5],
                   help="fractions of each module's parameters to try (default 0.5)")
    p.add_argument("--method", choices=["mpo", "ttns"], default="mpo")
    p.add_argument("--n-sites", type=int, default=3)
    _dtype_option(p)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the profile cache")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("heal", help="fine-tune a compressed model (optionally distilled)")
    p.add_argument("model", help="a directory written by compress")
    p.add_argument("--text", nargs="+",
                   help="training text files (or bundled names), joined in order (default: the "
                   "bundled mixture of every domain's fit part)")
    p.add_argument("--tokens", type=_positive,
                   help="use at most this many tokens of --text (an equal share of each)")
    add_field(p, HealConfig, "steps", type=_positive, required=True)
    add_field(p, HealConfig, "max_minutes", type=_positive_float)
    add_field(p, HealConfig, "lr", type=_positive_float)
    p.add_argument("--batch", type=_positive, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=_positive, default=256, help="tokens per sequence (default 256)")
    add_field(p, HealConfig, "gradient_accumulation_steps", "--accumulate", type=_positive,
              metavar="N")
    p.add_argument("--teacher", help="dense model to distil from (smollm2, .gguf or directory; "
                   "default: the model MODEL was compressed from, when it can be loaded)")
    p.add_argument("--no-teacher", action="store_true", help="no distillation")
    add_field(p, HealConfig, "train")
    p.add_argument("--cores-only", action="store_true", help="the same as --train cores")
    add_field(p, HealConfig, "checkpoint_dir")
    p.add_argument("--check-tokens", type=_non_negative, default=2048,
                   help="tokens of every domain's check text (never trained on) whose perplexity "
                   "is watched during healing (default 2048; 0: no checks)")
    add_field(p, HealConfig, "check_every", type=_positive)
    add_field(p, HealConfig, "on_rise")
    add_field(p, HealConfig, "quantize", "--quantize-aware", type=int, choices=[8, 4],
              metavar="BITS",
              help="quantization-aware healing: train through the rounding that 'quantize "
              "--bits BITS' (default groups) applies afterwards; the checks measure the "
              "quantized model")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser("quantize", help="int8 / int4 weights of a (compressed) model")
    p.add_argument("model", help="a directory written by compress or heal, smollm2, or a HF directory")
    add_field(p, QuantizeConfig, "bits", choices=[8, 4])
    add_field(p, QuantizeConfig, "group_size", type=_positive)
    add_field(p, QuantizeConfig, "embeddings", "--keep-embeddings",
              help="leave embeddings in float")
    add_field(p, QuantizeConfig, "dense", "--keep-dense",
              help="leave dense linears (LM head, excluded layers) in float")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except TensornetError as exc:  # bad input: one line; anything else is a bug (traceback)
        print(f"tensornet-llm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
