"""Calibration passes: run real inputs through a model to collect each layer's activations.

:func:`calibrated_order` groups target modules by transformer block so that ``compactify`` can
process blocks in order, and :func:`collect_covariances` runs the calibration batches through
the model *up to and including* one block (the forward pass is cut right after it), collecting
the input covariance of that block's targets. Since earlier blocks are already compressed at
that point, each block is fitted to the activations the compressed model really produces (as
SVD-LLM does), so errors do not compound unseen.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from .fit import CovarianceCollector
from .targets import block_stacks

__all__ = ["as_batches", "calibrated_order", "collect_covariances"]


class _StopForward(Exception):
    pass


def as_batches(calibration: Iterable[Any]) -> list[dict[str, Tensor]]:
    """Materialise calibration data: token-id tensors ``(batch, seq)`` or ``(seq,)``, or dicts
    of model inputs (a DataLoader of either works)."""
    batches = []
    for item in calibration:
        if isinstance(item, Tensor):
            ids = item if item.dim() == 2 else item.reshape(1, -1)
            batches.append({"input_ids": ids.long()})
        elif isinstance(item, Mapping) and "input_ids" in item:
            batches.append(dict(item))
        else:
            raise ValueError(
                "calibration must yield token-id tensors or dicts with 'input_ids', got "
                f"{type(item).__name__}"
            )
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def _block_prefix(name: str, stacks: list[str]) -> str | None:
    for stack in sorted(stacks, key=len, reverse=True):
        if name.startswith(stack + "."):
            index = name[len(stack) + 1 :].split(".", 1)[0]
            return f"{stack}.{index}"
    return None


def calibrated_order(
    model: nn.Module, names: list[str]
) -> list[tuple[nn.Module | None, list[str]]]:
    """``[(block, target names in it)]`` in forward order of the blocks; targets outside any
    block come last with ``block=None`` (their covariances need a full forward pass)."""
    stacks = block_stacks(model)
    order: dict[str | None, list[str]] = {}
    for name in names:
        order.setdefault(_block_prefix(name, stacks), []).append(name)
    blocks = [p for p in order if p is not None]
    # ModuleList order is forward order; stacks in module registration order (encoder first).
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}
    blocks.sort(key=lambda p: rank[p])
    out: list[tuple[nn.Module | None, list[str]]] = [
        (model.get_submodule(p), order[p]) for p in blocks
    ]
    if None in order:
        out.append((None, order[None]))
    return out


@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    modules: dict[str, nn.Module],
    stop_after: nn.Module | None = None,
) -> CovarianceCollector:
    """Input covariances of ``modules`` over all batches; the forward stops after ``stop_after``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def stop(*_: Any) -> None:
        raise _StopForward

    handle = stop_after.register_forward_hook(stop) if stop_after is not None else None
    try:
        with CovarianceCollector(modules) as collector:
            for batch in batches:
                inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                if "decoder_input_ids" not in inputs and getattr(model.config, "is_encoder_decoder", False):
                    inputs["decoder_input_ids"] = inputs["input_ids"]
                try:
                    model(**inputs)
                except _StopForward:
                    pass
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    missing = [n for n in modules if collector.tokens(n) == 0]
    if missing:
        raise ValueError(f"no calibration activations reached {missing[:3]}")
    return collector
