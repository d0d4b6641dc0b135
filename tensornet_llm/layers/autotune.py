"""Measure, on this machine, which contraction strategy is faster for each tensor-network layer.

A layer with ``strategy="auto"`` picks per call between contracting the input through the
network and rebuilding the dense weight for one matmul, by a cost model (FLOPs, memory traffic,
kernel count). Where the two are close the model can be wrong by 10-30% on a given machine;
:func:`autotune` times both strategies for every distinct network shape in a model at the batch
sizes you will run, and ``"auto"`` follows the measurement from then on, in this process. Like
``torch.backends.cudnn.benchmark`` the result belongs to the machine, not the model: it is not
saved with it. Layers that share a shape (every ``q_proj`` of a uniform compactify, say) are
timed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from .base import TensorNetworkLinear
from .contract import NetworkSpec, batch_bucket, tune_strategy
from .quantized import QuantizedTensorNetworkLinear

__all__ = ["TuneRow", "autotune"]


@dataclass(frozen=True)
class TuneRow:
    """One measurement: the layers sharing a network shape, at one batch bucket.

    Attributes:
        modules: qualified names of the layers this measurement applies to.
        batch: the batch bucket (rows = batch x sequence length, rounded up to a power of two).
        network_seconds, dense_seconds: fastest time per call of each strategy.
    """

    modules: tuple[str, ...]
    batch: int
    network_seconds: float
    dense_seconds: float

    @property
    def choice(self) -> Literal["network", "dense"]:
        """The strategy ``"auto"`` now uses for these layers at this batch bucket."""
        return "network" if self.network_seconds < self.dense_seconds else "dense"


def autotune(
    model: nn.Module,
    batch_sizes: Sequence[int] = (1, 16, 512, 2048),
    repeats: int = 3,
    min_seconds: float = 0.2,
) -> list[TuneRow]:
    """Time both strategies of every tensor-network layer in ``model`` and remember the faster.

    Args:
        model: a compactified model, or a single :class:`TensorNetworkLinear`; its layers stay
            on their device and dtype, which is what is measured.
        batch_sizes: numbers of input rows (tokens across the batch) to tune for; each is
            rounded up to its power-of-two bucket, and the choice holds for the whole bucket.
        repeats: timed rounds per strategy at least, after one warm-up round (the fastest
            counts).
        min_seconds: keep timing rounds until this long has passed per layer shape and batch
            bucket (fast calls get many rounds; slow ones just ``repeats``).

    Returns:
        One :class:`TuneRow` per distinct network shape and batch bucket.
    """
    if isinstance(batch_sizes, int) or not batch_sizes or any(
        not isinstance(b, int) or b < 1 for b in batch_sizes
    ):
        raise ArgumentError(
            f"batch_sizes must be a non-empty sequence of ints >= 1, got {batch_sizes!r}"
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise ArgumentError(f"repeats must be an int >= 1, got {repeats!r}")
    if not min_seconds >= 0:
        raise ArgumentError(f"min_seconds must be >= 0, got {min_seconds!r}")
    # Layers with the same timing key share one measurement: (first such layer, all names).
    groups: dict[tuple, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (TensorNetworkLinear, QuantizedTensorNetworkLinear)):
            groups.setdefault((*_shape_key(module), type(module)), (module, []))[1].append(name)
    if not groups:
        raise ArgumentError("model has no tensor-network layers to tune: run compactify first")
    rows = []
    buckets = sorted({batch_bucket(b) for b in batch_sizes})
    with torch.no_grad():
        for layer, names in groups.values():
            spec, operands, bias = _contraction(layer)
            for bucket in buckets:
                seconds = tune_strategy(spec, operands, bias, layer.in_features,
                                        layer.out_features, bucket, repeats, min_seconds)
                rows.append(TuneRow(tuple(names), bucket, seconds["network"], seconds["dense"]))
    return rows


def _shape_key(module: nn.Module) -> tuple:
    """What decides a layer's timing: network shape, feature counts, device and dtype."""
    if isinstance(module, QuantizedTensorNetworkLinear):
        first = module.qcores[0]
        spec, device, dtype = module.structure.spec, first.codes.device, first.dtype
    else:
        spec, device, dtype = module.spec, module.cores[0].device, module.cores[0].dtype
    return spec, module.in_features, module.out_features, device, dtype


def _contraction(module: nn.Module) -> tuple[NetworkSpec, list[Tensor], Tensor | None]:
    """``(spec, operands, bias)`` a layer passes to :func:`~tensornet_llm.layers.contract.tn_linear`
    (a quantized layer's operands dequantized, as its forward does on every call)."""
    if isinstance(module, QuantizedTensorNetworkLinear):
        structure = module.structure
        return structure.spec, structure._operands(module.cores()), module.bias
    return module.spec, module._operands(), module.bias
