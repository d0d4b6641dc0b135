"""One kept-rows order for two layers whose outputs only meet elementwise (a gated MLP's gate and up).

A kept-rows layer (:class:`~tensornet_llm.layers.low_rank.KeptRowsLinear`) computes its
outputs in *stacked* order, the kept rows ``R`` first and then the others, and puts them back in
order with one gather. In a gated MLP, ``down(act(gate(x)) * up(x))``, the gate and up outputs
meet only elementwise, so if both layers stacked their rows in one order, ``act(g) * u`` could be
computed in that order and handed to ``down`` with its input columns stored in the same order:
no gather at all. That needs nested kept rows: with ranks ``r_small <= r_large``, a permutation
``s`` of the output rows whose first ``r_small`` entries are kept by both layers and whose first
``r_large`` are kept by the larger.

The rows decide how large the combination coefficients ``Y`` get. Each layer's own maxvol rows keep
them below 1.1; a shared order costs some of that. :func:`shared_row_order` chooses it as
a diagnostic benchmark (in git history) measured best: where the ranks differ, the smaller layer
keeps its maxvol rows and the larger adds its own by maxvol swaps that leave those in place (largest
coefficient below 3 at keep 80% on SmolLM2); where they are equal, swaps grow the product of both
blocks' volumes (below 5). :func:`unordered_outputs_of` is the layer's forward without the gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentError
from .maxvol import maxvol_rows, swap_update_

__all__ = ["shared_row_order", "extend_rows", "joint_rows"]


def extend_rows(u: Tensor, fixed: Tensor, tol: float) -> Tensor:
    """``r`` rows of ``u`` ``(m, r)`` that start with ``fixed`` (kept first, in place) and whose
    block has locally maximal volume among such sets: the others start greedily from what
    ``fixed`` leaves unexplained (the row with the largest residual, then project it out), then
    maxvol swaps that never move a fixed row."""
    m, r = u.shape
    k = fixed.numel()
    if k == r:
        return fixed.clone()
    basis = torch.linalg.qr(u[fixed].T).Q  # (r, k): the span of the fixed rows
    residual = u - (u @ basis) @ basis.T
    residual[fixed] = 0
    picked = []
    for _ in range(r - k):
        i = int(residual.norm(dim=1).argmax())
        picked.append(i)
        v = residual[i] / residual[i].norm()
        residual = residual - torch.outer(residual @ v, v)
        residual[i] = 0
    rows = torch.cat([fixed, torch.tensor(picked, dtype=torch.long)])
    b = torch.linalg.solve(u[rows], u, left=False)
    for _ in range(r):
        free = b[:, k:].abs()
        flat = int(free.argmax())
        i, j = divmod(flat, r - k)
        if float(free.view(-1)[flat]) <= 1 + tol:
            break
        rows[k + j] = i
        swap_update_(b, i, k + j)
    return rows


def joint_rows(u: Tensor, w: Tensor, tol: float) -> Tensor:
    """``r`` rows good for both ``u`` and ``w`` ``(m, r)``: from ``u``'s maxvol rows, swaps while
    one grows ``|det u[R]| * |det w[R]|`` by more than ``1 + tol`` (swapping block row ``j`` for
    row ``i`` scales the two by ``(u u[R]^-1)[i, j]`` and ``(w w[R]^-1)[i, j]``)."""
    rows, bu = maxvol_rows(u, tol)
    bw = torch.linalg.solve(w[rows], w, left=False)
    for _ in range(4 * u.shape[1]):
        gain = (bu * bw).abs()
        flat = int(gain.argmax())
        if float(gain.view(-1)[flat]) <= 1 + tol:
            break
        i, j = divmod(flat, u.shape[1])
        rows[j] = i
        swap_update_(bu, i, j)
        swap_update_(bw, i, j)
    return rows


def shared_row_order(u_a: Tensor, u_b: Tensor, tol: float = 0.1) -> Tensor:
    """A stacked order ``s`` ``(m,)`` of the ``m`` output rows good for two low-rank layers with
    left factors ``u_a`` ``(m, r_a)`` and ``u_b`` ``(m, r_b)``: each layer keeps the first of its
    rank's rows of ``s``, and the rest follow in ascending order (see the module docs for how the
    rows are chosen). Computed in float64; raises
    :class:`~tensornet_llm.errors.RankDeficientError` where a factor has less than full column
    rank."""
    if u_a.dim() != 2 or u_b.dim() != 2 or u_a.shape[0] != u_b.shape[0]:
        raise ArgumentError(f"left factors must be (m, r) with one m, got {tuple(u_a.shape)} "
                            f"and {tuple(u_b.shape)}")
    u_a, u_b = u_a.detach().double().cpu(), u_b.detach().double().cpu()
    if u_a.shape[1] == u_b.shape[1]:
        rows = joint_rows(u_a, u_b, tol)
    else:
        small, large = sorted((u_a, u_b), key=lambda u: u.shape[1])
        rows = extend_rows(large, maxvol_rows(small, tol)[0], tol)
    rest = torch.ones(u_a.shape[0], dtype=torch.bool)
    rest[rows] = False
    return torch.cat([rows, rest.nonzero().squeeze(1)])

