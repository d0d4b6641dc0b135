"""DMRG-style sweeps for one MPO layer: the data-aware fit one core (or two) at a time.

The objective is :func:`~tensornet_llm.compress.fit.fit_weighted`'s,
``||(W - W_hat) L||_F^2`` with ``C = L L^T`` the layer's input covariance. :func:`sweep_mpo`
minimises it by alternating over the cores instead of by L-BFGS over all of them at once:

1. **Coordinates.** Every input leg is whitened by the Kronecker factor of ``C`` at its site
   (``C ~ C_1 x ... x C_N``, :class:`~tensornet_llm.compress.fit.SiteWhitening`): the target is
   ``W~ = W (L_1 x ... x L_N)`` and the residual is measured with ``P = (L_1 x ... x L_N)^-1 L``,
   which is the identity when ``C`` is exactly a Kronecker product.
2. **Canonical form.** The cores left of the one being updated are left-orthonormal and those
   right of it right-orthonormal (QR), as in DMRG. Then the map from the free core to ``W~`` is
   an isometry, so the local problem's Hessian is ``I`` up to how far ``C`` is from a
   Kronecker product, and a few conjugate-gradient steps solve it.
3. **Local solve.** With the other cores fixed, ``W_hat`` is linear in the free core (or in the
   merged pair of neighbours, for two-site updates), so the objective is a convex quadratic in
   it: conjugate gradients, warm-started from the current core, never raise it.
4. **Two-site updates** (``two_site=True``) optimise the product of neighbours ``k, k+1`` and
   split it again by a truncated SVD at the bond's dimension, which also moves the gauge; the
   discarded singular values of every bond are reported.

Bond dimensions are kept (the budget chose them). Zero-padded layers are not supported (the
covariance does not cover the padding); trees (TTNS) are not either: their canonical form is a
different walk. Shapes: a core ``k`` is ``(r_{k-1}, o_k, i_k, r_k)`` with ``r_0 = r_N = 1``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ArgumentError
from ..layers.mpo import MPOLinear
from .fit import SiteWhitening, stable_cholesky

__all__ = ["SweepResult", "sweep_mpo"]


@dataclass
class SweepResult:
    """Weighted relative error ``||(W - W_hat) L|| / ||W L||`` at the start and after every
    local update, the seconds at each of those points, and the discarded weight of every bond
    at its last two-site split (empty for one-site sweeps)."""

    start_error: float
    final_error: float
    history: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    discarded: dict[int, float] = field(default_factory=dict)


def _chain(tensors: list[Tensor], out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> Tensor:
    """``W (out, in)`` of a chain of site tensors ``(r, o_k, i_k, [o_k+1, i_k+1,] r')``."""
    t = tensors[0]
    for nxt in tensors[1:]:
        t = torch.tensordot(t, nxt, dims=([-1], [0]))
    n = len(out_shape)
    t = t.reshape(*[d for pair in zip(out_shape, in_shape) for d in pair])  # o1 i1 o2 i2 ...
    t = t.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))
    return t.reshape(math.prod(out_shape), math.prod(in_shape))


def _conjugate_gradients(apply_h, rhs: Tensor, start: Tensor, steps: int) -> Tensor:
    """``steps`` CG iterations on ``H x = rhs`` (``H`` symmetric positive semi-definite), from
    ``start``; each iterate lowers ``x^T H x / 2 - rhs^T x``."""
    x = start.clone()
    r = rhs - apply_h(x)
    p = r.clone()
    rr = (r * r).sum()
    for _ in range(steps):
        if float(rr) <= 1e-30 * max(float((rhs * rhs).sum()), 1e-300):
            break
        hp = apply_h(p)
        curvature = (p * hp).sum()
        if float(curvature) <= 0:
            break
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * hp
        rr_new = (r * r).sum()
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def _left_orthonormalize(cores: list[Tensor], k: int) -> None:
    """Make core ``k`` left-orthonormal by QR, pushing ``R`` into core ``k + 1`` (in place)."""
    c = cores[k]
    q, r = torch.linalg.qr(c.reshape(-1, c.shape[-1]))
    cores[k] = q.reshape(*c.shape[:-1], q.shape[-1])
    cores[k + 1] = torch.tensordot(r, cores[k + 1], dims=([1], [0]))


def _right_orthonormalize(cores: list[Tensor], k: int) -> None:
    """Make core ``k`` right-orthonormal by LQ, pushing ``L`` into core ``k - 1`` (in place)."""
    c = cores[k]
    q, r = torch.linalg.qr(c.reshape(c.shape[0], -1).T)
    cores[k] = q.T.reshape(q.shape[-1], *c.shape[1:])
    cores[k - 1] = torch.tensordot(cores[k - 1], r.T, dims=([-1], [0]))


@torch.no_grad()
def sweep_mpo(
    layer: MPOLinear,
    weight: Tensor,
    cov: Tensor,
    sweeps: int = 2,
    two_site: bool = False,
    cg_steps: int = 8,
) -> SweepResult:
    """Refine ``layer``'s cores by alternating sweeps on ``||(W - W_hat) L||_F^2`` (in place).

    Args:
        layer: an unpadded :class:`MPOLinear` with at least two sites; its cores are the start
            (e.g. the whitened TT-SVD that :func:`~tensornet_llm.compress.fit.kronecker_whitened`
            gives).
        weight: the dense target ``(out_features, in_features)``.
        cov: the input covariance ``(in_features, in_features)``.
        sweeps: left-to-right-and-back passes over the cores.
        two_site: update neighbouring pairs and split them by SVD (DMRG's two-site update)
            instead of single cores.
        cg_steps: conjugate-gradient iterations per local update.

    The work is in float64; the result is written back in the layer's dtype. The error never
    rises from one local update to the next: each is a CG solve of a convex quadratic from the
    current core, and a two-site split that would end worse than before is undone.
    """
    if not isinstance(layer, MPOLinear) or layer.n_sites < 2:
        raise ArgumentError("layer must be an MPOLinear with at least two sites")
    if layer.padded_in != layer.in_features or layer.padded_out != layer.out_features:
        raise ArgumentError("sweep_mpo needs an unpadded layer (the covariance does not cover the "
                            "padding)")
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ArgumentError(f"weight must be ({layer.out_features}, {layer.in_features}), got "
                            f"{tuple(weight.shape)}")
    if tuple(cov.shape) != (layer.in_features,) * 2:
        raise ArgumentError(f"cov must be ({layer.in_features}, {layer.in_features}), got "
                            f"{tuple(cov.shape)}")
    for name, value, low in (("sweeps", sweeps, 0), ("cg_steps", cg_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
    start_time = time.perf_counter()
    f64 = dict(dtype=torch.float64, device=layer.cores[0].device)
    out_shape, in_shape = tuple(layer.out_shape), tuple(layer.in_shape)
    n = len(out_shape)
    whitening = SiteWhitening(cov.to(**f64), in_shape)
    target = whitening.whiten(weight.to(**f64))  # W~ = W (L_1 x ... x L_N)
    kron_inverse = whitening.inverses[0]
    for inverse in whitening.inverses[1:]:
        kron_inverse = torch.kron(kron_inverse, inverse)
    p = kron_inverse.to(**f64) @ stable_cholesky(cov.to(**f64))  # residual metric: Q = P P^T
    q = p @ p.T
    norm = float(((target @ p) ** 2).sum().clamp_min(1e-300))

    # Whitened cores: G~_k[.., j, ..] = sum_i G_k[.., i, ..] L_k[i, j].
    cores = [torch.movedim(torch.tensordot(c.detach().to(**f64), f.to(**f64), dims=([2], [0])),
                           -1, 2) for c, f in zip(layer.cores, whitening.factors)]

    def error(tensors: list[Tensor]) -> float:
        """The weighted relative error (not squared)."""
        residual = (_chain(tensors, out_shape, in_shape) - target) @ p
        return (float((residual ** 2).sum()) / norm) ** 0.5

    def solve(tensors: list[Tensor], free: int) -> Tensor:
        """The free tensor's CG update; ``W_hat`` is linear in it."""
        def linear(x: Tensor) -> Tensor:
            return _chain(tensors[:free] + [x] + tensors[free + 1:], out_shape, in_shape)

        def adjoint(y: Tensor) -> Tensor:  # J^T y through autograd of the linear map
            with torch.enable_grad():
                x = torch.zeros_like(tensors[free], requires_grad=True)
                return torch.autograd.grad(linear(x), x, y)[0]

        rhs = adjoint(target @ q)
        return _conjugate_gradients(lambda x: adjoint(linear(x) @ q), rhs, tensors[free],
                                    cg_steps)

    start = error(cores)
    result = SweepResult(start_error=start, final_error=start, history=[start],
                         seconds=[time.perf_counter() - start_time])
    for k in range(n - 1, 0, -1):  # right-canonical: the sweep starts at core 0
        _right_orthonormalize(cores, k)

    def record() -> None:
        result.history.append(error(cores))
        result.seconds.append(time.perf_counter() - start_time)

    def two_site_update(k: int, rightward: bool) -> None:
        rank, before = cores[k].shape[-1], (cores[k], cores[k + 1])
        pair = torch.tensordot(cores[k], cores[k + 1], dims=([-1], [0]))
        tensors = cores[:k] + [pair] + cores[k + 2:]
        pair = solve(tensors, k)
        left_shape, right_shape = pair.shape[:3], pair.shape[3:]
        u, s, vh = torch.linalg.svd(pair.reshape(math.prod(left_shape), -1), full_matrices=False)
        result.discarded[k] = float((s[rank:] ** 2).sum() / (s ** 2).sum().clamp_min(1e-300))
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        if rightward:
            cores[k], cores[k + 1] = u, s[:, None] * vh
        else:
            cores[k], cores[k + 1] = u * s, vh
        cores[k] = cores[k].reshape(*left_shape, rank)
        cores[k + 1] = cores[k + 1].reshape(rank, *right_shape)
        # The truncation is the best of the pair in the whitened Frobenius norm, not always in
        # the data's: a split that ends worse than the pair it replaced is undone.
        if error(cores) > result.history[-1]:
            cores[k], cores[k + 1] = before
            if rightward:
                _left_orthonormalize(cores, k)
            else:
                _right_orthonormalize(cores, k + 1)

    for _ in range(sweeps):
        if two_site:
            for k in range(n - 1):
                two_site_update(k, rightward=True)
                record()
            for k in range(n - 2, -1, -1):
                two_site_update(k, rightward=False)
                record()
            continue
        for k in range(n):  # left to right, then back: the free core carries the gauge
            cores[k] = solve(cores, k)
            record()
            if k < n - 1:
                _left_orthonormalize(cores, k)
        for k in range(n - 1, -1, -1):
            cores[k] = solve(cores, k)
            record()
            if k > 0:
                _right_orthonormalize(cores, k)

    best = min(result.history)
    if best < result.history[0]:  # map the input legs back: G_k = G~_k x_in L_k^-1
        for param, core, inverse in zip(layer.cores, cores, whitening.inverses):
            back = torch.movedim(torch.tensordot(core, inverse.to(core), dims=([2], [0])), -1, 2)
            param.copy_(back.to(param.dtype))
    result.final_error = min(error(cores), result.history[0])
    return result
