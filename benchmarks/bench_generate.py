"""Generation speed of compactified SmolLM2-135M against the dense model, end to end.

    python benchmarks/bench_generate.py                       # the full grid (long)
    python benchmarks/bench_generate.py --keep 0.8 0.5 --batch 1 --modes eager --dtypes float32

For every model (dense; ``compactify(model, ratio=keep)`` at each ``--keep`` with the default
layouts; a 3-site MPO and a TTNS model at ``--single-keep``), every batch size, mode (``eager``,
or ``compiled``: ``torch.compile`` of the forward with a static KV cache) and dtype, it times
greedy ``generate`` from a ``--prompt``-token prompt:

* **prefill**: ``generate(max_new_tokens=1)``, tokens per second of prompt;
* **decode**: ``(generate(max_new_tokens=1 + N) - prefill) / N`` per new token.

``--int8`` adds the dense and every ``--keep`` model quantized by ``quantize(model, 8)``
(torchao's int8 weight-only for every ``nn.Linear`` and the embeddings), each quantized in the
dtype it runs in; their ratios are against the dense model quantized the same way. ``--exclude PATTERN ...`` adds, for
every keep, a model with those modules left dense and the rest compressed further (the same
parameters in all). ``--own-rows`` adds, for every keep, the model whose MLPs' ``gate_proj`` and
``up_proj`` keep their own rows (``CompactifyConfig(share_mlp_rows=False)``). ``--no-slim`` adds,
for every keep, the model whose MLPs are offered no slim layout (``CompactifyConfig(
slim_mlp=False)``: per-projection kept rows, as before slim MLPs existed); ``--no-slim-attention``
the model whose attention is offered no fewer query heads (``CompactifyConfig(
slim_attention=False)``); ``--call-cost PARAMS ...`` the model the budget builds with that
``CompactifyConfig(call_cost=...)``, per value (and records what ``helpers.speed.call_cost``
measures on the machine per dtype).

Models are interleaved round by round (every model runs once per round, in the same process), so
drift and interference hit all alike. Ratios are against the dense model in the same
configuration, two ways: of the fastest of ``--rounds`` rounds for each, and the median over
rounds of the ratio within a round (the model against the dense run of the same round, which
cancels drift slower than a round; on a noisy machine the steadier). Beside each decode ratio stands
its ceiling, dense bytes read per decoded token over the model's (every weight that a token's
forward pass reads: the linear layers and cores, the LM head; an embedding lookup reads one
row), which is what a memory-bound decode can gain at most. Speed does not depend on the values
of the weights, but the layouts the budget picks depend on the data: the models are compressed
with ``--calibration-tokens`` of the calibration mixture (0: none, and no slim MLPs) and no fit
steps (the fitted values do not change the speed). A second table gives each model's bytes and
the bytes its KV cache holds per token (fewer key/value heads shrink it), against dense. Writes
``docs/results/bench_generate.{json,md,png}``; with ``--merge``, beside the rows an earlier run with
the same settings wrote for the configurations (batch, mode, dtype) this one does not time, so
a long grid can run in parts (each ratio still compares models timed in one run).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
from pathlib import Path

import torch
import torch._dynamo
from torch import nn

from tensornet_llm import CompactifyConfig, quantize
from tensornet_llm.helpers.data import HELD_OUT_TEXT, calibration_mix, tokenize_text
from tensornet_llm.helpers.evaluate import model_size_bytes, stored_tensors
from tensornet_llm.helpers.models import load_smollm2
from tensornet_llm.helpers.speed import RoundTimes, call_cost, ratios, time_generate

from harness import (DTYPES, RESULTS, compressed, machine, pyplot, ratio_leaving_dense, resume,
                     write_results)



def decode_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: every parameter and buffer once (tied tensors
    once), less the input embedding table, of which a token reads one row (unless the table is
    also the LM head, which reads all of it)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    table = sum(t.numel() * t.element_size() for t in stored_tensors(embed))
    return model_size_bytes(model) - (0 if tied else table)


def kv_cache_bytes(model: nn.Module, ids: torch.Tensor) -> float:
    """Bytes the KV cache holds per token of one sequence: measured on the cache a forward pass
    over ``ids`` ``(1, n)`` leaves (keys and values of every layer)."""
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors) / ids.shape[1]


def build_models(keeps: list[float], single_keep: float | None,
                 min_saving: float = 0.0, exclude: list[str] | None = None,
                 own_rows: bool = False, no_slim: bool = False, calibration_tokens: int = 0,
                 no_heads: bool = False, call_costs: list[float] | None = None
                 ) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """The models by name, and how many modules each compressed."""
    dense, tokenizer = load_smollm2()
    data = calibration_mix(tokenizer, calibration_tokens) if calibration_tokens else None
    models, counts = {"dense": dense}, {"dense": 0}

    def config(**options) -> CompactifyConfig:  # no fit steps: they change values, not speed
        return CompactifyConfig(fit_steps=0, **options)

    for keep in keeps:
        variants = [("", keep, config())]
        if own_rows:
            variants.append((", own rows", keep, config(share_mlp_rows=False)))
        if no_slim:
            variants.append((", no slim", keep, config(slim_mlp=False)))
        if no_heads:
            variants.append((", no fewer heads", keep, config(slim_attention=False)))
        if min_saving:
            variants.append((f", min saving {min_saving:.0%}", keep,
                             config(min_saving=min_saving)))
        variants += [(f", call cost {cost / 1000:g}k", keep, config(call_cost=cost))
                     for cost in call_costs or []]
        if exclude:  # the same parameters in all: the rest compressed further
            variants.append((f", without {'/'.join(exclude)}",
                             ratio_leaving_dense(dense, keep, exclude),
                             config(exclude=list(exclude))))
        for suffix, ratio, cfg in variants:
            model, report = compressed(dense, ratio, config=cfg, calibration=data)
            name = f"keep {keep:.0%}{suffix}"
            models[name] = model
            counts[name] = len(report.layers)
    if single_keep is not None:
        for method, n_sites in (("mpo", 3), ("ttns", 4)):
            model, report = compressed(dense, single_keep, config=CompactifyConfig(
                method=method, n_sites=n_sites, low_rank=False))
            name = f"{method} keep {single_keep:.0%}"
            models[name] = model
            counts[name] = len(report.layers)
    return {k: m.eval() for k, m in models.items()}, counts


INT8 = ", int8"


def with_int8(models: dict[str, nn.Module], counts: dict[str, int]) -> None:
    """Add every model but the many-site ones quantized by ``quantize(model, 8)``, named
    ``"<name>, int8"``."""
    for name in [n for n in models if not n.startswith(("mpo ", "ttns "))]:
        model = copy.deepcopy(models[name])
        quantize(model, 8)
        models[name + INT8], counts[name + INT8] = model, counts[name]


def baseline(name: str) -> str:
    """The model ``name``'s speed is compared with: the dense model, quantized alike."""
    return "dense" + INT8 if name.endswith(INT8) else "dense"


def run_config(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, rounds: int,
               mode: str, dtype: torch.dtype) -> dict[str, RoundTimes]:
    """Prefill and per-token decode seconds of every model in every round (models interleaved:
    each runs once per round, in turn)."""
    ready = {}
    if mode == "compiled":
        torch._dynamo.reset()  # each configuration compiles afresh
    for name, model in models.items():
        if name.endswith(INT8) and dtype != torch.float32:  # quantized in the dtype it runs in
            model = copy.deepcopy(models[name.removesuffix(INT8)]).to(dtype)
            quantize(model, 8)
        model = model.to(dtype)
        if mode == "compiled":
            model = copy.copy(model)  # a shallow copy carries the compiled forward alone
            model.forward = torch.compile(model.forward, dynamic=True)
        ready[name] = model
    times = time_generate(ready, prompt, new_tokens, rounds, static=mode == "compiled")
    for name, model in models.items():
        if not name.endswith(INT8):
            model.to(torch.float32)
    return times


def speed_ratios(times: RoundTimes, dense: RoundTimes) -> dict[str, float]:
    """Per phase: the fastest round's seconds, the ratio of the fastest rounds (dense over
    model), and the median, lowest and highest over rounds of the ratio within a round."""
    out = {}
    for phase, r in ratios(times, dense).items():
        out[f"{phase}_s"] = min(getattr(times, phase))
        out.update({f"{phase}_ratio": r.best, f"{phase}_ratio_median": r.median,
                    f"{phase}_ratio_low": r.low, f"{phase}_ratio_high": r.high})
    return out


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    lines = ["# Generation speed against dense (SmolLM2-135M)", "",
             f"Greedy `generate` from a {meta['prompt']}-token prompt; decode is per new token "
             f"over {meta['new_tokens']} new tokens; {meta['rounds']} interleaved rounds, "
             f"{meta['threads']} CPU threads ({meta['machine']}). Ratios are dense time over the "
             "model's time (above 1: faster than dense): \"vs dense\" of the fastest rounds, "
             "\"median (rounds)\" the median over rounds of the ratio within a round and its "
             "lowest and highest (the spread a difference must clear); the ceiling is dense "
             "bytes read per "
             "decoded token over the model's. Models compressed with "
             "`compactify(model, ratio=keep, calibration=...)` (default layouts"
             + (f", chosen by the budget on {meta['calibration_tokens']} calibration tokens; no "
                "fit steps: speed does not depend on the fitted values"
                if meta.get("calibration_tokens") else ", no calibration: no slim MLPs")
             + "). Written by `benchmarks/bench_generate.py`."
             + (" Rows \"..., int8\" are the model after `quantize(model, 8)` (torchao's int8 "
                "weight-only), compared with the dense model quantized alike (\"dense, int8\")."
                if any(r.get("baseline", "dense") != "dense" for r in rows) else "")
             + (" Rows \"..., call cost Nk\" were compressed with `CompactifyConfig(call_cost="
                "N)`; `helpers.speed.call_cost()` measured " + ", ".join(
                    f"{v:,} parameters in {d}" for d, v in meta["call_cost_measured"].items())
                + " on this machine." if meta.get("call_cost_measured") else ""), "",
             "| model | modules compressed | batch | mode | dtype | prefill tok/s | "
             "prefill vs dense | median (rounds) | decode tok/s | decode vs dense | "
             "median (rounds) | decode ceiling | of ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ceiling = r["ceiling"]
        share = f"{(r['decode_ratio'] - 1) / (ceiling - 1):.0%} " if ceiling > 1.001 else ""
        spread = {phase: f"{r[f'{phase}_ratio_median']:.2f}x ({r[f'{phase}_ratio_low']:.2f}x-"
                  f"{r[f'{phase}_ratio_high']:.2f}x)" for phase in ("prefill", "decode")}
        lines.append(
            f"| {r['model']} | {r['compressed_modules']} | {r['batch']} | {r['mode']} | "
            f"{r['dtype']} | {r['prefill_tokens_per_s']:.0f} | {r['prefill_ratio']:.2f}x | "
            f"{spread['prefill']} | {r['decode_tokens_per_s']:.1f} | {r['decode_ratio']:.2f}x | "
            f"{spread['decode']} | {ceiling:.2f}x | {share}|")
    lines += ["", "\"of ceiling\": the share of the possible decode gain reached, "
              "(ratio - 1) / (ceiling - 1)."]
    sizes = meta.get("sizes", {})
    if sizes:
        dense = {name: sizes[baseline(name)] for name in sizes if baseline(name) in sizes}
        lines += ["", "## Sizes", "",
                  "Float32 models as built (the int8 rows after `quantize`): bytes of every "
                  "stored tensor, and what the KV cache holds per token of a sequence, measured "
                  "on the cache a forward pass leaves; each against its dense model.", "",
                  "| model | model MB | vs dense | KV cache per token (KB) | vs dense |",
                  "|---|---|---|---|---|"]
        for name, size in sizes.items():
            ref = dense.get(name, size)
            lines.append(
                f"| {name} | {size['model_bytes'] / 1e6:.1f} | "
                f"{size['model_bytes'] / ref['model_bytes']:.2f}x | "
                f"{size['kv_bytes_per_token'] / 1e3:.1f} | "
                f"{size['kv_bytes_per_token'] / ref['kv_bytes_per_token']:.2f}x |")
    write_results(out, "bench_generate", meta, rows, lines)
    plot(out / "bench_generate.png", rows)


def plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()
    if plt is None:
        return
    configs = sorted({(r["batch"], r["mode"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4.2), squeeze=False)
    for ax, (batch, mode, dtype) in zip(axes[0], configs):
        sel = [r for r in rows if (r["batch"], r["mode"], r["dtype"]) == (batch, mode, dtype)
               and r["model"] != "dense"]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r["prefill_ratio"] for r in sel], 0.4, label="prefill")
        ax.bar([i + 0.2 for i in x], [r["decode_ratio"] for r in sel], 0.4, label="decode")
        ax.scatter([i + 0.2 for i in x], [r["ceiling"] for r in sel], marker="_", s=400,
                   color="black", label="decode ceiling", zorder=3)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(x), [r["model"] for r in sel], rotation=30, ha="right")
        ax.set_title(f"batch {batch}, {mode}, {dtype}")
        ax.set_ylabel("speed vs dense (x)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.5])
    parser.add_argument("--single-keep", type=float, default=0.5,
                        help="keep of the 3-site MPO and TTNS models (0 to skip them)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"],
                        choices=["eager", "compiled"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens (default 64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-saving", type=float, default=0.0,
                        help="also time each keep compressed with CompactifyConfig(min_saving=...)")
    parser.add_argument("--call-cost", type=float, nargs="+", metavar="PARAMS",
                        help="also time each keep compressed with CompactifyConfig(call_cost=...), "
                        "once per value given (the run's results record what "
                        "helpers.speed.call_cost measures on this machine per dtype)")
    parser.add_argument("--own-rows", action="store_true",
                        help="also time each keep compressed with CompactifyConfig("
                        "share_mlp_rows=False): gate_proj and up_proj keep their own rows")
    parser.add_argument("--no-slim", action="store_true",
                        help="also time each keep compressed with CompactifyConfig("
                        "slim_mlp=False): no slim MLPs")
    parser.add_argument("--no-slim-attention", action="store_true",
                        help="also time each keep compressed with CompactifyConfig("
                        "slim_attention=False): every query head kept")
    parser.add_argument("--calibration-tokens", type=int, default=4096,
                        help="calibration tokens the budget chooses layouts by (0: none)")
    parser.add_argument("--exclude", nargs="+", metavar="PATTERN",
                        help="also time each keep with these modules left dense and the rest "
                        "compressed further, to the same parameters in all")
    parser.add_argument("--int8", action="store_true",
                        help="also time every model quantized by quantize(model, 8) (float32), "
                        "against the dense model quantized alike")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows an earlier run with the same settings wrote to --out "
                        "for the configurations (batch, mode, dtype) this run does not time "
                        "(every ratio still compares models timed in one run)")
    args = parser.parse_args()
    # Every model compiles graphs of the same forward (warm-up, prefill, decode), more than
    # Dynamo's default limit of 8 per function: past it Dynamo would run the rest eagerly
    # without a word, and the results would mix compiled and eager models. Fail instead.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    meta = machine(prompt=args.prompt, new_tokens=args.new_tokens, rounds=args.rounds,
                   calibration_tokens=args.calibration_tokens)
    rows = []
    if args.merge:  # an earlier run's configurations that this one does not time
        meta, earlier = resume(args.out / "bench_generate.json", meta, False, parser,
                                "no --merge")
        timed = {(b, m, d) for b in args.batch for m in args.modes for d in args.dtypes}
        rows = [r for r in earlier if (r["batch"], r["mode"], r["dtype"]) not in timed]
    if args.call_cost:
        measured = {d: round(call_cost(dtype=DTYPES[d])) for d in args.dtypes}
        meta["call_cost_measured"] = {**meta.get("call_cost_measured", {}), **measured}
        print(f"call cost measured here (parameters): {meta['call_cost_measured']}", flush=True)

    models, counts = build_models(args.keep, args.single_keep or None, args.min_saving,
                                  args.exclude, args.own_rows, args.no_slim,
                                  args.calibration_tokens, args.no_slim_attention, args.call_cost)
    if args.int8:
        with_int8(models, counts)
    _, tokenizer = load_smollm2()
    ids = tokenize_text(tokenizer, HELD_OUT_TEXT, args.prompt * max(args.batch))
    ceilings = {name: decode_bytes(models[baseline(name)]) / decode_bytes(m)
                for name, m in models.items()}
    meta["sizes"] = {**meta.get("sizes", {}), **{
        name: {"model_bytes": model_size_bytes(m),
               "kv_bytes_per_token": kv_cache_bytes(m, ids[None, :64])}
        for name, m in models.items()}}
    for dtype in args.dtypes:
        for mode in args.modes:
            for batch in args.batch:
                prompt = ids[: batch * args.prompt].reshape(batch, args.prompt)
                print(f"batch {batch}, {mode}, {dtype} ...", flush=True)
                times = run_config(models, prompt, args.new_tokens, args.rounds, mode,
                                   DTYPES[dtype])
                for name, t in times.items():
                    ratios = speed_ratios(t, times[baseline(name)])
                    rows.append({
                        "model": name, "baseline": baseline(name), "batch": batch, "mode": mode, "dtype": dtype, **ratios,
                        "prefill_tokens_per_s": batch * args.prompt / ratios["prefill_s"],
                        "decode_tokens_per_s": batch / ratios["decode_s"],
                        "ceiling": ceilings[name], "compressed_modules": counts[name],
                    })
                    print(json.dumps(rows[-1]), flush=True)
                gc.collect()
                write(args.out, meta, rows)


if __name__ == "__main__":
    main()
