"""``fuse_siblings``: run the input sides of low-rank layers that read one tensor as one matmul.

Which layers read the same input is found by watching one short forward pass, not by names:
layers whose forward receives the very same tensor object (q/k/v of an attention block,
gate/up of a gated MLP, in any architecture) become a
:class:`~tensornet_llm.layers.siblings.SiblingGroup`. See that module for what fusion changes
(speed only) and when a member runs alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers.siblings import SiblingGroup, can_stack, is_fusable
from .calibrate import model_inputs

__all__ = ["fuse_siblings", "unfuse_siblings"]


def _example_inputs(model: nn.Module, example: Tensor | dict[str, Any] | None) -> dict:
    if example is None:
        example = torch.zeros(1, 4, dtype=torch.long)
    if isinstance(example, Tensor):
        example = {"input_ids": example}
    if not isinstance(example, dict):
        raise ArgumentError(f"example must be a tensor of token ids or a dict of model inputs, "
                            f"got {type(example).__name__}")
    device = next(model.parameters()).device
    return model_inputs(model, example, device)


def fuse_siblings(model: nn.Module, example: Tensor | dict[str, Any] | None = None
                  ) -> list[tuple[str, ...]]:
    """Group the low-rank layers of ``model`` that read the same input tensor, in place.

    One forward pass of ``example`` (token ids ``(batch, seq)`` or a dict of model inputs;
    default four zero ids) records which low-rank layers (``MPOLinear`` with ``W = U V``)
    receive the very same tensor; each such set of two or more layers of one input size then
    runs its ``V`` factors as one stacked matmul in inference (gradients off, not compiled).
    Earlier groups are dissolved first. Outputs equal the unfused model's up to float rounding.
    Undo with :func:`unfuse_siblings`.

    Returns:
        The groups, as qualified module names in call order.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = _example_inputs(model, example)
    unfuse_siblings(model)
    calls: list[tuple[str, Tensor]] = []  # holding the inputs keeps their ids unique
    hooks = [module.register_forward_pre_hook(
                 lambda mod, args, name=name: calls.append((name, args[0])) if args else None)
             for name, module in model.named_modules() if is_fusable(module)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    by_input: dict[int, list[str]] = {}
    for name, x in calls:
        names = by_input.setdefault(id(x), [])
        if name not in names:
            names.append(name)
    groups = []
    for names in by_input.values():
        members = [model.get_submodule(n) for n in names]
        if len(members) >= 2 and can_stack(members) and all(
                getattr(m, "_siblings", None) is None for m in members):
            SiblingGroup(members)
            groups.append(tuple(names))
    return groups


def unfuse_siblings(model: nn.Module) -> int:
    """Dissolve every :class:`~tensornet_llm.layers.siblings.SiblingGroup` in ``model`` (each
    layer gets its own copy of its factors back); returns how many groups there were."""
    found = {id(g): g for m in model.modules() if (g := getattr(m, "_siblings", None)) is not None}
    for group in found.values():
        group.dissolve()
    return len(found)
