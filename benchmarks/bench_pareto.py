"""Where tensor networks stand against quantization: model bytes against held-out perplexity
(every domain) and decode speed, SmolLM2-135M.

    python benchmarks/bench_pareto.py                         # keep 90..50%, heal keep 50%
    python benchmarks/bench_pareto.py --keep 0.8 --heal-keep --tokens 2048   # a quick look

Models:

* dense fp32, bf16, int8 and int4 (``quantize(model, bits)``: every linear and the embedding
  table; int8 one scale per channel, int4 groups of 64);
* ``compactify(model, ratio=keep, calibration=calibration_mix(tokenizer, 16384))`` at every
  ``--keep`` (the library's defaults), alone and with int8 / int4 on top (the same quantizer);
* at every ``--heal-keep``, that model healed with the default recipe (next-token loss, weight 1
  (``--heal-ce``), plus distillation from the dense model, ``healing_mix``: an equal share of
  every domain's fit part (``--heal-text``: or ``--generated-tokens`` of text sampled from the
  dense model, ``generated_text``, alone or interleaved with the mixture; the sampling is timed
  apart from the healing), batches of 4 x 256 tokens (``--heal-batch``, ``--heal-seq``),
  ``--heal-steps`` steps but at most ``--heal-minutes`` of wall time (30, the issue's budget;
  the cosine decay follows the clock), lr 3e-4 (``--heal-lr``), 20 warm-up steps, all but the
  embeddings trained (heal's default, ``--heal-train``), bf16 autocast where the CPU has AMX;
  checked every 50 steps on 2,048 tokens of ``check_mix``, stopping early and keeping the best
  weights if that perplexity rises twice in a row, as the CLI does), alone and with int8 / int4;
* at every ``--qat-keep`` (default 90%), that model healed by the same recipe but
  quantization-aware for int4 (``heal(..., quantize=4)``: every pass computes with the weights
  ``quantize(model, 4)`` will store; its low-rank layers first turned into the two balanced
  factors that ``quantize`` rounds, ``low_rank_as_factors``), and, as the control, the dense
  model healed the same way; each alone and with int4.

Quality: perplexity on ``--tokens`` held-out tokens of every domain (text that neither
calibration nor healing draws from), the ratio to dense fp32, the geometric mean and the worst
domain. Bytes: every parameter and buffer once (``model_size_bytes``). Speed: greedy decode of
``--new-tokens`` tokens after a 64-token prompt, batch 1, every model once per round in one
process, fastest of ``--rounds`` rounds, as a ratio to dense fp32.

Compressed and healed models are cached under the library's cache folder
(``bench/pareto-*``); quality rows are appended to ``docs/results/bench_pareto.json`` as they
finish and a rerun skips them (``--fresh`` starts over). Speed is measured last, in one run over
every model. Writes ``docs/results/bench_pareto.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

import torch
from torch import nn

from tensornet_llm import (HealConfig, heal, load_compactified, quantize,
                           save_compactified)
from tensornet_llm.train.quantize import low_rank_as_factors
from tensornet_llm.helpers.data import (
    DOMAINS, calibration_mix, check_mix, generated_text, healing_mix, held_out_ids,
)
from tensornet_llm.helpers.evaluate import compare_to_dense, model_size_bytes, perplexity_table
from tensornet_llm.helpers.speed import time_generate
from tensornet_llm.helpers.models import default_cache_dir, load_smollm2

from harness import RESULTS, compressed, pyplot, resume, write_results

QUANT = {"": None, " + int8": 8, " + int4": 4}
DEFAULT_HEAL_LR = HealConfig.lr  # heal()'s default, 3e-4
DEFAULT_HEAL_CE = HealConfig.ce_weight  # heal()'s default, 1
DEFAULT_HEAL_SHAPE = (4, 256)  # sequences x tokens per healing step, the CLI's default
HEAL_TEXTS = ("mix", "mix+generated", "generated")
QAT = " healed for int4"  # quantization-aware healing: its rows are the float and the int4 model
#: In the compressed models' cache names: changed whenever compactify's defaults build something
#: else at the same keep (now: slim MLPs offered and priced by their ridge objective, kept rows,
#: ranks that are multiples of 8).
MODEL_VERSION = "slim2"


def compressed_path(keep: float, calibration_tokens: int) -> Path:
    """Where ``compactify(ratio=keep)`` on ``calibration_tokens`` of the mixture is cached."""
    return (default_cache_dir() / "bench"
            / f"pareto-keep{keep}-mix{calibration_tokens}-{MODEL_VERSION}")


def compress(dense: nn.Module, keep: float, calibration: list[torch.Tensor]
             ) -> tuple[nn.Module, dict]:
    """A copy of ``dense`` compactified to ``ratio=keep`` on ``calibration`` (the library's
    defaults), and ``{"compress_seconds", "kept"}``."""
    start = time.perf_counter()
    model, report = compressed(dense, keep, calibration=calibration)
    return model, {"compress_seconds": time.perf_counter() - start, "kept": report.kept_fraction}


def cached(path: Path, build) -> tuple[nn.Module, dict]:
    """The model saved at ``path``, or ``build() -> (model, info)`` saved there first."""
    if (path / "tensornet.json").is_file():
        info = json.loads((path / "bench_info.json").read_text())
        return load_compactified(path).eval(), info
    model, info = build()
    save_compactified(model, path, overwrite=True, files={"bench_info.json": json.dumps(info)})
    return model.eval(), info


def base_models(args, dense, tokenizer) -> dict:
    """``{name: (loader, info)}`` of every unquantized model, built (and cached) in order."""
    cache = default_cache_dir() / "bench"
    calib = None

    def compressed(keep: float) -> tuple[nn.Module, dict]:
        nonlocal calib
        calib = calib or calibration_mix(tokenizer, args.calibration_tokens)
        return compress(dense, keep, calib)

    def healed(keep: float | None, bits: int | None = None) -> tuple[nn.Module, dict]:
        """The keep-``keep`` model (``None``: dense) healed by the default recipe; with
        ``bits``, quantization-aware for ``quantize(model, bits)``."""
        model, info = compressed_at(keep) if keep is not None else (copy.deepcopy(dense), {})
        if bits:  # quantize() rounds kept-rows layers as two factors: train that form
            info = {**info, "as_factors": low_rank_as_factors(model)}
        batches, generate_seconds = healing_text(args, dense, tokenizer)
        if generate_seconds is not None:
            info = {**info, "generate_seconds": generate_seconds}
        model.train()
        result = heal(model, batches, steps=args.heal_steps, lr=args.heal_lr,
                      train=args.heal_train, ce_weight=args.heal_ce,
                      teacher=dense, check=check_mix(tokenizer, 2048), check_every=50,
                      max_minutes=args.heal_minutes, quantize=bits, progress=False)
        return model, {**info, "heal_seconds": result.seconds, "heal_steps": result.steps,
                       "mixed_precision": result.mixed_precision,
                       "check_perplexity": [round(v, 2) for _, v in result.checks],
                       "stopped_early": result.stopped_early, "out_of_time": result.out_of_time}

    def compressed_at(keep: float):
        return cached(compressed_path(keep, args.calibration_tokens), lambda: compressed(keep))

    def healed_at(keep: float | None, bits: int | None = None):
        base = ("dense" if keep is None
                else f"keep{keep}-mix{args.calibration_tokens}-{MODEL_VERSION}")
        lr = "" if args.heal_lr == DEFAULT_HEAL_LR else f"-lr{args.heal_lr:g}"
        trains = HealConfig(train=args.heal_train, quantize=bits).trained(dense)
        lr += "" if trains == "all" else f"-{trains}"  # the cache names before "blocks"
        lr += "" if args.heal_ce == DEFAULT_HEAL_CE else f"-ce{args.heal_ce:g}"
        lr += "" if (args.heal_batch, args.heal_seq) == DEFAULT_HEAL_SHAPE else \
            f"-b{args.heal_batch}x{args.heal_seq}"
        lr += "" if args.heal_text == "mix" else \
            f"-{args.heal_text.replace('+', '')}{args.generated_tokens}"
        return cached(cache / f"pareto-{base}-heal{args.heal_steps}x{args.heal_tokens}{lr}"
                      f"{f'-qat{bits}' if bits else ''}-{args.heal_minutes:g}min",
                      lambda: healed(keep, bits))

    out = {"dense": lambda: (dense, {})}
    for keep in args.keep:
        out[f"keep {keep:.0%}"] = lambda keep=keep: compressed_at(keep)
        if keep in args.heal_keep:
            out[f"keep {keep:.0%} healed"] = lambda keep=keep: healed_at(keep)
    if args.qat_keep:  # the control: the dense model healed for int4 by the same recipe
        out["dense" + QAT] = lambda: healed_at(None, 4)
    for keep in args.qat_keep:
        out[f"keep {keep:.0%}{QAT}"] = lambda keep=keep: healed_at(keep, 4)
    return out


def healing_text(args, dense: nn.Module, tokenizer) -> tuple[list[torch.Tensor], float | None]:
    """The healing batches ``(heal_batch, heal_seq + 1)`` of ``--heal-text``, and the seconds
    spent sampling text from the dense model (``None`` when none is used; near 0 when cached).

    ``mix``: ``healing_mix`` of ``--heal-tokens``; ``generated``: ``--generated-tokens`` of
    ``generated_text`` from the dense model; ``mix+generated``: both, their windows interleaved
    evenly before batching, so every batch holds both kinds in proportion."""
    seq = args.heal_seq + 1
    mix = [] if args.heal_text == "generated" else healing_mix(
        tokenizer, args.heal_tokens, seq_len=args.heal_seq, batch_size=1)  # windows, one each
    seconds, sampled = None, []
    if args.heal_text != "mix":
        start = time.perf_counter()
        sampled = generated_text(dense, tokenizer, args.generated_tokens, seq_len=seq,
                                 batch_size=64)
        seconds = time.perf_counter() - start
    # interleave: window i of a list of n goes to position (i + 0.5) / n of the whole
    order = sorted([((i + 0.5) / len(mix), w) for i, w in enumerate(mix)]
                   + [((i + 0.5) / len(sampled), w) for i, w in enumerate(sampled)],
                   key=lambda t: t[0])
    windows = [w for _, w in order]
    return [torch.cat(windows[i:i + args.heal_batch])
            for i in range(0, len(windows), args.heal_batch)], seconds


def variant(model: nn.Module, bits: int | None) -> nn.Module:
    if bits is None:
        return model
    model = copy.deepcopy(model)
    quantize(model, bits)
    return model


def measure_speed(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int,
                  rounds: int) -> dict[str, float]:
    """Seconds per decoded token of every model, fastest of ``rounds`` interleaved rounds
    (:func:`~tensornet_llm.helpers.speed.time_generate`)."""
    times = time_generate(models, prompt, new_tokens, rounds)
    return {name: min(t.decode) for name, t in times.items()}


def frontier(rows: list[dict]) -> set[str]:
    """Names of the rows no other row beats on both bytes and geometric-mean ratio."""
    point = {r["model"]: (r["bytes"], r["ratios"]["geomean"]) for r in rows}
    return {a for a, (size, ratio) in point.items()
            if not any(s <= size and q <= ratio and (s, q) != (size, ratio)
                       for s, q in point.values())}


def beats(row: dict, anchor: dict) -> bool:
    """``row`` is smaller than ``anchor`` and lower in perplexity on every domain."""
    return row["bytes"] < anchor["bytes"] and all(
        row["perplexity"][d] < anchor["perplexity"][d] for d in anchor["perplexity"])


def healing_words(meta: dict) -> str:
    """What the healing read, in words, from a run's metadata."""
    mix = f"{meta['heal_tokens']} tokens of `healing_mix`"
    sampled = (f"{meta.get('generated_tokens')} tokens sampled from the dense model "
               "(`generated_text`)")
    return {"mix": mix, "generated": sampled,
            "mix+generated": f"{mix} and {sampled}"}[meta.get("heal_text", "mix")]


def healing_sentence(meta: dict) -> str:
    """How the healed rows were healed, for the results file's header."""
    return (f"; healing: {meta['heal_steps']} steps of "
            f"{meta.get('heal_batch', DEFAULT_HEAL_SHAPE[0])} x "
            f"{meta.get('heal_seq', DEFAULT_HEAL_SHAPE[1])} tokens on {healing_words(meta)}, "
            f"peak lr {meta.get('heal_lr', DEFAULT_HEAL_LR):g}, "
            f"`train={meta.get('heal_train', 'all')!r}`, distilled from dense"
            + (f" (next-token loss weight {meta['heal_ce']:g})" if "heal_ce" in meta else ""))


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    dense = meta["dense"]
    names = list(dense)
    on_frontier = frontier(rows)
    int4 = next((r for r in rows if r["model"] == "dense int4"), None)
    lines = ["# Size, held-out perplexity and decode speed: tensor networks and quantization "
             "(SmolLM2-135M)", "",
             f"Calibration: {meta['calibration_tokens']} tokens of `calibration_mix`"
             + (healing_sentence(meta) if any("healed" in r["model"] for r in rows) else "")
             + f"; perplexity on {meta['tokens']} held-out tokens of each "
             f"domain; decode: batch 1, {meta['new_tokens']} new tokens after a 64-token prompt, "
             f"fastest of {meta['rounds']} interleaved rounds, against dense fp32. "
             f"{meta['threads']} CPU threads. Written by `benchmarks/bench_pareto.py`; plot "
             "`bench_pareto.png`. **F**: on the frontier of bytes against the geometric mean "
             "(nothing else is both smaller and better); **< int4**: smaller than dense int4 and "
             "lower in perplexity on every domain.", ""]
    heads = ["model", "MB", "of dense", *names, "geomean", "worst", "decode vs dense", "F",
             "< int4"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        ratios = r["ratios"]
        speed = r.get("decode_vs_dense")
        lines.append("| " + " | ".join([
            r["model"], f"{r['bytes'] / 1e6:.1f}", f"{r['bytes'] / rows[0]['bytes']:.1%}",
            *(f"{r['perplexity'][n]:.2f} ({ratios[n]:.2f}x)" for n in names),
            f"{ratios['geomean']:.2f}x", f"{ratios['worst']:.2f}x",
            "" if speed is None else f"{speed:.2f}x",
            "F" if r["model"] in on_frontier else "",
            "yes" if int4 is not None and beats(r, int4) else ""]) + " |")
    info = [f"- {name}: " + ", ".join(
        f"{k} {v:.1%}" if k == "kept" else f"{k} {v:.0f}" if isinstance(v, float)
        else f"{k} {v}"
        for k, v in i.items())
            for name, i in meta.get("built", {}).items() if i]
    if info:
        lines += ["", "How the models were built (seconds on this machine):", "", *info]
    write_results(out, "bench_pareto", meta, rows, lines)
    plot(out / "bench_pareto.png", rows, on_frontier)


def plot(path: Path, rows: list[dict], on_frontier: set[str]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    marks = {"": "o", " + int8": "s", " + int4": "^"}
    for r in rows:
        suffix = next((s for s in (" + int8", " + int4") if r["model"].endswith(s)), "")
        base = r["model"].removesuffix(suffix)
        quant = {"dense int8": " + int8", "dense int4": " + int4"}.get(r["model"], suffix)
        colour = "black" if base.startswith("dense") else (
            "tab:green" if "healed" in base else "tab:blue")
        ax.scatter(r["bytes"] / 1e6, r["ratios"]["geomean"], marker=marks[quant], c=colour,
                   edgecolors="red" if r["model"] in on_frontier else "none", s=46, zorder=3)
        ax.annotate(r["model"], (r["bytes"] / 1e6, r["ratios"]["geomean"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    front = sorted((r["bytes"] / 1e6, r["ratios"]["geomean"]) for r in rows
                   if r["model"] in on_frontier)
    ax.plot(*zip(*front), "r--", lw=0.8, label="frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model bytes (MB, log)")
    ax.set_ylabel("held-out perplexity / dense fp32 (geometric mean over domains, log)")
    ax.set_title("SmolLM2-135M: circles float, squares int8, triangles int4; "
                 "black dense, blue compactified, green healed", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.9, 0.8, 0.7, 0.6])
    parser.add_argument("--heal-keep", type=float, nargs="*", default=[0.5])
    parser.add_argument("--heal-steps", type=int, default=250)
    parser.add_argument("--heal-tokens", type=int, default=262144)
    parser.add_argument("--heal-lr", type=float, default=DEFAULT_HEAL_LR,
                        help="peak learning rate of the healing (default 3e-4)")
    parser.add_argument("--heal-train", choices=("all", "blocks", "cores"),
                        help="heal(train=...): all parameters, all but the embeddings and LM "
                        "head, or the tensor-network cores only (default: heal's, 'blocks'; "
                        "'all' for quantization-aware healing)")
    parser.add_argument("--heal-ce", type=float, default=DEFAULT_HEAL_CE,
                        help="weight of the next-token loss beside the distillation "
                        "(heal(ce_weight=...); default 1; 0: distillation alone)")
    parser.add_argument("--heal-batch", type=int, default=DEFAULT_HEAL_SHAPE[0],
                        help="sequences per healing step (default 4)")
    parser.add_argument("--heal-seq", type=int, default=DEFAULT_HEAL_SHAPE[1],
                        help="tokens per healing sequence (default 256)")
    parser.add_argument("--heal-text", choices=HEAL_TEXTS, default="mix",
                        help="healing text: healing_mix of --heal-tokens (default), "
                        "--generated-tokens sampled from the dense model (generated_text), or "
                        "both, interleaved")
    parser.add_argument("--generated-tokens", type=int, default=262144,
                        help="tokens of generated_text with --heal-text generated or "
                        "mix+generated (sampled once, cached)")
    parser.add_argument("--heal-minutes", type=float, default=30.0,
                        help="wall-clock budget of each healing (the issue's target: 30)")
    parser.add_argument("--qat-keep", type=float, nargs="*", default=[0.9],
                        help="keeps whose model is also healed quantization-aware for int4 "
                        "(heal(..., quantize=4)); the dense model gets the same as a control")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true", help="skip the decode timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()

    dense, tokenizer = load_smollm2()
    dense.eval()
    trained = HealConfig(train=args.heal_train).trained(dense)  # what the float healing trains
    meta = {"tokens": args.tokens, "calibration_tokens": args.calibration_tokens,
            "heal_steps": args.heal_steps, "heal_tokens": args.heal_tokens,
            "heal_minutes": args.heal_minutes, "weigh_outputs": True,
            **({"heal_lr": args.heal_lr} if args.heal_lr != DEFAULT_HEAL_LR else {}),
            **({"heal_ce": args.heal_ce} if args.heal_ce != DEFAULT_HEAL_CE else {}),
            **({"heal_batch": args.heal_batch, "heal_seq": args.heal_seq}
               if (args.heal_batch, args.heal_seq) != DEFAULT_HEAL_SHAPE else {}),
            # before heal's default became "blocks", runs trained all and wrote no heal_train
            **({"heal_train": trained} if trained != "all" else {}),
            **({"heal_text": args.heal_text, "generated_tokens": args.generated_tokens}
               if args.heal_text != "mix" else {}),
            "qat_keep": args.qat_keep,
            "new_tokens": args.new_tokens, "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "domains": {n: d.description for n, d in DOMAINS.items()}}
    meta, rows = resume(args.out / "bench_pareto.json", meta, args.fresh, parser)
    args.out.mkdir(parents=True, exist_ok=True)
    if "dense" not in meta:
        meta["dense"] = perplexity_table(dense, tokenizer, args.tokens)
    meta.setdefault("built", {})

    def add(name: str, model: nn.Module) -> None:
        if any(r["model"] == name for r in rows):
            return
        table = perplexity_table(model, tokenizer, args.tokens)  # bf16 is scored in bf16
        rows.append({"model": name, "bytes": model_size_bytes(model), "perplexity": table,
                     "ratios": compare_to_dense(table, meta["dense"])})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "perplexity"}), flush=True)
        write(args.out, meta, rows)

    add("dense fp32", dense)
    add("dense bf16", copy.deepcopy(dense).to(torch.bfloat16))
    for suffix, bits in QUANT.items():
        if bits:
            add(f"dense int{bits}", variant(dense, bits))
    for name, load in base_models(args, dense, tokenizer).items():
        if name == "dense":
            continue
        if all(any(r["model"] == name + s for r in rows) for s in QUANT
               if not (name.endswith(QAT) and s == " + int8")):
            continue
        model, info = load()
        meta["built"][name] = info
        for suffix, bits in QUANT.items():
            if not (name.endswith(QAT) and bits == 8):
                add(name + suffix, variant(model, bits))
        del model
        gc.collect()

    if not args.no_speed:
        loaders = base_models(args, dense, tokenizer)
        models = {"dense fp32": dense, "dense bf16": copy.deepcopy(dense).to(torch.bfloat16)}
        for r in rows:
            if r["model"] in models:
                continue
            if r["model"].startswith("dense int"):
                models[r["model"]] = variant(dense, int(r["model"][-1]))
                continue
            suffix = next((s for s in QUANT if s and r["model"].endswith(s)), "")
            base = r["model"].removesuffix(suffix)
            if base in loaders:
                models[r["model"]] = variant(loaders[base]()[0], QUANT[suffix])
        prompt = held_out_ids(tokenizer, "fiction", 64).unsqueeze(0)
        seconds = measure_speed(models, prompt, args.new_tokens, args.rounds)
        for r in rows:
            if r["model"] in seconds:
                r["decode_vs_dense"] = seconds["dense fp32"] / seconds[r["model"]]
                r["decode_tokens_per_second"] = 1 / seconds[r["model"]]
        meta["decode_dense_tokens_per_second"] = 1 / seconds["dense fp32"]
    write(args.out, meta, rows)


if __name__ == "__main__":
    main()
