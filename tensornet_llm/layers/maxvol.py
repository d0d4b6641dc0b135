"""Maxvol: ``r`` rows of a tall matrix whose block has (locally) maximal volume.

Rows ``R`` of ``u`` ``(m, r)`` with ``u[R]`` of nearly maximal ``|det|`` make ``u u[R]^-1`` the
identity on ``R`` with every other entry near or below 1 in magnitude (Goreinov, Tyrtyshnikov
and Zamarashkin, 2010): the kept-rows layer (:mod:`~tensornet_llm.layers.low_rank`) and the
cross-layer gauge use them so that the coefficients they store stay small.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError, RankDeficientError

__all__ = ["maxvol_rows", "swap_update_", "kept_row_order", "permutation", "inverse",
           "index_buffer", "on_device"]


def maxvol_rows(u: Tensor, tol: float = 0.1, max_swaps: int | None = None) -> tuple[Tensor, Tensor]:
    """Rows ``R`` of ``u`` ``(m, r)``, ``m >= r``, whose ``r x r`` block has (locally) maximal
    volume, and ``B = u u[R]^-1`` ``(m, r)`` (identity on the rows ``R``, every entry at most
    ``1 + tol`` in magnitude unless ``max_swaps``, default ``r``, ran out first). Starts from
    LU with partial pivoting, then swaps rows while an entry of ``B`` exceeds ``1 + tol`` (each
    swap grows ``|det u[R]|`` by that entry). Raises :class:`RankDeficientError` when ``u`` has
    rank below ``r`` (no ``r`` of its rows are invertible)."""
    m, r = u.shape
    if m < r:
        raise ArgumentError(f"maxvol needs at least as many rows as columns, got {tuple(u.shape)}")
    u = u.double()
    lu, pivots, _ = torch.linalg.lu_factor_ex(u)
    rank_error = f"maxvol needs full column rank {r}, got a matrix of less"
    if bool((lu.diagonal()[:r] == 0).any()):
        raise RankDeficientError(rank_error)
    order = torch.arange(m)
    for k, p in enumerate((pivots - 1).tolist()):  # LAPACK's row interchanges, in sequence
        order[[k, p]] = order[[p, k]]
    rows = order[:r].clone()
    b = torch.linalg.solve(u[rows], u, left=False)  # u u[R]^-1
    for _ in range(max_swaps if max_swaps is not None else r):
        flat = int(b.abs().argmax())
        i, j = divmod(flat, r)
        if abs(float(b[i, j])) <= 1 + tol:
            break
        rows[j] = i
        swap_update_(b, i, j)
    # u[R] singular in floating point: B is not finite, or is no identity on R and the swaps
    # picked a row twice
    if not bool(torch.isfinite(b).all()) or rows.unique().numel() != r:
        raise RankDeficientError(rank_error)
    return rows, b


def swap_update_(b: Tensor, i: int, j: int) -> None:
    """Update ``b = u u[R]^-1`` ``(m, r)`` in place for kept rows ``R`` whose ``j``-th becomes
    row ``i`` of ``u`` (``R[j] = i``, set by the caller): a rank-one update. Before it,
    ``b[i, j]`` is the factor by which that swap scales ``|det u[R]|``."""
    bj, bi = b[:, j].clone(), b[i].clone()
    pivot = bi[j].clone()
    bi[j] -= 1
    b -= torch.outer(bj, bi / pivot)


def permutation(values: Sequence[int] | Tensor, n: int, argument: str, device) -> Tensor:
    """``values`` as an index buffer (:func:`index_buffer`), checked to permute ``range(n)``."""
    order = torch.as_tensor(values, dtype=torch.long)
    if sorted(order.tolist()) != list(range(n)):
        raise ArgumentError(f"{argument} must be a permutation of range({n})")
    return index_buffer(order, device)


def inverse(order: Tensor) -> Tensor:
    """``q`` with ``q[order[i]] = i`` (row order <-> stacked rows)."""
    result = torch.empty_like(order)
    result[order] = torch.arange(order.numel(), device=order.device)
    return result


def kept_row_order(rows: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """For kept rows ``rows`` among ``m``: the other rows in ascending order, and ``row_order``
    ``(m,)``, where each of the ``m`` rows sits in ``[rows, others]``."""
    rest = torch.ones(m, dtype=torch.bool, device=rows.device)
    rest[rows] = False
    others = rest.nonzero().squeeze(1)
    return others, inverse(torch.cat([rows, others]))


def index_buffer(values: Sequence[int] | Tensor, device) -> Tensor:
    """A long index tensor on ``device`` (on the CPU while building on ``meta``, so that the
    indices a layout holds survive loading; :func:`on_device` moves them where they are used)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.as_tensor(values, dtype=torch.long).to("cpu" if device.type == "meta" else device)


def on_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, without a call when it is there already (an index buffer that a
    model built on ``meta``, or a quantized skeleton, keeps on the CPU)."""
    return t if t.device == device else t.to(device)
