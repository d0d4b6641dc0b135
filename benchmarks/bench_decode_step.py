"""Where one decoded token's time goes: the linear layers against everything else (SmolLM2-135M).

Compression only shortens the linear layers of a decode step; attention over the KV cache,
norms, rotary embeddings, the cache update and the Python around them stay as they were. This
measures both parts, for the dense model and ``compactify(model, ratio=keep)`` at each
``--keep`` (default layouts, no calibration: speed does not depend on the weights' values):

* **step**: one forward pass of one token (batch 1) after a ``--prompt``-token prompt, with a
  transformers ``DynamicCache`` cropped back after every step, so every step sees the same
  cache length;
* **linear layers**: every compressible linear of the blocks (what ``compactify`` targets)
  called once, in forward order, on the input it received in a real decode step: one sweep
  reads each weight once, as a step does;
* **everything else**: step minus linear layers.

Models are interleaved round by round in one process; the fastest of ``--rounds`` rounds
counts, each round the mean of ``--steps`` steps or sweeps. The *ceiling* is what the step
would reach if the linear layers' time followed their bytes and nothing else changed:
``dense step / (dense rest + dense linears x bytes ratio)``. Writes
``docs/results/bench_decode_step.{json,md}``.

    python benchmarks/bench_decode_step.py                    # keep 80% and 50%, float32
    python benchmarks/bench_decode_step.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from torch import nn

from harness import interleaved, machine, ratio, speed_arguments, timed_models, write_results
from tensornet_llm.compress.targets import find_targets


class Decoder:
    """One model's decode step and linear sweep, on a cache filled by one prompt."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, names: list[str]) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        self.token = self._forward(prompt).logits[:, -1:].argmax(-1)
        self.modules = [model.get_submodule(name) for name in names]
        self.calls: list[tuple[nn.Module, torch.Tensor]] = []  # in the order the step ran them
        hooks = [m.register_forward_pre_hook(lambda m, args: self.calls.append((m, args[0])))
                 for m in self.modules]
        self.step()
        for hook in hooks:
            hook.remove()

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # past_key_values' new name
            return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)

    @torch.inference_mode()
    def step(self) -> None:
        self._forward(self.token)
        self.cache.crop(-1)  # back to the prompt's length

    @torch.inference_mode()
    def sweep(self) -> None:
        for module, x in self.calls:
            module(x)

    def linear_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.modules for p in m.parameters())


def table(meta: dict, rows: list[dict]) -> list[str]:
    """The results file's Markdown: the settings, then a row per model."""
    lines = [
        "# One decoded token: the linear layers against everything else (SmolLM2-135M)", "",
        f"Batch 1, one token after a {meta['prompt']}-token prompt, {meta['dtype']}, "
        f"{meta['threads']} CPU threads ({meta['machine']}, torch {meta['torch']}); fastest of "
        f"{meta['rounds']} interleaved rounds of {meta['steps']}. *Linear layers*: every targeted "
        "linear of the blocks once, in forward order, on its input from a real step. *Ceiling*: "
        "the step's speed against dense if the linear layers' time followed their bytes; "
        "*within rounds*: the median and range of the ratio within a round. "
        "Written by `benchmarks/bench_decode_step.py`.", "",
        "| model | step | linear layers | everything else | linear share | step vs dense "
        "| step vs dense within rounds | linear layers vs dense | linear bytes vs dense "
        "| ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['step_ms']:.1f} ms | {r['linears_ms']:.1f} ms | "
            f"{r['rest_ms']:.1f} ms | {r['linear_share']:.0%} | {r['step_speed']:.2f}x | "
            f"{r['step_rounds']} | {r['linear_speed']:.2f}x | {r['linear_bytes']:.2f} | "
            f"{r['ceiling']:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    speed_arguments(parser, rounds=5)
    parser.add_argument("--steps", type=int, default=20, help="steps (or sweeps) per round")
    args = parser.parse_args()
    models = timed_models(args, parser)
    dense = models["dense"]
    prompt = torch.randint(100, 10000, (1, args.prompt))
    names = [name for name, _ in find_targets(dense)[0]]  # in forward order
    decoders = {name: Decoder(model, prompt, names) for name, model in models.items()}
    calls = {(name, part): getattr(d, method) for name, d in decoders.items()
             for part, method in (("step", "step"), ("linears", "sweep"))}
    times = interleaved(calls, args.rounds, repeat=args.steps, warmup=args.steps)
    best = {name: {part: min(times[name, part]) for part in ("step", "linears")}
            for name in decoders}
    base = best["dense"]
    dense_bytes = decoders["dense"].linear_bytes()
    rows = []
    for name, d in decoders.items():
        b = best[name]
        byte_share = d.linear_bytes() / dense_bytes
        rest = b["step"] - b["linears"]
        rows.append({
            "model": name, "step_ms": b["step"] * 1e3, "linears_ms": b["linears"] * 1e3,
            "rest_ms": rest * 1e3, "linear_share": b["linears"] / b["step"],
            "step_speed": base["step"] / b["step"], "linear_speed": base["linears"] / b["linears"],
            "step_rounds": str(ratio(times[name, "step"], times["dense", "step"])),
            "linear_bytes": byte_share,
            "ceiling": base["step"] / (base["step"] - base["linears"]
                                       + base["linears"] * byte_share),
        })
        print(json.dumps(rows[-1]), flush=True)
    meta = machine(dtype=args.dtype, prompt=args.prompt, steps=args.steps, rounds=args.rounds)
    lines = table(meta, rows)
    write_results(args.out, "bench_decode_step", meta, rows, lines)


if __name__ == "__main__":
    main()
