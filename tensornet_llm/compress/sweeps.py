"""Fitting a cross-layer group: Basis Sharing, then alternating (DMRG/ALS-style) sweeps.

A group of ``G`` layers with weights ``W_l`` ``(out, in)`` and input covariances ``S_l``
``(in, in)`` is cut as ``W_l ~ U C_l V`` (see :mod:`tensornet_llm.layers.cross_layer`; ``U`` or
``V`` may be the identity). The data-aware objective is the output error summed over the group,

    E = sum_l tr((W_l - U C_l V) S_l (W_l - U C_l V)^T)      (= sum_l ||(W_l - W_hat_l) X_l||^2)

It is quadratic in each node with the others fixed, so a sweep solves for one node at a time:

* ``C_l``, per layer, in closed form: ``C_l = U^T W_l S_l V^T (V S_l V^T)^-1`` (``U`` has
  orthonormal columns);
* ``U`` in closed form: ``U = (sum_l W_l S_l B_l^T)(sum_l B_l S_l B_l^T)^-1`` with ``B_l = C_l V``,
  then re-orthonormalised (QR, ``R`` moved into the cores);
* ``V`` from the normal equations ``sum_l A_l^T A_l V S_l = sum_l A_l^T W_l S_l`` (``A_l = U C_l``):
  a Kronecker sum, solved by conjugate gradients preconditioned with the averaged Kronecker
  product ``mean(A^T A) (.) mean(S)``, which is exact when the layers' covariances agree.

The start is the closed-form optimum for the *summed* covariance ``S = sum_l S_l`` (Basis
Sharing, arXiv 2410.03765: one SVD of the stacked whitened weights ``[W_1 L; ...; W_G L]``,
``S = L L^T``), and for a shared output basis alone the exact optimum (the top eigenvectors of
``sum_l W_l S_l W_l^T``), which no sweep can improve. Everything runs in float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ArgumentError
from .fit import stable_cholesky, weigh_rows

__all__ = [
    "GroupFit",
    "basis_sharing",
    "fit_group",
    "group_parameters",
    "group_ranks",
    "stacked_spectrum",
]


@dataclass
class GroupFit:
    """A fitted group: ``W_l ~ out_basis @ cores[l] @ in_basis`` (a ``None`` basis is the
    identity), with the relative output error per layer and of the group after each sweep."""

    in_basis: Tensor | None
    out_basis: Tensor | None
    cores: list[Tensor]
    errors: list[float]
    start_errors: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: Seconds from the start of the fit to each entry of ``history``.
    times: list[float] = field(default_factory=list)

    def weight(self, index: int) -> Tensor:
        """Layer ``index``'s fitted weight ``(out, in)``."""
        w = self.cores[index]
        if self.in_basis is not None:
            w = w @ self.in_basis
        if self.out_basis is not None:
            w = self.out_basis @ w
        return w


def group_parameters(side: str, in_features: int, out_features: int, group_size: int,
                     in_rank: int | None, out_rank: int | None, kept_rows: bool = False) -> int:
    """Parameters of a group's network (shared bases plus every core; biases not counted).
    ``kept_rows``: a shared input basis alone is stored in the kept-rows gauge
    (:func:`~tensornet_llm.layers.cross_layer.kept_rows_gauge`), ``in_rank^2`` fewer."""
    rows = out_rank if side in ("output", "both") else out_features
    cols = in_rank if side in ("input", "both") else in_features
    shared = (in_features * cols if side != "output" else 0) + (
        out_features * rows if side != "input" else 0)
    saved = cols * cols if kept_rows and side == "input" and cols <= group_size * rows else 0
    return shared + group_size * rows * cols - saved


def group_ranks(side: str, in_features: int, out_features: int, group_size: int,
                keep: float, kept_rows: bool = False) -> tuple[int | None, int | None]:
    """``(in_rank, out_rank)`` of the largest network of ``side`` within ``keep`` of the group's
    dense parameters ``G * out * in`` (ranks at least 1; both sides get equal ranks, clipped
    to the features, the rest of the budget going to the other side). ``kept_rows`` as in
    :func:`group_parameters`."""
    o, i, g = out_features, in_features, group_size
    budget = keep * g * o * i
    if side == "input":
        if kept_rows:  # r (i + g o) - r^2 <= budget; the discriminant is >= 0 for keep <= 1
            width = i + g * o
            r = math.floor((width - math.sqrt(max(width * width - 4 * budget, 0.0))) / 2)
        else:
            r = math.floor(budget / (i + g * o))
        return max(1, min(i, g * o, r)), None
    if side == "output":
        return None, max(1, min(o, g * i, math.floor(budget / (o + g * i))))
    # r (o + i) + g r^2 <= budget
    r = math.floor((-(o + i) + math.sqrt((o + i) ** 2 + 4 * g * budget)) / (2 * g))
    out_rank = max(1, min(o, r))
    in_rank = max(1, min(i, math.floor((budget - o * out_rank) / (i + g * out_rank))))
    return in_rank, out_rank


def _check(weights: list[Tensor], covs: list[Tensor] | None, side: str) -> None:
    if not weights:
        raise ArgumentError("weights: a group needs at least one layer")
    if len({tuple(w.shape) for w in weights}) != 1:
        raise ArgumentError(f"weights: every layer of a group must have one shape, got "
                            f"{sorted({tuple(w.shape) for w in weights})}")
    if covs is not None and len(covs) != len(weights):
        raise ArgumentError(f"covs: {len(covs)} covariances for {len(weights)} layers")
    if side not in ("input", "output", "both"):
        raise ArgumentError(f"side must be 'input', 'output' or 'both', got {side!r}")


def _error(ws: list[Tensor], fits: list[Tensor], covs: list[Tensor],
           rows: list[Tensor] | None = None) -> tuple[list[float], float]:
    """Relative output error per layer and of the whole group (float64 inputs), each output
    feature weighted by ``rows`` where given."""
    nums, dens = [], []
    for index, (w, f, c) in enumerate(zip(ws, fits, covs)):
        e = w - f
        d = rows[index][:, None] if rows is not None else 1.0
        nums.append(abs(float((d * (e @ c) * e).sum())))
        dens.append(max(float((d * (w @ c) * w).sum()), 1e-300))
    return [math.sqrt(n / d) for n, d in zip(nums, dens)], math.sqrt(sum(nums) / sum(dens))


def _solve_right(a: Tensor, b: Tensor) -> Tensor:
    """``b a^-1`` for a symmetric positive semi-definite ``a`` (Cholesky; the smallest ridge
    that makes it succeed if ``a`` is singular)."""
    factor = stable_cholesky(a, rel_eps=1e-12)
    return torch.cholesky_solve(b.T, factor).T


def _top_eigenvectors(m: Tensor, k: int) -> Tensor:
    """Orthonormal eigenvectors of the ``k`` largest eigenvalues of symmetric ``m``."""
    _, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vecs[:, -k:].flip(1)


def _weighted_stack(ws: list[Tensor], rows: list[Tensor] | None) -> Tensor:
    """``[D_1^(1/2) W_1; ...; D_G^(1/2) W_G]`` (the plain stack without ``rows``)."""
    if rows is None:
        return torch.cat(ws)
    return torch.cat([weigh_rows(d.sqrt(), w) for w, d in zip(ws, rows)])


def _summed_start(ws: list[Tensor], covs: list[Tensor], in_rank: int,
                  rows: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """Basis Sharing: the input basis and cores optimal for the summed covariance (with output
    weights ``rows``, of the weighted stack; each core row is its own least-squares problem,
    so the cores do not depend on the weights)."""
    factor = stable_cholesky(sum(covs))
    stacked = _weighted_stack(ws, rows) @ factor
    _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
    top = vh[:in_rank]  # (k, in), orthonormal rows in whitened coordinates
    basis = torch.linalg.solve_triangular(factor, top, upper=False, left=False)  # V L = top
    return basis, [w @ factor @ top.T for w in ws]


def _fit_cores(ws, covs, in_basis, out_basis) -> list[Tensor]:
    cores = []
    for w, c in zip(ws, covs):
        left = w if out_basis is None else out_basis.T @ w
        if in_basis is None:
            cores.append(left)
        else:
            cores.append(_solve_right(in_basis @ c @ in_basis.T, left @ c @ in_basis.T))
    return cores


def _fit_out_basis(ws, covs, in_basis, cores) -> tuple[Tensor, list[Tensor]]:
    parts = [core @ in_basis for core in cores]
    lhs = sum(b @ c @ b.T for b, c in zip(parts, covs))
    rhs = sum(w @ c @ b.T for w, b, c in zip(ws, parts, covs))
    q, r = torch.linalg.qr(_solve_right(lhs, rhs))
    return q, [r @ core for core in cores]


def _fit_in_basis(ws, covs, out_basis, cores, start: Tensor, steps: int,
                  rows: list[Tensor] | None = None) -> Tensor:
    """Preconditioned conjugate gradients on ``sum_l G_l V S_l = R`` (see the module docs);
    with output weights, ``G_l = A_l^T D_l A_l`` and ``R = sum_l A_l^T D_l W_l S_l``."""
    lefts = [core if out_basis is None else out_basis @ core for core in cores]  # A_l
    weighted = lefts if rows is None else [a * d[:, None] for a, d in zip(lefts, rows)]
    grams = [a.T @ b for a, b in zip(lefts, weighted)]
    rhs = sum(b.T @ w @ c for b, w, c in zip(weighted, ws, covs))

    def op(v: Tensor) -> Tensor:
        return sum(g @ v @ c for g, c in zip(grams, covs))

    gram_factor = stable_cholesky(sum(grams) / len(grams), rel_eps=1e-12)
    cov_factor = stable_cholesky(sum(covs) / len(covs), rel_eps=1e-12)

    def precondition(r: Tensor) -> Tensor:  # mean(G)^-1 r mean(S)^-1 (both symmetric)
        return torch.cholesky_solve(torch.cholesky_solve(r, gram_factor).T, cov_factor).T

    v = start.clone()
    res = rhs - op(v)
    z = precondition(res)
    p = z.clone()
    rz = float((res * z).sum())
    norm0 = float(rhs.norm()) or 1.0
    for _ in range(steps):
        ap = op(p)
        denom = float((p * ap).sum())
        if denom <= 0:
            break
        alpha = rz / denom
        v += alpha * p
        res -= alpha * ap
        if float(res.norm()) < 1e-10 * norm0:
            break
        z = precondition(res)
        rz_new = float((res * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return v


def fit_group(
    weights: list[Tensor], covs: list[Tensor] | None = None, *, side: str = "input",
    in_rank: int | None = None, out_rank: int | None = None, sweeps: int = 2,
    cg_steps: int = 10, rows: list[Tensor] | None = None,
) -> GroupFit:
    """Fit ``W_l ~ U C_l V`` to a group's weights under the summed output error.

    Args:
        weights: the group's weights, each ``(out, in)``, in layer order.
        covs: each layer's input covariance ``(in, in)``; ``None`` fits the weights themselves
            (identity covariances).
        side: which bases are shared: ``"input"`` (``V``), ``"output"`` (``U``) or ``"both"``.
        in_rank, out_rank: bond dimensions of the shared bases (the one ``side`` needs).
        sweeps: alternating sweeps after the start (``"output"`` needs none: its start is the
            optimum). Each sweep refits every core to its own layer's covariance, then the
            output basis, then the input basis. With ``sweeps=0`` and ``side="input"`` this is
            Basis Sharing as published (:func:`basis_sharing`).
        cg_steps: conjugate-gradient iterations per update of ``V``.
        rows: output weights per layer ``(out,)`` (:func:`~.fit.output_weights`), for
            ``side="input"``: the objective becomes ``sum_l ||D_l^(1/2) (W_l - C_l V) L_l||^2``
            (the start stacks the weighted weights; the errors reported are weighted too).
            The other sides do not take them.
    """
    _check(weights, covs, side)
    out_f, in_f = weights[0].shape
    if side != "output" and not (isinstance(in_rank, int) and 1 <= in_rank <= in_f):
        raise ArgumentError(f"in_rank must be an integer in [1, {in_f}] for side={side!r}, "
                            f"got {in_rank!r}")
    if side != "input" and not (isinstance(out_rank, int) and 1 <= out_rank <= out_f):
        raise ArgumentError(f"out_rank must be an integer in [1, {out_f}] for side={side!r}, "
                            f"got {out_rank!r}")
    if not isinstance(sweeps, int) or sweeps < 0:
        raise ArgumentError(f"sweeps must be an integer >= 0, got {sweeps!r}")
    if rows is not None and (side != "input" or len(rows) != len(weights)):
        raise ArgumentError(f"rows: one output weight vector per layer, for side='input' only "
                            f"(got {len(rows)} for {len(weights)} layers, side={side!r})")
    start_time = time.perf_counter()
    ws = [w.detach().to(torch.float64) for w in weights]
    device = ws[0].device
    eye = torch.eye(in_f, dtype=torch.float64, device=device)
    cs = [eye] * len(ws) if covs is None else [c.detach().to(torch.float64) for c in covs]
    ds = None if rows is None else [d.detach().to(torch.float64).to(device) for d in rows]
    in_basis = out_basis = None
    if side == "output":
        out_basis = _top_eigenvectors(sum(w @ c @ w.T for w, c in zip(ws, cs)), out_rank)
        cores = _fit_cores(ws, cs, None, out_basis)
        sweeps = 0
    else:
        in_basis, cores = _summed_start(ws, cs, in_rank, ds)  # Basis Sharing
        if side == "both":
            out_basis = _top_eigenvectors(sum(w @ c @ w.T for w, c in zip(ws, cs)), out_rank)
            cores = _fit_cores(ws, cs, in_basis, out_basis)

    def error() -> tuple[list[float], float]:
        fits = [GroupFit(in_basis, out_basis, cores, []).weight(i) for i in range(len(ws))]
        return _error(ws, fits, cs, ds)

    per_layer, total = error()
    start_errors, history = per_layer, [total]
    times = [time.perf_counter() - start_time]
    for _ in range(sweeps):
        cores = _fit_cores(ws, cs, in_basis, out_basis)  # each layer's own covariance
        if out_basis is not None:
            out_basis, cores = _fit_out_basis(ws, cs, in_basis, cores)
        in_basis = _fit_in_basis(ws, cs, out_basis, cores, in_basis, cg_steps, ds)
        q, r = torch.linalg.qr(in_basis.T)  # V = R^T Q^T: keep the basis orthonormal
        in_basis, cores = q.T, [core @ r.T for core in cores]
        cores = _fit_cores(ws, cs, in_basis, out_basis)
        per_layer, total = error()
        history.append(total)
        times.append(time.perf_counter() - start_time)
    return GroupFit(in_basis, out_basis, cores, per_layer, start_errors, history,
                    time.perf_counter() - start_time, times)


def basis_sharing(weights: list[Tensor], covs: list[Tensor] | None, rank: int) -> GroupFit:
    """Basis Sharing (Wang et al., ICLR 2025, arXiv 2410.03765) as published: the group's
    weights stacked, whitened with the *summed* input covariance ``S = L L^T``, one truncated
    SVD; the shared basis ``V = Vh_k L^-1`` ``(rank, in)`` and per-layer coefficients
    ``C_l = W_l L Vh_k^T``. The errors are measured with each layer's own covariance; ``rank``
    is ``in_rank`` of :func:`fit_group` with ``side="input"`` and no sweeps."""
    return fit_group(weights, covs, side="input", in_rank=rank, sweeps=0)


def stacked_spectrum(weights: list[Tensor], covs: list[Tensor] | None = None) -> Tensor:
    """Singular values of the stacked whitened weights ``[W_1 L; ...; W_G L]`` (``L L^T`` the
    summed covariance): the spectrum of the bond between a group's shared input basis and its
    cores. How fast it falls, against the layers' own spectra, says how much they share."""
    ws = [w.detach().to(torch.float64) for w in weights]
    if covs is None:
        return torch.linalg.svdvals(torch.cat(ws))
    factor = stable_cholesky(sum(c.detach().to(torch.float64) for c in covs))
    return torch.linalg.svdvals(torch.cat(ws) @ factor)


def _suffix_row_errors(a: Tensor, m: Tensor, ranks: list[int]) -> list[Tensor]:
    """``diag(A (I - P_k) M (I - P_k) A^T)`` for every ``k`` in ``ranks``, ``P_k`` the
    projector on the first ``k`` coordinates, ``M`` symmetric: with ``T = A triu(M)^T``, the
    sum over ``a, b >= k`` of ``A[:, a] M[a, b] A[:, b]`` grows by
    ``A[:, k] (2 T[:, k] - M[k, k] A[:, k])`` from ``k + 1`` to ``k`` (one matmul for all k)."""
    t = a @ torch.triu(m).T
    steps = a * (2 * t - m.diagonal() * a)  # (out, n): the increment at each k
    suffix = steps.flip(1).cumsum(1).flip(1)  # suffix[:, k] = sum over j >= k
    zero = suffix.new_zeros(suffix.shape[0])
    return [suffix[:, k] if k < suffix.shape[1] else zero for k in ranks]


def _prefix_quadratic(a: Tensor, m: Tensor) -> Tensor:
    """``[:, k - 1] = diag(A_k M_kk A_k^T)`` with ``A_k`` the first ``k`` columns of ``A`` and
    ``M_kk`` the leading ``k x k`` block of symmetric ``M``: the suffix sums of
    :func:`_suffix_row_errors` read backwards."""
    t = a @ torch.tril(m).T  # t[:, k] = sum_{b <= k} M[k, b] A[:, b]
    steps = a * (2 * t - m.diagonal() * a)
    return steps.cumsum(1)


@torch.no_grad()
def start_row_errors(
    weights: list[Tensor], covs: list[Tensor] | None, side: str,
    ranks: list[tuple[int | None, int | None]], rows: list[Tensor] | None = None,
) -> list[list[Tensor]]:
    """For each ``(in_rank, out_rank)``, each layer's squared row errors ``diag(E S E^T)``
    ``(out,)`` (``E = W - W_hat``, ``S`` its covariance) of the closed-form start of ``side``:
    the shared input basis of the summed covariance (Basis Sharing) and/or the top
    eigenvectors of ``sum_l W S W^T`` for the output basis. One SVD and one eigendecomposition
    serve every rank, so a budget can price a group at many sizes; the sweeps only lower
    these errors. The input side alone is exact in float64 for every rank from one product
    per layer; the other sides are computed per rank in float32. ``rows`` (output weights per
    layer, input side only, as :func:`fit_group` takes them) weight the start's stack; the
    errors returned are unweighted."""
    _check(weights, covs, side)
    ws = [w.detach().to(torch.float64) for w in weights]
    in_f = ws[0].shape[1]
    eye = torch.eye(in_f, dtype=torch.float64, device=ws[0].device)
    cs = [eye] * len(ws) if covs is None else [c.detach().to(torch.float64) for c in covs]
    vh = factor = vecs = None
    if side != "output":
        factor = stable_cholesky(sum(cs))
        ds = None if side != "input" or rows is None else [d.to(torch.float64) for d in rows]
        stacked = _weighted_stack(ws, ds) @ factor
        _, _, vh = torch.linalg.svd(stacked, full_matrices=stacked.shape[0] < in_f)
    if side != "input":
        m = sum(w @ c @ w.T for w, c in zip(ws, cs))
        vecs = torch.linalg.eigh((m + m.T) / 2)[1].flip(1)
    if side == "input":
        # E = W L (I - Vh_k^T Vh_k) L^-1: in the rotated whitened frame B = W L Vh^T the error
        # drops B's first k columns, weighted by M = Vh L^-1 S L^-T Vh^T.
        rotate = torch.linalg.solve_triangular(factor.T, vh.T, upper=True)  # L^-T Vh^T
        per_layer = []
        for w, c in zip(ws, cs):
            m = rotate.T @ c @ rotate  # Vh L^-1 S L^-T Vh^T
            per_layer.append(_suffix_row_errors(w @ factor @ vh.T, m, [r[0] for r in ranks]))
        return [[rows[i].clamp_min(0) for rows in per_layer] for i in range(len(ranks))]
    if side == "output":
        # E = (I - U_k U_k^T) W: diag(E S E^T) = diag(N) - 2 diag(P N) + diag(P N P) with
        # N = W S W^T and P = U_k U_k^T, both prefix sums over the eigenvectors' order.
        per_layer = []
        for w, c in zip(ws, cs):
            n = w @ c @ w.T
            cross = (vecs * (n @ vecs)).cumsum(1)  # [:, k - 1] = diag(P_k N)
            quadratic = _prefix_quadratic(vecs, vecs.T @ n @ vecs)  # [:, k - 1] = diag(P N P)
            per_layer.append([(n.diagonal() - 2 * cross[:, k - 1] + quadratic[:, k - 1])
                              .clamp_min(0) for _, k in ranks])
        return [[rows[i] for rows in per_layer] for i in range(len(ranks))]
    w32, c32 = [w.float() for w in ws], [c.float() for c in cs]
    whitened = [(w @ factor).float() for w in ws] if factor is not None else None
    factor32 = factor.float() if factor is not None else None
    out = []
    for in_rank, out_rank in ranks:
        rows = []
        for index, (w, c) in enumerate(zip(w32, c32)):
            approx = w
            if vh is not None:  # W L Vh_k^T Vh_k L^-1
                top = vh[:in_rank].float()
                approx = torch.linalg.solve_triangular(
                    factor32, (whitened[index] @ top.T) @ top, upper=False, left=False)
            u = vecs[:, :out_rank].float()
            error = w - u @ (u.T @ approx)
            rows.append(((error @ c) * error).sum(1).double().clamp_min(0))
        out.append(rows)
    return out
