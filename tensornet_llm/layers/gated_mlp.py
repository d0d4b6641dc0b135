"""``share_mlp_rows``: gated MLPs whose kept-rows layers need no gather.

A gated MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (LLaMA, Mistral, Qwen,
Gemma and their kin). Where ``gate_proj`` and ``up_proj`` are kept-rows layers
(:class:`~tensornet_llm.layers.interpolative.InterpolativeLinear`), each puts its outputs back in
order with a gather of the ``(tokens, intermediate)`` output, which costs float32 prefill on a CPU
about a tenth of its time (measured by a diagnostic benchmark, in git history). :func:`share_mlp_rows` gives
the two layers one row order (the same weights, exactly up to float rounding:
:func:`~tensornet_llm.layers.shared_rows.shared_row_order`), stores ``down_proj``'s input columns
in that order where it is a kept-rows layer too, and runs the MLP as
``down.forward_stored_order(act(g) * u)`` on the unordered outputs ``g``, ``u``: no gather. Where
``down_proj`` is another module, the product is gathered once, into order, instead of twice.

The MLP's own ``forward`` still runs wherever the shortcut could differ from it: a member has been
replaced (a peft adapter, quantization) or re-arranged since (a LoRA merge), or carries hooks.
Each MLP is checked once, on a random input, to compute what its own ``forward`` computes before
the shortcut is installed. The layers themselves keep their meaning: each one called alone returns
its outputs in order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from ..errors import ArgumentError, RankDeficientError
from .interpolative import InterpolativeLinear
from .shared_rows import shared_row_order, unordered_outputs_of

__all__ = ["share_mlp_rows", "unshare_mlp_rows"]


@dataclass(frozen=True)
class _Shared:
    """What an MLP's shortcut was checked with: each member's ``order_stamp`` (``down`` is
    ``None`` where ``down_proj`` is not a kept-rows layer with the shared input order)."""

    gate: int
    up: int
    down: int | None


def _plain_call(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its ``forward`` and nothing else (no hooks)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _no_global_hooks() -> bool:
    return not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks
                or torch_module._global_backward_pre_hooks)


def _shared_forward(mlp: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """The installed ``forward``: the shortcut where it is valid (module docs), else the MLP's
    own ``forward``."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    shared: _Shared = mlp._shared_mlp_rows
    if (args or kwargs or type(gate) is not InterpolativeLinear
            or type(up) is not InterpolativeLinear or gate.order_stamp != shared.gate
            or up.order_stamp != shared.up or not (_plain_call(gate) and _plain_call(up))
            or not _no_global_hooks()):
        return type(mlp).forward(mlp, x, *args, **kwargs)
    if (gate._one_token_path(x) and up._one_token_path(x) and gate.bias is None
            and up.bias is None):  # batch-1 decode
        h = (mlp.act_fn(gate._forward_one_token(x, gather=False, ordered=False))
             * up._forward_one_token(x, gather=False, ordered=False))
    elif torch.is_grad_enabled() or torch.compiler.is_compiling():
        h = mlp.act_fn(unordered_outputs_of(gate, x)) * unordered_outputs_of(up, x)
    else:
        zx = _from_siblings(gate, up, x=x)
        h = mlp.act_fn(unordered_outputs_of(gate, x, zx[gate]))
        h.mul_(unordered_outputs_of(up, x, zx[up]))
    if (shared.down is not None and type(down) is InterpolativeLinear
            and down.order_stamp == shared.down and _plain_call(down)):
        return down.forward_stored_order(h)
    return down(h.index_select(-1, gate.row_order.to(h.device)))  # into order, once


def _from_siblings(*layers: InterpolativeLinear, x: Tensor) -> dict:
    """Each layer's ``x Z^T`` from its sibling group's stacked product (``None`` where it has
    none, or the group cannot serve it); asked in the group's call order, as the layers' own
    forwards would (:class:`~tensornet_llm.layers.siblings.SiblingGroup`)."""
    found = {layer: None for layer in layers}
    for layer in sorted(layers, key=lambda m: m._sibling_index):
        if layer._siblings is not None:
            found[layer] = layer._siblings.input_side(layer._sibling_index, x)
    return found


def _is_gated_mlp(module: nn.Module) -> bool:
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    return (type(gate) is InterpolativeLinear and type(up) is InterpolativeLinear
            and isinstance(getattr(module, "down_proj", None), nn.Module)
            and callable(getattr(module, "act_fn", None))
            and gate.in_features == up.in_features and gate.out_features == up.out_features
            and gate.input_order is None and up.input_order is None)


def _arrange(gate: InterpolativeLinear, up: InterpolativeLinear, down: nn.Module) -> None:
    """Give ``gate`` and ``up`` one row order and ``down`` (if kept rows) that input order."""
    left = [layer.factors()[0].detach() for layer in (gate, up)]
    stacked = shared_row_order(*left)
    states = [gate.state(), up.state()]
    try:
        gate.arrange_rows_(stacked)
        up.arrange_rows_(stacked)
    except RankDeficientError:
        gate.restore_(states[0])
        up.restore_(states[1])
        raise
    if type(down) is InterpolativeLinear and down.in_features == gate.out_features:
        down.permute_inputs_(stacked)


def _down_stamp(gate: InterpolativeLinear, up: InterpolativeLinear, down: nn.Module
                ) -> int | None:
    """``down``'s stamp where it stores its inputs in the order ``gate`` and ``up`` share."""
    if type(down) is not InterpolativeLinear or down.input_order is None:
        return None
    return down.order_stamp if torch.equal(down.input_order.cpu(), gate._stacked_rows()) else None


@torch.no_grad()
def _agrees(mlp: nn.Module) -> bool:
    """Whether the installed shortcut computes what the MLP's own ``forward`` does, on a
    random input of three tokens (relative error below 1e-3, or 5e-2 in a 2-byte dtype)."""
    ref = mlp.gate_proj.cores[1]
    if ref.device.type == "meta":
        return False
    x = torch.randn(3, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(device=ref.device, dtype=ref.dtype)
    own = type(mlp).forward(mlp, x)
    fast = _shared_forward(mlp, x)
    if not isinstance(own, Tensor) or own.shape != fast.shape:
        return False
    error = (fast.double() - own.double()).norm() / own.double().norm().clamp_min(1e-30)
    return bool(error <= (5e-2 if ref.dtype.itemsize <= 2 else 1e-3))


def share_mlp_rows(model: nn.Module, rearrange: bool = True) -> list[str]:
    """Run the gated MLPs of ``model`` without gathering their kept-rows outputs, in place.

    For every module with ``gate_proj`` and ``up_proj`` stored as kept rows (the default layout
    of :func:`~tensornet_llm.compactify`), a ``down_proj`` and an ``act_fn``: choose one row order
    for ``gate_proj`` and ``up_proj``, store ``down_proj``'s input columns in it (where it is a
    kept-rows layer), and install the gather-free ``forward`` (module docs). The weights are the
    same up to float rounding (the change of rows is computed in float64), and every layer
    called alone computes what it did. :func:`~tensornet_llm.compactify` does this by default and
    :func:`~tensornet_llm.load_compactified` re-installs it.

    Args:
        model: any ``nn.Module``.
        rearrange: choose shared rows where the two layers do not share them yet; ``False``
            only installs the ``forward`` where they do (as saved by an earlier call).

    Returns:
        The qualified names of the MLPs that now run without gathers.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    done = []
    for name, mlp in model.named_modules():
        if not _is_gated_mlp(mlp) or mlp.gate_proj.cores[1].device.type == "meta":
            continue
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        if not torch.equal(gate.row_order.cpu(), up.row_order.cpu()):
            if not rearrange:
                continue
            try:
                _arrange(gate, up, down)
            except RankDeficientError:
                continue  # no independent shared rows: the MLP runs as it did
        mlp._shared_mlp_rows = _Shared(gate.order_stamp, up.order_stamp,
                                       _down_stamp(gate, up, down))
        mlp.forward = functools.partial(_shared_forward, mlp)
        if _agrees(mlp):
            done.append(name)
        else:  # not the usual gated MLP: its own forward again
            _uninstall(mlp)
    return done


def _uninstall(mlp: nn.Module) -> None:
    mlp.__dict__.pop("forward", None)
    mlp.__dict__.pop("_shared_mlp_rows", None)


def unshare_mlp_rows(model: nn.Module) -> int:
    """Run every MLP of ``model`` through its own ``forward`` again (the rows stay shared, which
    changes nothing but speed); returns how many were running without gathers."""
    count = 0
    for mlp in model.modules():
        if "_shared_mlp_rows" in mlp.__dict__:
            _uninstall(mlp)
            count += 1
    return count
