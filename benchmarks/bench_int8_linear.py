"""The int8 linear of ``saving/torchao_cpu.py`` against torchao's own, per layer and end to end.

    python benchmarks/bench_int8_linear.py [--rows 1 8 16 32 64 512] [--rounds 5]

``quantize(model, 8)`` gives every ``nn.Linear`` torchao's ``Int8Tensor`` weight. On a CPU
torchao computes ``F.linear`` with it by converting the whole int8 weight to the input's dtype
(a fresh weight-sized tensor per call) and one matmul; for inputs of at most ``FUSED_ROWS`` rows
the library puts torch's fused ``_weight_int8pack_mm`` in its place in bfloat16 / float16, and
in float32 the same conversion block by block into one reused buffer. This times, interleaved
round by round (every variant once per round, in one process), in each ``--dtypes``:

* **per layer**: SmolLM2-135M's linear shapes (q/o, k/v, gate/up, down, the LM head) at each
  ``--rows`` (batch x tokens): torchao's linear, the library's (what ``quantize``d models run),
  and the float ``nn.Linear`` they replace; ratios are torchao's time over each (above 1:
  faster). A loop over one layer can reuse the float copy torchao freed the call before, which
  a model's forward, between other allocations, mostly cannot: for the block layers these
  figures favour torchao's, and end to end is the measure;
* **end to end**: greedy ``generate`` of the dense SmolLM2 after ``quantize(model, 8)``, with
  torchao's linear and with the library's (the operator table switched before each call),
  beside the float model: prefill and decode speed.

Writes ``docs/results/bench_int8_linear.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from tensornet_llm import quantize
from tensornet_llm.helpers.data import HELD_OUT_TEXT, tokenize_text
from tensornet_llm.helpers.speed import ratios, time_generate
from tensornet_llm.saving import torchao_cpu

from harness import DTYPES, RESULTS, interleaved, machine, ratio, smollm2, write_results

#: SmolLM2-135M's linear layers, (out, in).
SHAPES = {"q_proj / o_proj": (576, 576), "k_proj / v_proj": (192, 576),
          "gate_proj / up_proj": (1536, 576), "down_proj": (576, 1536), "lm_head": (49152, 576)}


def table():
    """torchao's torch-function table of ``Int8Tensor``, where ``F.linear`` is looked up."""
    from torchao.quantization import Int8Tensor

    return Int8Tensor._TORCH_FN_TABLE[Int8Tensor]


def per_layer(rows: list[int], rounds: int, dtype: str) -> list[dict]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torchao_cpu.register()
    theirs, ours = torchao_cpu._torchao_linear, torchao_cpu._linear
    out = []
    for name, (n_out, n_in) in SHAPES.items():
        dense = torch.nn.Linear(n_in, n_out, bias=False, dtype=DTYPES[dtype])
        quantized = copy.deepcopy(dense)
        quantize_(quantized, Int8WeightOnlyConfig())
        w = quantized.weight
        for m in rows:
            x = torch.randn(m, n_in, dtype=DTYPES[dtype])
            repeat = max(1, int(2e7 // (n_out * n_in * max(m, 8))))
            with torch.inference_mode():
                times = interleaved({
                    "torchao": lambda: theirs(F.linear, (), (x, w), {}),
                    "library": lambda: ours(F.linear, (), (x, w), {}),
                    "float": lambda: dense(x)}, rounds, repeat=repeat)
            used = ("torchao" if m > torchao_cpu.FUSED_ROWS
                    else "blocked" if dtype == "float32" else "fused")
            row = {"dtype": dtype, "layer": name, "shape": [n_out, n_in], "rows": m,
                   "used": used, **{f"{k}_us": min(v) * 1e6 for k, v in times.items()}}
            for k in ("library", "float"):
                r = ratio(times[k], times["torchao"])
                row.update({f"{k}_ratio": r.best, f"{k}_low": r.low, f"{k}_high": r.high})
            print(row, flush=True)
            out.append(row)
    return out


class Switched:
    """``model.generate`` with ``fn`` as ``Int8Tensor``'s ``F.linear``."""

    def __init__(self, model, fn) -> None:
        self.model, self.fn = model, fn

    def generate(self, *args, **kwargs):
        table()[F.linear] = self.fn
        return self.model.generate(*args, **kwargs)


def end_to_end(rounds: int, prompt_tokens: int, new_tokens: int, dtype: str) -> list[dict]:
    model, tokenizer = smollm2(dtype)
    int8 = copy.deepcopy(model)
    quantize(int8, 8)
    theirs, ours = torchao_cpu._torchao_linear, table()[F.linear]
    prompt = tokenize_text(tokenizer, HELD_OUT_TEXT, prompt_tokens)[None]
    models = {dtype: Switched(model, ours), "int8, torchao's linear": Switched(int8, theirs),
              "int8, library's linear": Switched(int8, ours)}
    try:
        times = time_generate(models, prompt, new_tokens, rounds)
    finally:
        table()[F.linear] = ours
    out = []
    for name, t in times.items():
        row = {"dtype": dtype, "model": name}
        for phase, r in ratios(t, times["int8, torchao's linear"]).items():
            seconds = min(getattr(t, phase))
            row[f"{phase}_tokens_per_s"] = (prompt_tokens if phase == "prefill" else 1) / seconds
            row.update({f"{phase}_ratio": r.best, f"{phase}_low": r.low, f"{phase}_high": r.high})
        print(row, flush=True)
        out.append(row)
    return out


def write(out, meta: dict, layers: list[dict], models: list[dict]) -> None:
    spread = lambda r, k: f"{r[f'{k}_ratio']:.2f}x ({r[f'{k}_low']:.2f}x-{r[f'{k}_high']:.2f}x)"
    lines = ["# int8 linear on a CPU: the library's against torchao's conversion", "",
             f"{meta['threads']} CPU threads ({meta['machine']}, torch {meta['torch']}), "
             f"{meta['rounds']} interleaved rounds; ratios are torchao's time over the "
             "variant's, of the fastest rounds, with the lowest and highest ratio within a round "
             "(above 1: faster than torchao's). \"used\": what `quantize`d models run at that "
             "many rows (fused: torch's `_weight_int8pack_mm`; blocked: the float32 conversion "
             "block by block into one buffer; torchao: torchao's own). \"float\": the "
             "`nn.Linear` of that dtype. Written by `benchmarks/bench_int8_linear.py`.", "",
             "## Per layer", "",
             "| dtype | layer | (out, in) | rows | used | torchao us | library us | "
             "library vs torchao | float us | float vs torchao |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        lines.append(f"| {r['dtype']} | {r['layer']} | {tuple(r['shape'])} | {r['rows']} | "
                     f"{r['used']} | {r['torchao_us']:.0f} | {r['library_us']:.0f} | "
                     f"{spread(r, 'library')} | {r['float_us']:.0f} | {spread(r, 'float')} |")
    lines += ["", "## End to end", "",
              f"Dense SmolLM2-135M, greedy `generate` from a {meta['prompt']}-token prompt, "
              f"decode per token over {meta['new_tokens']} new tokens; ratios against the int8 "
              "model with torchao's linear, in the same dtype.", "",
              "| dtype | model | prefill tok/s | prefill vs torchao's | decode tok/s | "
              "decode vs torchao's |", "|---|---|---|---|---|---|"]
    for r in models:
        lines.append(f"| {r['dtype']} | {r['model']} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{spread(r, 'prefill')} | {r['decode_tokens_per_s']:.1f} | "
                     f"{spread(r, 'decode')} |")
    write_results(out, "bench_int8_linear", meta, layers + models, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 512])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=DTYPES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = machine(rounds=args.rounds, prompt=args.prompt, new_tokens=args.new_tokens)
    layers = [r for d in args.dtypes for r in per_layer(args.rows, args.rounds, d)]
    models = [r for d in args.dtypes for r in end_to_end(args.rounds, args.prompt,
                                                         args.new_tokens, d)]
    write(args.out, meta, layers, models)


if __name__ == "__main__":
    main()
