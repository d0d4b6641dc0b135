"""``share_mlp_rows``: gated MLPs whose kept-rows layers need no gather.

A gated MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (LLaMA, Mistral, Qwen,
Gemma and their kin). Where ``gate_proj`` and ``up_proj`` are kept-rows layers
(:class:`~tensornet_llm.layers.low_rank.KeptRowsLinear`), each puts its outputs back in order with
a gather of the ``(tokens, intermediate)`` output. But the two outputs meet only elementwise, so
the MLP computes the same function with its intermediate features in any order, as long as
``down_proj`` reads them in that order. :func:`share_mlp_rows` therefore

* gives the two layers one stacked order (the same weights up to float rounding:
  :func:`~tensornet_llm.layers.shared_rows.shared_row_order`), returned as it is (no ``order``
  buffer, no gather), and
* permutes ``down_proj``'s input columns to match (an ``nn.Linear`` or the first factor of a
  low-rank layer).

This is a change of weights, not of code: every module still runs its ordinary ``forward``, and
the model computes what it did. Only the MLP's intermediate features are numbered differently,
so ``gate_proj`` or ``up_proj`` called alone returns its features in stacked order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, RankDeficientError
from .low_rank import KeptRowsLinear, LowRankLinear
from .maxvol import inverse
from .shared_rows import shared_row_order

__all__ = ["share_mlp_rows"]


def _input_weight(down: nn.Module) -> Tensor | None:
    """The weight whose columns are ``down``'s input features: an ``nn.Linear``'s, or the first
    factor's of a low-rank layer (``None`` for anything else)."""
    if type(down) is nn.Linear:
        return down.weight
    if isinstance(down, LowRankLinear):
        return down.first.weight
    if isinstance(down, KeptRowsLinear):
        return down.kept.weight
    return None


def _shareable(mlp: nn.Module) -> bool:
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    down = getattr(mlp, "down_proj", None)
    return (isinstance(gate, KeptRowsLinear) and isinstance(up, KeptRowsLinear)
            and gate.order is not None and up.order is not None
            and isinstance(down, nn.Module) and callable(getattr(mlp, "act_fn", None))
            and gate.in_features == up.in_features and gate.out_features == up.out_features
            and (w := _input_weight(down)) is not None and w.shape[1] == gate.out_features
            and w.device.type != "meta")


@torch.no_grad()
def _probe(mlp: nn.Module) -> Tensor:
    """The MLP's output for a fixed random input of three tokens, in float64."""
    ref = mlp.gate_proj.kept.weight
    x = torch.randn(3, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    return mlp(x.to(device=ref.device, dtype=ref.dtype)).double()


def _swap(mlp: nn.Module, gate: nn.Module, up: nn.Module, columns: Tensor) -> None:
    """Install ``gate`` and ``up`` and reorder ``down_proj``'s input columns by ``columns``."""
    mlp.gate_proj, mlp.up_proj = gate, up
    weight = _input_weight(mlp.down_proj)
    weight.copy_(weight.index_select(1, columns.to(weight.device)))


@torch.no_grad()
def share_mlp_rows(model: nn.Module) -> list[str]:
    """Give every gated MLP of ``model`` whose ``gate_proj`` and ``up_proj`` are kept-rows layers
    one stacked row order, and ``down_proj`` the matching input order, in place (module docs):
    the MLP then runs without gathers. Each MLP is checked on a random input to compute what it
    did (relative error below 1e-3, or 5e-2 in a 2-byte dtype), and left as it was otherwise
    (or where no shared rows are independent). :func:`~tensornet_llm.compactify` does this by
    default.

    Returns:
        The qualified names of the MLPs changed.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    done = []
    for name, mlp in list(model.named_modules()):
        if not _shareable(mlp):
            continue
        gate, up = mlp.gate_proj, mlp.up_proj
        (u_gate, v_gate, b_gate), (u_up, v_up, b_up) = gate.factors(), up.factors()
        stacked = shared_row_order(u_gate, u_up)
        try:
            new = [KeptRowsLinear.from_factors(u, v, b, stacked=stacked, ordered=False)
                   for u, v, b in ((u_gate, v_gate, b_gate), (u_up, v_up, b_up))]
        except RankDeficientError:
            continue  # no independent shared rows: the MLP stays as it is
        for layer, old in zip(new, (gate, up)):
            layer.train(old.training).requires_grad_(old.kept.weight.requires_grad)
        before = _probe(mlp)
        _swap(mlp, *new, stacked)
        after = _probe(mlp)
        error = (after - before).norm() / before.norm().clamp_min(1e-30)
        if error <= (5e-2 if gate.kept.weight.dtype.itemsize <= 2 else 1e-3):
            done.append(name)
        else:  # not the usual gated MLP: back as it was
            _swap(mlp, gate, up, inverse(stacked))
    return done
