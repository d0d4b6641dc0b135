"""Generation speed of several models against one reference, measured the way the benchmarks do.

A single timing of a small model on a shared machine says little: the same run can be twice as
fast a minute later. So models are timed *interleaved*, every model once per round, in the same
process, for several rounds, and a model is compared with the reference in two ways:

* ``best``: the reference's fastest round over the model's fastest round;
* ``median``, ``low``, ``high``: the median, smallest and largest over rounds of the ratio within
  a round (the model against the reference run next to it in time, which cancels drift slower
  than a round). ``low`` to ``high`` is the spread a figure must clear to mean anything.

Ratios are reference time over model time: above 1, the model is faster.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["PHASES", "Ratio", "RoundTimes", "generate_seconds", "time_generate", "ratio",
           "ratios", "call_cost", "CALL_COST_SHAPES"]

#: ``prefill``: seconds of ``generate(max_new_tokens=1)``; ``decode``: seconds per new token.
PHASES = ("prefill", "decode")
#: ``(out, in)`` of the linears :func:`call_cost` times by default: a small transformer's.
CALL_COST_SHAPES = ((256, 256), (192, 576), (576, 576), (1536, 576), (576, 1536), (2048, 2048))


@dataclass
class RoundTimes:
    """Seconds per round of one model: prefill, and decode per new token."""

    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Ratio:
    """Reference time over model time (above 1: faster): see the module docs."""

    best: float
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x (rounds {self.low:.2f}x-{self.high:.2f}x)"


def generate_seconds(model: nn.Module, prompt: Tensor, new_tokens: int, static: bool = False,
                     pad_token_id: int | None = None) -> float:
    """Wall seconds of a greedy ``model.generate`` of exactly ``new_tokens`` from ``prompt``
    ``(batch, length)``; ``static``: with a static KV cache (for compiled forwards)."""
    kwargs = {"cache_implementation": "static"} if static else {}
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return time.perf_counter() - start


def time_generate(models: Mapping[str, nn.Module], prompt: Tensor, new_tokens: int = 32,
                  rounds: int = 5, static: bool = False, pad_token_id: int | None = None
                  ) -> dict[str, RoundTimes]:
    """Prefill and per-token decode seconds of every model in every round, the models
    interleaved (each runs once per round, in turn), after one warm-up generate each.

    Decode per token is ``(generate(1 + new_tokens) - generate(1)) / new_tokens`` of the same
    round, so prefill is not counted in it."""
    if rounds < 1 or new_tokens < 1:
        raise ValueError(f"rounds and new_tokens must be >= 1, got {rounds}, {new_tokens}")
    times = {name: RoundTimes() for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up (and compilation)
            generate_seconds(model, prompt, 2, static, pad_token_id)
        for _ in range(rounds):
            for name, model in models.items():
                prefill = generate_seconds(model, prompt, 1, static, pad_token_id)
                total = generate_seconds(model, prompt, 1 + new_tokens, static, pad_token_id)
                times[name].prefill.append(prefill)
                times[name].decode.append(max(total - prefill, 1e-9) / new_tokens)
    return times


def ratio(times: Sequence[float], reference: Sequence[float]) -> Ratio:
    """The :class:`Ratio` of ``reference`` seconds over ``times`` (rounds paired in order)."""
    within = [r / t for r, t in zip(reference, times)]
    return Ratio(best=min(reference) / min(times), median=statistics.median(within),
                 low=min(within), high=max(within))


def ratios(times: RoundTimes, reference: RoundTimes) -> dict[str, Ratio]:
    """Per phase, the :class:`Ratio` of ``reference`` over ``times``."""
    return {phase: ratio(getattr(times, phase), getattr(reference, phase)) for phase in PHASES}


@torch.no_grad()
def call_cost(shapes: Sequence[tuple[int, int]] = CALL_COST_SHAPES,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              rounds: int = 5, streamed_bytes: int = 64 * 2**20) -> float:
    """The fixed time of one eager ``nn.Linear`` call on one row (a decoding step at batch 1),
    in parameters' worth of weight reading: what ``CompactifyConfig.call_cost`` asks for.

    Each ``(out, in)`` of ``shapes`` is timed over enough distinct layers that their weights
    (``streamed_bytes`` in all) come from memory, not a cache, as a model's do when it decodes;
    the fastest of ``rounds`` per layer call is fitted by least squares as
    ``seconds = a * parameters + b``, and ``b / a`` (at least 0) is returned."""
    if rounds < 1 or len(shapes) < 2:
        raise ValueError(f"call_cost needs rounds >= 1 and two shapes, got {rounds}, {shapes}")
    size = torch.empty(0, dtype=dtype).element_size()
    points = []
    for out_f, in_f in shapes:
        layers = [nn.utils.skip_init(nn.Linear, in_f, out_f, bias=False, device=device,
                                     dtype=dtype) for _ in range(max(1, streamed_bytes
                                                                    // (out_f * in_f * size)))]
        for layer in layers:
            layer.weight.normal_()  # uninitialised memory may hold slow subnormal numbers
        x = torch.randn(1, in_f, device=device, dtype=dtype)
        best = math.inf
        for _ in range(rounds + 1):  # the first round warms up
            _synchronize(device)
            start = time.perf_counter()
            for layer in layers:
                layer(x)
            _synchronize(device)
            best = min(best, (time.perf_counter() - start) / len(layers))
        points.append((out_f * in_f, best))
    a, b = torch.linalg.lstsq(torch.tensor([[p, 1.0] for p, _ in points], dtype=torch.float64),
                              torch.tensor([[t] for _, t in points], dtype=torch.float64)
                              ).solution.reshape(-1).tolist()
    return max(b, 0.0) / a if a > 0 else math.inf


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
