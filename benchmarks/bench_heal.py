"""Healing SmolLM2-135M after compactify: held-out perplexity versus steps, and the cost of a
training step of the compressed model against the dense one.

    python benchmarks/bench_heal.py [--keep 0.5 0.7] [--steps 0 50 100 200 400]
                                    [--variants ce distill fit+ce fit+distill lr+ce lr+distill]
                                    [--batch 4] [--seq 256] [--lr 2e-4] [--timing-only]
                                    [--mixed-precision auto|no|bf16] [--train all|cores]

Variants: ``ce`` heals on next-token loss from the plain TT-SVD start
(``compactify(ratio=keep)`` without data); ``distill`` adds the KL to the dense teacher's
logits; ``fit+...`` starts from the data-aware start (``compactify(ratio=keep,
calibration=..., low_rank=False)``: 3-site MPOs only); ``lr+...`` starts from
``compactify``'s default data-aware start, which may also give modules the low-rank layout.
Healing text: Emma and Sense and Sensibility (``--heal-texts``: any bundled texts but the
held-out one; ``--heal-tokens`` in all); calibration: Emma; perplexity: held-out Persuasion.
``--hidden-weight`` adds matching the teacher's hidden states to the distill variants.
``--mixed-precision auto`` (the default) heals and times in bf16 autocast on a GPU or an AMX
CPU, as ``heal`` does; the first results (``docs/results/bench_heal.md``) are float32
(``--mixed-precision no``). Results with other healing text, loss or precision belong in their
own ``--out`` folder.

The timing part runs each model in its own process (so peak memory is that process's alone):
the same batch, forward + backward + AdamW step, dense model versus the compactified one at each
keep (3-site MPOs, and, where ``bench_quality.py`` saved it, the data-aware model with the
layouts the budget chose, ``keep N% low-rank``); it reports the median step time and the peak resident memory growth during training
(``torch.cuda.max_memory_allocated`` on a GPU). Writes ``docs/results/bench_heal.{json,md,png}``.
Rows are appended as they finish and a rerun skips them (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _plot import perplexity_plot

from tensornet_llm import compactify, heal, load_compactified, save_compactified
from tensornet_llm.helpers.data import CALIBRATION_TEXTS, HELD_OUT_TEXT, text_batches, tokenize_text
from tensornet_llm.helpers.evaluate import perplexity
from tensornet_llm.train.heal import auto_precision
from tensornet_llm.helpers.models import default_cache_dir, load_smollm2

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ce", "distill", "fit+ce", "fit+distill", "lr+ce", "lr+distill")


def heal_curve(keep: float, variant: str, args, tokenizer, teacher, batches, calib, held_out
               ) -> dict:
    # bench_quality.py saves its data-aware models (same calibration and fit steps): reuse them.
    low_rank = variant.startswith("lr")
    fitted = low_rank or variant.startswith("fit")
    saved = default_cache_dir() / "bench" / f"smollm2-ratio{keep}{'-lr' if low_rank else ''}-fitw"
    t0 = time.perf_counter()
    if fitted and (saved / "tensornet.json").is_file() and args.fit_steps == 30:
        model, kept, compress_s = load_compactified(saved), keep, None
    else:
        model, _ = load_smollm2()
        report = compactify(model, ratio=keep, fit_steps=args.fit_steps, progress=False,
                            low_rank=low_rank, calibration=calib if fitted else None)
        kept, compress_s = report.kept_fraction, time.perf_counter() - t0
    curve = {0: perplexity(model, held_out, tokenizer=tokenizer)}
    print(f"keep {keep} {variant}: start perplexity {curve[0]:.2f}", flush=True)
    wanted = set(args.steps)

    def evaluate(step: int, result) -> None:
        if step in wanted:
            curve[step] = perplexity(model, held_out, tokenizer=tokenizer)
            print(f"  step {step}: perplexity {curve[step]:.2f} ({result.seconds:.0f} s)", flush=True)

    result = None
    if max(args.steps) > 0:
        result = heal(model, batches, steps=max(args.steps), lr=args.lr,
                      teacher=teacher if variant.endswith("distill") else None,
                      hidden_weight=args.hidden_weight if variant.endswith("distill") else 0.0,
                      warmup_steps=min(20, max(args.steps) // 10), progress=False,
                      mixed_precision=args.mixed_precision, train=args.train,
                      callback=evaluate)
    return {"keep": keep, "variant": variant, "kept": kept,
            "compress_seconds": compress_s, "perplexity": {str(k): v for k, v in curve.items()},
            "heal_seconds": result.seconds if result else 0.0,
            "losses": result.losses if result else []}


# ----- timing, one process per model --------------------------------------------------------
def _measure(path: str, batch: int, seq: int, steps: int, precision: str) -> dict:
    """Runs in a child process: load, then time training steps on one fixed batch."""
    model = load_compactified(path) if Path(path, "tensornet.json").is_file() else None
    if model is None:
        model, _ = load_smollm2()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    ids = torch.randint(2, 40000, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss is in KiB on Linux
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    params = sum(p.numel() for p in model.parameters())
    return {"median_step_s": statistics.median(times[1:] or times), "peak_bytes": peak,
            "params": params, "device": device}


def timing(keeps: list[float], batch: int, seq: int, steps: int, precision: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": "smollm2"}
        for keep in keeps:
            model, _ = load_smollm2()
            compactify(model, ratio=keep, low_rank=False, progress=False)
            paths[f"keep {keep:.0%}"] = save_compactified(model, Path(tmp) / f"keep{keep}")
            # The layouts compactify picks with data (bench_quality.py's model, if saved).
            fitted = default_cache_dir() / "bench" / f"smollm2-ratio{keep}-lr-fitw"
            if (fitted / "tensornet.json").is_file():
                paths[f"keep {keep:.0%} low-rank"] = fitted
        for rnd in range(2):  # two interleaved rounds: the machine is noisy
            for name, path in paths.items():
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", str(path), "--batch", str(batch),
                     "--seq", str(seq), "--timing-steps", str(steps),
                     "--mixed-precision", precision],
                    check=True, capture_output=True, text=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"model": name, "round": rnd, **row})
                print(json.dumps(rows[-1]), flush=True)
    best = {}
    for r in rows:
        b = best.setdefault(r["model"], dict(r))
        b["median_step_s"] = min(b["median_step_s"], r["median_step_s"])
        b["peak_bytes"] = min(b["peak_bytes"], r["peak_bytes"])
    return list(best.values())


def write(out: Path, data: dict) -> None:
    (out / "bench_heal.json").write_text(json.dumps(data, indent=1))
    meta = data["meta"]
    extras = "".join(f"{label} {meta[key]}, " for key, label in (
        ("hidden_weight", "hidden-state weight"), ("mixed_precision", "mixed precision"),
        ("train", "training only the")) if meta.get(key))
    lines = ["# Healing SmolLM2-135M after compactify", "",
             f"Dense perplexity {meta['dense_perplexity']:.2f} on {meta['held_out']}; healing "
             f"batches of {meta['batch']} x {meta['seq']} tokens from {meta['healing']}, "
             f"lr {meta['lr']}, {extras}{meta['threads']} CPU threads. Written by "
             "`benchmarks/bench_heal.py`; plot `bench_heal.png`.", ""]
    curves = data["curves"]
    if curves:
        steps = sorted({int(s) for c in curves for s in c["perplexity"]})
        lines += ["Held-out perplexity after N healing steps (ratio to dense in brackets):", "",
                  "| keep | variant | compress (s) | " + " | ".join(f"{s} steps" for s in steps)
                  + " | healing time (s) |", "|---|---|---|" + "---|" * len(steps) + "---|"]
        dense = meta["dense_perplexity"]
        for c in curves:
            cells = [f"{c['perplexity'][str(s)]:.4g} ({c['perplexity'][str(s)] / dense:.3g}x)"
                     if str(s) in c["perplexity"] else "" for s in steps]
            compress = "cached" if c["compress_seconds"] is None else f"{c['compress_seconds']:.0f}"
            lines.append(f"| {c['keep']:.0%} | {c['variant']} | {compress} | "
                         + " | ".join(cells) + f" | {c['heal_seconds']:.0f} |")
    if data.get("timing"):
        dense_row = next(r for r in data["timing"] if r["model"] == "dense")
        lines += ["", f"Training step on one batch of {meta['batch']} x {meta['seq']} tokens "
                  f"(forward, backward, AdamW; {dense_row['device']}, "
                  f"{meta.get('mixed_precision', 'float32')}; best of two interleaved "
                  "rounds, each a separate process):", "",
                  "| model | parameters | median step (s) | vs dense | peak memory growth (MiB) "
                  "| vs dense |", "|---|---|---|---|---|---|"]
        for r in data["timing"]:
            lines.append(
                f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['median_step_s']:.2f} | "
                f"{r['median_step_s'] / dense_row['median_step_s']:.2f}x | "
                f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / max(dense_row['peak_bytes'], 1):.2f}x |")
    (out / "bench_heal.md").write_text("\n".join(lines) + "\n")
    if curves:
        perplexity_plot(out / "bench_heal.png",
                        {f"keep {c['keep']:.0%} {c['variant']}":
                         [(int(k), v) for k, v in c["perplexity"].items()] for c in curves},
                        meta["dense_perplexity"], "healing steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 50, 100, 200, 400])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens")
    parser.add_argument("--heal-tokens", type=int, default=65536)
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="distill variants: weight of matching the teacher's hidden states")
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16"),
                        help="healing and the timed steps (auto: bf16 on a GPU or an AMX CPU)")
    parser.add_argument("--train", default="all", choices=("all", "cores"),
                        help="parameters the healing updates")
    parser.add_argument("--heal-texts", nargs="+", default=list(CALIBRATION_TEXTS),
                        help="bundled texts to heal on (never the held-out one)")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--timing-steps", type=int, default=4)
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    if args.mixed_precision == "auto":
        args.mixed_precision = auto_precision()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.batch, args.seq, args.timing_steps,
                                  args.mixed_precision)))
        return

    if HELD_OUT_TEXT in args.heal_texts:
        parser.error(f"--heal-texts must not include the held-out {HELD_OUT_TEXT}")
    teacher, tokenizer = load_smollm2()
    held_out = tokenize_text(tokenizer, HELD_OUT_TEXT, args.tokens)
    meta = {"held_out": f"{HELD_OUT_TEXT}, {held_out.numel()} tokens",
            "healing": f"{' + '.join(args.heal_texts)}, {args.heal_tokens} tokens",
            "batch": args.batch, "seq": args.seq, "lr": args.lr,
            "threads": torch.get_num_threads()}
    # Recorded only where they differ from the first runs' settings, so those still match.
    if args.hidden_weight:
        meta["hidden_weight"] = args.hidden_weight
    if args.mixed_precision != "no":
        meta["mixed_precision"] = args.mixed_precision
    if args.train != "all":
        meta["train"] = args.train
    meta["weigh_outputs"] = True  # the data-aware fits (CompactifyConfig.weigh_outputs)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_heal.json"
    data = {"meta": meta, "curves": [], "timing": []}
    if path.is_file() and not args.fresh:
        saved = json.loads(path.read_text())
        differ = {k: saved["meta"].get(k) for k, v in meta.items() if saved["meta"].get(k) != v}
        if differ:
            parser.error(f"{path} was measured with {differ}: rerun with those settings, "
                         "or --fresh to start over")
        data = saved
    meta = data["meta"]
    if "dense_perplexity" not in meta:
        meta["dense_perplexity"] = perplexity(teacher, held_out, tokenizer=tokenizer)
    if not args.timing_only:
        batches = text_batches(tokenizer, args.heal_texts, args.heal_tokens, args.seq, args.batch)
        calib = text_batches(tokenizer, CALIBRATION_TEXTS[0], args.calibration_tokens, 512)
        for keep in args.keep:
            for variant in args.variants:
                done = [c for c in data["curves"] if c["keep"] == keep and c["variant"] == variant]
                if done and max(int(s) for s in done[0]["perplexity"]) >= max(args.steps):
                    continue
                data["curves"] = [c for c in data["curves"] if c not in done]
                data["curves"].append(heal_curve(keep, variant, args, tokenizer, teacher, batches,
                                                 calib, held_out))
                write(args.out, data)
    if not args.no_timing:
        data["timing"] = timing(args.keep, args.batch, args.seq, args.timing_steps,
                                args.mixed_precision)
    write(args.out, data)


if __name__ == "__main__":
    main()
