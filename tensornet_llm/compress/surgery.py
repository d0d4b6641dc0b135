"""The swap machinery every compression path shares: build one replacement layer (decompose,
then fit to calibration statistics), swap modules in by name, and undo every swap on any error,
so that a model is either wholly compressed or left exactly as it was."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..helpers.progress import Tick, stage
from ..layers.base import linear_weight
from ..layers.layout import CompressedLayer
from .config import CompactifyConfig
from .fit import (
    corrected_target, fit_weighted, kronecker_whitened, weighted_error, whitened_start_is_optimal,
)
from .report import LayerReport

__all__ = ["relative_error", "count_parameters", "build_layer", "swap", "swaps_undone_on_error",
           "originals_in_place", "Swaps", "replacing"]

def relative_error(approx: torch.Tensor, exact: torch.Tensor, rows: int = 256) -> float:
    """``||approx - exact||_F / ||exact||_F`` in float64, ``rows`` rows at a time (no float64
    copy of a whole weight)."""
    diff = norm = 0.0
    for a, e in zip(approx.split(rows), exact.split(rows)):
        e64 = e.double()
        diff += float((a.double() - e64).pow(2).sum())
        norm += float(e64.pow(2).sum())
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-30)


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def build_layer(
    name: str, module: nn.Module, setting: tuple, cfg: CompactifyConfig, cov: torch.Tensor | None,
    cross: torch.Tensor | None = None, rows: torch.Tensor | None = None,
) -> tuple[CompressedLayer, LayerReport]:
    """The replacement for one module: decomposed, then fitted when ``cov`` is given (to the
    dense outputs when ``cross``, the reference-by-own input statistics, is given too; with
    output row weights ``rows`` (:func:`~.fit.output_weights`) when given)."""
    layout, chi = setting
    t0 = time.perf_counter()
    weight, bias = linear_weight(module)
    target = weight.detach()
    if cross is not None:
        target = corrected_target(target, cov, cross).to(weight.dtype)
    new = layout.factor_form().decompose(target, bias, chi, tol=cfg.tol)
    act_start = act_end = None
    if cov is not None:
        act_start = weighted_error(new.to_dense().detach(), target, cov)
        # Start from whichever is better on the data: TT-SVD of W, or of W whitened site by site.
        whitened = kronecker_whitened(new, target, cov, rows=rows)
        optimal = False
        if whitened is not None:
            # With weighted rows an optimal start minimises the weighted objective, which the
            # unweighted error would not rank first.
            solved = rows is not None and whitened_start_is_optimal(whitened, rows)
            if solved or weighted_error(whitened.to_dense().detach(), target, cov) < act_start:
                with torch.no_grad():
                    for p, q in zip(new.cores, whitened.cores):
                        p.copy_(q)
                optimal = whitened_start_is_optimal(new, rows)
        if cfg.fit_steps > 0 and not optimal:  # an optimal start leaves the fit nothing to do
            fit_weighted(new, target, cov, steps=cfg.fit_steps, rows=rows)
    new = layout.stored(new)
    with torch.no_grad():
        dense = new.to_dense()
    if cov is not None:
        act_end = weighted_error(dense, target, cov)
    err = relative_error(dense, weight.detach())
    new.requires_grad_(weight.requires_grad)
    new.train(module.training)
    row = LayerReport(
        name=name, in_features=new.in_features, out_features=new.out_features,
        method=layout.name, chi=chi, bond_dims=list(new.bond_dims),
        params_before=weight.numel() + (bias.numel() if bias is not None else 0),
        params_after=new.num_parameters, rel_error=err, seconds=time.perf_counter() - t0,
        act_error_start=act_start, act_error=act_end,
    )
    return new, row


@contextmanager
def swaps_undone_on_error(done: list[tuple[nn.Module, str, nn.Module]]):
    """On any error inside, put back every original module (or attribute) ``done`` swapped
    out (newest first) and re-raise."""
    try:
        yield
    except BaseException:
        for parent, child, original in reversed(done):
            setattr(parent, child, original)
        raise


@contextmanager
def originals_in_place(done: list[tuple[nn.Module, str, nn.Module]]):
    """Temporarily put the original modules back where ``done`` swapped them out."""
    current = [(parent, child, getattr(parent, child)) for parent, child, _ in done]
    for parent, child, original in done:
        setattr(parent, child, original)
    try:
        yield
    finally:
        for parent, child, new in current:
            setattr(parent, child, new)


def swap(model: nn.Module, name: str, new: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """Put ``new`` where the submodule ``name`` is; returns ``(parent, attribute, old)``, what
    :func:`swaps_undone_on_error` needs to put the old one back."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return parent, child, old


class Swaps:
    """The swaps one compression makes in ``model``, in order (what undoing them needs)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.done: list[tuple[nn.Module, str, nn.Module]] = []

    def swap(self, name: str, new: nn.Module) -> None:
        self.done.append(swap(self.model, name, new))

    def set(self, module: nn.Module, attribute: str, value: object) -> None:
        """Set a plain attribute of ``module`` (a slim attention's query-head count), undone
        with the swaps."""
        self.done.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, value)


@contextmanager
def replacing(model: nn.Module, total: int, description: str, unit: str,
              progress: bool) -> Iterator[tuple[Swaps, Tick]]:
    """The skeleton of a compression pass: a progress bar of ``total`` ``unit``\\ s, and the
    :class:`Swaps` made inside, every one undone if anything inside raises."""
    swaps = Swaps(model)
    with stage(description, total, unit, progress, leave=True) as tick:
        with swaps_undone_on_error(swaps.done):
            yield swaps, tick
