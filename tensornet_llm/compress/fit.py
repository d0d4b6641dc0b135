"""Data-aware fitting: approximate what a layer computes on real inputs, not its raw weight.

For inputs ``X`` (rows are activations reaching the layer) the output error of an approximation
``W_hat`` is ``||X (W - W_hat)^T||_F^2 = tr((W - W_hat) C (W - W_hat)^T)`` with the (uncentred)
activation covariance ``C = X^T X / n``. With a Cholesky factor ``C = L L^T`` this is
``||(W - W_hat) L||_F^2``: the error measured in the directions the data actually uses.

* :class:`CovarianceCollector` accumulates ``C`` for chosen modules with forward hooks, in float64.
* :func:`stable_cholesky` factors ``C``, adding the smallest diagonal shift that makes it work
  (activation covariances are often singular: dead channels, fewer tokens than features).
* :func:`whitened_svd` is the SVD-LLM baseline: truncated SVD of ``W L``, mapped back by ``L^-1``.
* :func:`kronecker_whitened` builds a better starting point than TT-SVD of ``W``: the covariance
  is approximated by a Kronecker product over the input sites, ``C ~ C_1 x ... x C_N``, whose
  Cholesky factor ``L_1 x ... x L_N`` acts site by site, so ``W L`` is decomposed and every
  core's input leg is mapped back by ``L_k^{-1}``: still an exact network of the same shape.
* :func:`corrected_target` lets a layer also undo the error of the layers before it: with
  reference inputs ``X_r`` (what the dense model feeds it) and its own inputs ``X`` (what the
  compressed earlier layers feed it), ``||X_r W^T - X W_hat^T||`` is ``||(W' - W_hat) L||`` up
  to a constant, for the corrected target ``W'``.
* :func:`whitened_start_is_optimal` says when that start is already the minimiser (one bond,
  every input leg on one site: the rank-chi factorisation), so fitting it is wasted work.
* :func:`fit_weighted` refines a tensor-network layer's cores by L-BFGS on the exact weighted
  objective, starting from its current cores (e.g. TT-SVD) and returning the best iterate, so the
  weighted error never ends above where it started.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, NonFiniteActivationError
from ..layers.base import TensorNetworkLinear

__all__ = [
    "CovarianceCollector",
    "stable_cholesky",
    "weighted_error",
    "whitened_svd",
    "fit_weighted",
    "FitResult",
    "kronecker_factors",
    "kronecker_whitened",
    "output_weights",
    "metric_roots",
    "weigh_rows",
    "whitened_start_is_optimal",
    "SiteWhitening",
    "corrected_target",
]


class SharedInputConflict(Exception):
    """Modules that read the same input tensor on a first call read different ones later: their
    shared sum is wrong, so the collection must run again without sharing."""


class CovarianceCollector:
    """Accumulate ``C = X^T X / n`` of the inputs reaching each given module.

    Use as a context manager around forward passes::

        with CovarianceCollector({"q": model.layers[0].self_attn.q_proj}) as cov:
            model(batch)
        cov.covariance("q")   # (in_features, in_features), float64

    Modules that read the very same input tensor (q, k and v of one attention; gate and up of
    one MLP) share one sum with ``share=True``: the first to be called owns it, the others only
    check, on every call, that they see the owner's current input (else
    :class:`SharedInputConflict` is raised and the caller collects again without sharing).
    """

    def __init__(self, modules: dict[str, nn.Module], share: bool = False) -> None:
        self.modules = modules
        self.share = share
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._batches: dict[str, int] = {}  # forward calls seen, to name the bad one
        self._owner: dict[str, str] = {}  # module -> the module whose sum it shares
        self._current: tuple[weakref.ref, int, str] | None = None  # last owner's input
        self._taken: dict[str, Tensor] = {}  # owner -> its covariance, while sharers remain
        self._taken_by: set[str] = set()
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            source = args[0]
            current = self._current
            same = (current is not None and current[0]() is source
                    and current[1] == source._version)
            if self.share and name not in self._counts and same:
                self._owner[name] = current[2]  # first call: the owner's very input
            if name in self._owner:
                if not (same and current[2] == self._owner[name]):
                    raise SharedInputConflict(name)
                self._counts[name] = self._counts.get(name, 0) + source.numel() // source.shape[-1]
                return
            x = source.detach().reshape(-1, source.shape[-1])
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteActivationError(
                    f"calibration: the inputs of {name} hold NaN or Inf values (batch "
                    f"{self._batches.get(name, 0)} of the calibration data); a model that "
                    "overflows in float16 needs float32 or bfloat16")
            self._batches[name] = self._batches.get(name, 0) + 1
            x = x.to(torch.float64)
            if name in self._sums:  # accumulated in place: no (in, in) temporary
                self._sums[name].addmm_(x.T, x)
            else:
                self._sums[name] = x.T @ x
            self._counts[name] = self._counts.get(name, 0) + x.shape[0]
            self._current = (weakref.ref(source), source._version, name)

        return hook

    def __enter__(self) -> "CovarianceCollector":
        self._handles = [
            m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._current = None

    def covariance(self, name: str) -> Tensor:
        """``X^T X / n`` of ``name``'s inputs, ``(in_features, in_features)`` float64."""
        owner = self._owner.get(name, name)
        if owner not in self._sums:
            raise KeyError(f"no activations reached module {name!r}")
        return self._sums[owner] / self._counts[name]

    def take(self, name: str) -> Tensor:
        """:meth:`covariance`, computed in place, once per shared sum: the modules sharing an
        input get the same tensor, and the collector lets go of it (one ``(in, in)`` float64
        matrix less in memory). Use instead of :meth:`covariance`, not beside it."""
        owner = self._owner.get(name, name)
        if owner not in self._sums:
            raise KeyError(f"no activations reached module {name!r}")
        if owner not in self._taken:
            self._taken[owner] = self._sums[owner].div_(self._counts[owner])
        result = self._taken[owner]
        self._taken_by.add(name)
        users = [n for n, o in self._owner.items() if o == owner] + [owner]
        if all(u in self._taken_by for u in users):  # every sharer has it: let go
            del self._sums[owner], self._taken[owner]
        return result

    def tokens(self, name: str) -> int:
        return self._counts.get(name, 0)


def stable_cholesky(cov: Tensor, rel_eps: float = 1e-6, max_tries: int = 12) -> Tensor:
    """Lower Cholesky factor of ``cov + shift * I`` with the smallest shift that succeeds.

    The shift starts at 0, then ``rel_eps * mean(diag)`` and grows tenfold per failure, so a
    positive-definite ``cov`` is factored exactly and a singular one gets a small ridge.
    """
    cov = (cov + cov.T) / 2
    scale = float(cov.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    shift = 0.0
    for _ in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(cov + shift * eye)
        if int(info) == 0:
            return factor
        shift = rel_eps * scale if shift == 0.0 else shift * 10
    raise ArgumentError(f"covariance is not positive semi-definite (tried a ridge up to {shift:.3g})")


def weighted_error(approx: Tensor, weight: Tensor, cov: Tensor, rows: int = 256) -> float:
    """Relative output error ``sqrt(tr(E C E^T) / tr(W C W^T))`` with ``E = W - approx``, in
    float64, ``rows`` rows of the weight at a time (no float64 copy of the whole weight)."""
    cov = cov.to(torch.float64)
    num = den = 0.0
    for a, w in zip(approx.split(rows), weight.split(rows)):
        w = w.to(torch.float64)
        e = w - a.to(torch.float64)
        num += float(((e @ cov) * e).sum())
        den += float(((w @ cov) * w).sum())
    return (max(num, 0.0) / max(den, 1e-300)) ** 0.5


def whitened_svd(weight: Tensor, cov: Tensor, rank: int) -> Tensor:
    """SVD-LLM: the rank-``rank`` ``W_hat`` minimising ``||(W - W_hat) L||_F`` (``C = L L^T``).

    Truncated SVD of ``W L`` then ``W_hat = (U_r S_r V_r^T) L^{-1}``. Returns ``W_hat`` as
    ``(out, in)`` in ``weight``'s dtype.
    """
    w = weight.detach().to(torch.float64)
    factor = stable_cholesky(cov.to(torch.float64))
    u, s, vh = torch.linalg.svd(w @ factor, full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    approx = torch.linalg.solve_triangular(factor, low, upper=False, left=False)  # Z L = low
    return approx.to(weight.dtype)


def corrected_target(weight: Tensor, cov: Tensor, cross: Tensor, damp: float = 0.01) -> Tensor:
    """The target ``W'`` whose weighted fit ``||(W' - W_hat) L||`` (``C = L L^T``) matches the
    layer's outputs on the reference inputs: ``W' = W D C^-1`` minimises
    ``||X_r W^T - X W_hat^T||_F`` over ``W_hat``.

    Args:
        weight: ``W`` ``(out, in)``.
        cov: ``C = X^T X / n``, the layer's own input covariance ``(in, in)``.
        cross: ``D = X_r^T X / n``, reference inputs against own inputs ``(in, in)``.
        damp: ridge on ``C`` relative to its mean diagonal, applied to the correction only
            (``W' = W + W (D - C)(C + damp I)^-1``), so with ``D = C`` (no error upstream)
            ``W' = W`` exactly, and directions the data barely explores are not amplified.

    Returns ``W'`` in float64.
    """
    w = weight.detach().to(torch.float64)
    cov = cov.to(w)
    ridge = damp * float(cov.diagonal().mean().clamp_min(1e-30))
    factor = stable_cholesky(cov + ridge * torch.eye(cov.shape[0], dtype=w.dtype, device=w.device))
    delta = w @ (cross.to(w) - cov)  # (out, in); the correction solves Z (C + ridge) = delta
    return w + torch.cholesky_solve(delta.T, factor).T


def kronecker_factors(cov: Tensor, in_shape: tuple[int, ...]) -> list[Tensor]:
    """Per-site factors ``C_k`` of ``C ~ C_1 x ... x C_N`` (row-major sites, ``in_shape``):
    ``C_k`` is the partial trace of ``C`` over every other site, scaled to unit mean diagonal."""
    n = len(in_shape)
    full = cov.to(torch.float64).reshape(*in_shape, *in_shape)
    letters = "abcdefghijklmnopqrstuvwxyz"
    factors = []
    for k in range(n):
        rows = list(letters[:n])
        cols = list(letters[:n])
        cols[k] = letters[n + k]  # only site k keeps distinct row and column indices
        c = torch.einsum(f"{''.join(rows)}{''.join(cols)}->{rows[k]}{cols[k]}", full)
        factors.append(c / c.diagonal().mean().clamp_min(1e-300))
    return factors


class SiteWhitening:
    """The Kronecker approximation ``C ~ C_1 x ... x C_N`` of an input covariance over the input
    sites ``in_shape``, factored site by site (``C_k = L_k L_k^T``).

    :meth:`whiten` maps a weight to ``W (L_1 x ... x L_N)``; :meth:`unwhiten_` maps the input
    legs of a network cut from it back by ``L_k^{-1}``, which leaves its structure unchanged.
    """

    def __init__(self, cov: Tensor, in_shape: tuple[int, ...]) -> None:
        self.in_shape = tuple(in_shape)
        self.factors = [stable_cholesky(c) for c in kronecker_factors(cov, self.in_shape)]
        self.inverses = [
            torch.linalg.solve_triangular(f, torch.eye(f.shape[0], dtype=f.dtype, device=f.device),
                                          upper=False)
            for f in self.factors
        ]

    def whiten(self, weight: Tensor, dtype: torch.dtype = torch.float64,
               rows: int = 256) -> Tensor:
        """``W (L_1 x ... x L_N)`` for ``W`` ``(out, prod(in_shape))``, computed in float64
        ``rows`` output rows at a time and returned in ``dtype``."""
        out_f = weight.shape[0]
        result = torch.empty(out_f, weight.shape[1], dtype=dtype, device=weight.device)
        for start in range(0, out_f, rows):
            w = weight[start:start + rows].detach().to(torch.float64)
            w = w.reshape(w.shape[0], *self.in_shape)
            for k, factor in enumerate(self.factors):  # W[o, i_1.., i_k, ..] L_k[i_k, j_k]
                w = torch.movedim(torch.tensordot(w, factor.to(w.device), dims=([k + 1], [0])),
                                  -1, k + 1)
            result[start:start + rows] = w.reshape(w.shape[0], -1)
        return result

    @torch.no_grad()
    def unwhiten_(self, layer: TensorNetworkLinear) -> None:
        """Map every input leg of ``layer``'s cores back by ``L_k^{-1}``, in place."""
        for op, legs in zip(layer._operands(), layer.spec.core_legs):  # views of the cores
            for axis, label in enumerate(legs):
                if label in layer.spec.in_legs:
                    site = layer.spec.in_legs.index(label)
                    m = self.inverses[site].to(op)  # new[.., i, ..] = sum_j op[.., j, ..] M[j, i]
                    op.copy_(torch.movedim(torch.tensordot(op, m, dims=([axis], [0])), -1, axis))


def _kept_per_tensor(fn):
    """Remember ``fn(tensor, floor)`` for as long as ``tensor`` lives unchanged (same object,
    same in-place version): the budget and the fit ask for the same module's output metric and
    its roots several times, and an ``(out, out)`` eigendecomposition is not free."""
    kept: dict[tuple[int, float], tuple[weakref.ref, int, object]] = {}

    @functools.wraps(fn)
    def wrapper(tensor: Tensor, floor: float = 1e-6):
        key = (id(tensor), floor)
        hit = kept.get(key)
        if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
            return hit[2]
        result = fn(tensor, floor)
        if tensor.dim() == 2:  # only the matrices are worth keeping
            kept[key] = (weakref.ref(tensor), tensor._version, result)
            weakref.finalize(tensor, kept.pop, key, None)
        return result

    return wrapper


@_kept_per_tensor
def output_weights(grad_sq: Tensor, floor: float = 1e-6) -> Tensor:
    """The output metric a fit weighs its error by, from the loss gradient's second moment at a
    module's output (as the budget collects it), normalised to mean diagonal 1, float64.

    * ``grad_sq`` ``(out,)``, ``E[g_o^2]``: the weights ``d_o`` ``(out,)``, floored at ``floor``
      so that every output keeps some weight. ``||D^(1/2) (W - W_hat) L||^2`` is then the
      diagonal Gauss-Newton estimate of the loss increase (up to a constant), the quantity the
      budget ranks networks by.
    * ``grad_sq`` ``(out, out)``, ``E[g g^T]``: the matrix ``M`` ``(out, out)`` (its eigenvalues
      are floored where its roots are taken, :func:`metric_roots`). ``||M^(1/2) (W - W_hat) L||^2``
      is the Kronecker-factored (K-FAC) estimate, which also counts how errors in different
      output features add up or cancel.
    """
    g = grad_sq.detach().to(torch.float64)
    if g.dim() == 1:
        return (g / g.mean().clamp_min(1e-300)).clamp_min(floor)
    g = (g + g.T) / 2
    return g / g.diagonal().mean().clamp_min(1e-300)


@_kept_per_tensor
def metric_roots(rows: Tensor, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(R, R^-1)`` with ``R^T R`` the output metric ``rows`` of :func:`output_weights`:
    vectors ``sqrt(d)`` and ``1 / sqrt(d)`` ``(out,)`` for weights, symmetric square roots
    ``(out, out)`` for a matrix (eigenvalues floored at ``floor`` of their mean). Apply them
    with :func:`weigh_rows`."""
    rows = rows.to(torch.float64)
    if rows.dim() == 1:
        return rows.sqrt(), rows.rsqrt()
    values, vectors = torch.linalg.eigh(rows)
    values = values.clamp_min(floor * float(values.mean().clamp_min(1e-300)))
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def weigh_rows(root: Tensor, x: Tensor) -> Tensor:
    """``R x`` for ``x`` ``(out, ...)`` and a root of :func:`metric_roots` (a row scale
    ``(out,)`` or a matrix ``(out, out)``), in ``x``'s dtype."""
    root = root.to(device=x.device, dtype=x.dtype)
    if root.dim() == 1:
        return x * root.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tensordot(root, x, dims=([1], [0]))


def _output_site(layer: TensorNetworkLinear) -> tuple[int, int] | None:
    """``(operand, axis)`` of the one output leg of ``layer`` that spans the whole output, or
    ``None`` when the output is split over several sites (or padded)."""
    if layer.padded_out != layer.out_features or sum(d > 1 for d in layer.out_shape) > 1:
        return None
    site = max(range(len(layer.out_shape)), key=lambda k: layer.out_shape[k])
    label = layer.spec.out_legs[site]
    for index, legs in enumerate(layer.spec.core_legs):
        if label in legs:
            return index, legs.index(label)
    return None


@torch.no_grad()
def kronecker_whitened(
    layer: TensorNetworkLinear, weight: Tensor, cov: Tensor,
    whitening: SiteWhitening | None = None, whitened: Tensor | None = None,
    rows: Tensor | None = None,
) -> TensorNetworkLinear | None:
    """A layer of ``layer``'s class and structure decomposed from ``W (L_1 x ... x L_N)``, its
    input legs mapped back by ``L_k^{-1}``; ``None`` for zero-padded layers (the covariance
    does not cover the padding). For several cuts of one layer, ``whitening`` may pass the
    factors and ``whitened`` the whitened weight (``whitening.whiten(weight)``), computed once.

    ``rows`` (an output metric of :func:`output_weights`: ``(out,)`` weights ``D`` or an
    ``(out, out)`` matrix ``M``) also weighs the output: the cut is of ``R W (L_1 x ... x L_N)``
    (``R^T R`` the metric, :func:`metric_roots`) and the output leg is mapped back by ``R^-1``.
    That needs the whole output on one site (the low-rank layout); otherwise ``rows`` is
    ignored here."""
    if layer.padded_in != layer.in_features or layer.padded_out != layer.out_features:
        return None
    if whitening is None:
        whitening = SiteWhitening(cov.to(weight.device), layer.in_shape)
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if whitened is None:
        whitened = whitening.whiten(weight, compute)
    site = _output_site(layer) if rows is not None else None
    roots = metric_roots(rows.to(weight.device)) if site is not None else None
    if roots is not None:
        whitened = weigh_rows(roots[0], whitened)
    new = type(layer).from_weight(
        whitened.to(compute), None, layer.chi, layer.n_sites, in_shape=layer.in_shape,
        out_shape=layer.out_shape,
    )
    if new.bond_dims != layer.bond_dims:
        return None
    whitening.unwhiten_(new)
    if roots is not None:  # op[.., o, ..] <- sum_p R^-1[o, p] op[.., p, ..] on the output axis
        op = new._operands()[site[0]]
        op.copy_(torch.movedim(weigh_rows(roots[1], torch.movedim(op, site[1], 0)), 0, site[1]))
    return new


def whitened_start_is_optimal(layer: TensorNetworkLinear, rows: Tensor | None = None) -> bool:
    """Whether :func:`kronecker_whitened` already gives the minimiser of the weighted error.

    True when the network has a single bond and at most one input site wider than 1 (the
    low-rank layout, for one). Then the Kronecker approximation of the covariance is the
    covariance itself (up to scale), the whole input leg sits on one side of the bond, and the
    truncated SVD of ``W L`` across that bond is the best rank-chi tensor (Eckart-Young); mapping
    the input leg back by ``L^-1`` keeps it optimal for ``||(W - W_hat) L||``. For more bonds
    TT-SVD is only quasi-optimal and :func:`fit_weighted` can still improve the start. The
    same holds with output rows weighted (``rows`` of :func:`kronecker_whitened`, given here
    too) when the whole output leg is on one site, as in the low-rank layout.
    """
    return (len(layer.bond_dims) == 1 and sum(d > 1 for d in layer.in_shape) <= 1
            and layer.padded_in == layer.in_features and layer.padded_out == layer.out_features
            and (rows is None or _output_site(layer) is not None))


@dataclass
class FitResult:
    """Weighted relative error before and after, and the loss history of the fit."""

    start_error: float
    final_error: float
    history: list[float] = field(default_factory=list)


def fit_weighted(
    layer: TensorNetworkLinear,
    weight: Tensor,
    cov: Tensor,
    steps: int = 100,
    history_size: int = 20,
    rows: Tensor | None = None,
) -> FitResult:
    """Refine ``layer``'s cores to minimise ``||(W - W_hat) L||_F^2`` by L-BFGS (in place), or
    ``||R (W - W_hat) L||_F^2`` with an output metric ``rows`` (``R^T R``; ``(out,)`` weights
    or an ``(out, out)`` matrix, see :func:`output_weights`).

    Args:
        layer: an :class:`MPOLinear` or :class:`TTNSLinear`; its cores are the starting point.
        weight: the dense target ``(out_features, in_features)``.
        cov: the activation covariance ``(in_features, in_features)``.
        steps: L-BFGS iterations (each with a strong-Wolfe line search).

    The fit runs in float32 (float64 for float64 layers); the best iterate is kept, so
    ``final_error <= start_error``.
    """
    dtype = torch.float64 if layer.cores[0].dtype == torch.float64 else torch.float32
    device = layer.cores[0].device
    factor = stable_cholesky(cov.to(device=device, dtype=torch.float64)).to(dtype)
    target = weight.detach().to(device=device, dtype=dtype) @ factor
    root = (torch.ones(target.shape[0], device=device, dtype=dtype) if rows is None
            else metric_roots(rows.to(device))[0].to(dtype))
    target = weigh_rows(root, target)
    norm = float(target.pow(2).sum().clamp_min(1e-30))
    cores = [c.detach().to(dtype).clone().requires_grad_(True) for c in layer.cores]

    def loss_of(params: list[Tensor]) -> Tensor:
        return (weigh_rows(root, layer.dense_from(params) @ factor) - target).pow(2).sum() / norm

    with torch.no_grad():
        start = float(loss_of(cores))
    best = (start, [c.detach().clone() for c in cores])
    history = [start]
    optimizer = torch.optim.LBFGS(
        cores, lr=1.0, max_iter=steps, history_size=history_size, line_search_fn="strong_wolfe",
        tolerance_grad=1e-12, tolerance_change=1e-14,
    )

    def closure() -> Tensor:
        nonlocal best
        optimizer.zero_grad()
        loss = loss_of(cores)
        loss.backward()
        value = float(loss.detach())
        history.append(value)
        if value < best[0]:
            best = (value, [c.detach().clone() for c in cores])
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        for p, q in zip(layer.cores, best[1]):
            p.copy_(q)
    return FitResult(start_error=start**0.5, final_error=best[0] ** 0.5, history=history)
