"""Per-module bond dimensions under a parameter budget (``compactify(model, ratio=...)``).

Every targeted module gets a ladder of options: dense (keeps all its parameters, no error) and
a tensor network at each chi of a grid of keep fractions, for each :class:`~.layout.Layout`
offered (e.g. a 3-site MPO and the low-rank 2-site MPO: one ladder mixes them). For each
option the *damage* is estimated from the error the network leaves at that chi:

* with calibration data, the error ``E_L = (W - W_hat) L`` (``C = L L^T`` the input
  covariance; ``||E_L||`` is what the data-aware fit minimises) of the network the fit starts
  from, the cut of the weight whitened site by site, which the fit only improves; the damage is
  then the predicted rise of the mean token loss, ``0.5 * sum_o E[g_o^2] (E_L E_L^T)_oo`` (``g`` the
  loss gradient at the module's output; a diagonal Gauss-Newton estimate), or without a loss
  the relative output error ``||E_L||^2 / ||W L||^2``. With ``weigh_outputs`` the start (and
  then the fit) is the cut of ``D^(1/2) W L`` with ``D = diag(E[g^2])``, which for the
  low-rank layout minimises that damage itself;
* without data: the relative weight error ``||E||_F^2 / ||W||_F^2`` of the plain cut.

The allocation minimises the summed damage subject to the total parameter count: on each
module's lower convex hull of (parameters, damage), steps are taken globally in order of
damage added per parameter saved until the budget is met (the classic greedy solution of this
separable problem, exact up to one step), then any budget left is spent stepping back up where
a step still fits. Modules where every step costs too much stay dense.

A gated MLP whose three projections are all targets is one ladder (:func:`unit_ladder`): the
combinations of its projections' own rungs on their joint hull, and the slim MLP at each width
(:func:`slim_ladder`, :mod:`.slim`), priced by the same estimate at ``down_proj``'s output.

With a ``call_cost`` the hulls and the order of the steps weigh each rung by its *cost*, its
parameters plus ``call_cost`` per fixed-time operation of its forward (:attr:`Option.calls`),
while the budget still counts parameters: the allocation walks the (cost, damage) frontier, the
least damage per unit of decode time saved first, until the parameters fit. A low-rank layer
makes two such operations where the dense layer makes one, so a rung that saves fewer than
``call_cost`` parameters costs more than dense and leaves the hull; slim MLPs and fewer heads
keep the dense call count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..helpers.progress import Tick
from ..layers.base import TensorNetworkLinear, linear_weight
from .fit import (SiteWhitening, kronecker_whitened, metric_roots, output_weights,
                  stable_cholesky, weigh_rows)
from ..layers.layout import Layout
from .slim import REFIT_RIDGE, damage_scale, greedy_neurons

__all__ = ["KEEP_GRID", "Option", "Allocation", "chi_for_params", "allocate", "price", "choose",
           "ladder", "estimate_kind", "damage", "lower_hull", "unit_ladder", "slim_ladder",
           "aligned"]

#: Keep fractions (of a module's dense parameters) tried for every module.
KEEP_GRID = (0.04, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: Ranks the budget gives low-rank layers are multiples of this (when at least this large): BLAS
#: runs a thin matmul whose inner or outer size is a multiple of 8 markedly faster than one
#: whose size is odd, and a kept-rows layer's second matmul has ``out - rank`` outputs.
RANK_MULTIPLE = 8


def aligned_rank(layout: Layout, chi: int) -> int:
    """``chi`` rounded down to a multiple of :data:`RANK_MULTIPLE` for the low-rank layout (left
    as is below it, and for every other layout)."""
    return aligned(chi) if layout.is_low_rank else chi


def aligned(size: int) -> int:
    """``size`` rounded down to a multiple of :data:`RANK_MULTIPLE` (left as is below it)."""
    return size if size < RANK_MULTIPLE else size - size % RANK_MULTIPLE


@dataclass(frozen=True)
class Option:
    """One rung of a module's ladder: ``chi=None`` (and ``layout=None``) means left dense.

    A gated MLP's ladder (:func:`unit_ladder`) also has rungs of two other kinds: ``width``, the
    MLP slimmed to that many neurons (:mod:`.slim`), and ``parts``, one rung of each of its
    three projections' own ladders (``((name, option), ...)``). ``calls``: the operations of
    its forward that take a fixed time each (:attr:`~.layout.Layout.calls`; a dense linear 1)."""

    chi: int | None
    params: int
    damage: float
    layout: Layout | None = None
    width: int | None = None
    parts: tuple[tuple[str, "Option"], ...] = ()
    calls: int = 1

    def cost(self, call_cost: float = 0.0) -> float:
        """What the budget trades damage against: parameters, plus ``call_cost`` per call."""
        return self.params + call_cost * self.calls


@dataclass
class Allocation:
    """The rung chosen per ladder name, with the ladders it chose from."""

    chosen: dict[str, Option]
    params_before: int
    params_after: int
    budget: int
    damage: float
    estimate: str  # "fisher", "output" or "weight": how damage was estimated
    options: dict[str, list[Option]] = field(default_factory=dict)

    @property
    def chi(self) -> dict[str, int | None]:
        """The chosen chi per module (``None``: left dense)."""
        return {n: o.chi for n, o in self.chosen.items()}

    @property
    def layout(self) -> dict[str, Layout | None]:
        """The chosen layout per module (``None``: left dense)."""
        return {n: o.layout for n, o in self.chosen.items()}

    @property
    def kept_fraction(self) -> float:
        return self.params_after / max(self.params_before, 1)


def chi_for_params(cls: type[TensorNetworkLinear] | Layout, in_features: int, out_features: int,
                   n_sites: int | None, params: int, bias: bool = False) -> int:
    """The largest chi whose layer has at most ``params`` parameters (at least 1).

    ``cls`` is a network class (with ``n_sites``) or a :class:`~.layout.Layout` (``n_sites``
    then ``None``)."""
    layout = cls if isinstance(cls, Layout) else Layout(cls, n_sites)

    def count(chi: int) -> int:
        return layout.num_parameters(in_features, out_features, chi, bias)

    lo, hi = 1, 1
    while count(hi) <= params:
        if hi > in_features * out_features:  # bonds saturated: every chi beyond is the same
            return hi
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: params(lo) <= params (or lo == 1) < params(hi)
        mid = (lo + hi) // 2
        if count(mid) <= params:
            lo = mid
        else:
            hi = mid
    return lo


def damage(row_sq: Tensor, reference_sq: float, grad_sq: Tensor | None) -> float:
    """Damage of an error ``E`` ``(out, in)`` (whitened when calibrated) from its squared row
    norms ``row_sq = sum_i E[o, i]^2`` ``(out,)``: Gauss-Newton with ``grad_sq``, otherwise
    relative to ``reference_sq``, the squared norm of the weight (whitened likewise).
    With ``grad_sq`` ``E[g g^T]`` ``(out, out)`` the rows are those of ``R E`` (``R^T R`` that
    matrix scaled to mean diagonal 1, :func:`~.fit.output_weights`), and the damage is the
    Kronecker-factored (K-FAC) estimate ``0.5 tr(E^T E[g g^T] E)``."""
    row_sq = row_sq.to(torch.float64)
    if grad_sq is not None and grad_sq.dim() == 2:
        return 0.5 * float(grad_sq.diagonal().mean()) * float(row_sq.sum())
    if grad_sq is not None:
        return 0.5 * float((grad_sq.to(row_sq) * row_sq).sum())
    return float(row_sq.sum()) / max(reference_sq, 1e-300)


@torch.no_grad()
def _start_row_errors(
    layout: Layout, weight: Tensor, chis: list[int], cov: Tensor | None, factor: Tensor | None,
    rows: Tensor | None = None,
) -> list[Tensor]:
    """Per chi, the squared row norms ``(out,)`` of the error ``(out, in)`` of the network
    ``compactify`` starts from, whitened (``E L``, ``C = L L^T``) when ``cov`` is given.

    With data that start is the cut of the weight whitened site by site
    (:func:`~.fit.kronecker_whitened`): an error the fit only lowers, and for the low-rank
    layout exactly the SVD-LLM optimum (with ``rows``, the weighted one's), so layouts compete on
    what they really reach.
    Padded layers (where that start does not apply) fall back to the cut of ``W L`` itself.
    With an output metric ``rows`` (``(out,)`` weights or an ``(out, out)`` matrix,
    :func:`~.fit.output_weights`) the start is the cut of ``R W L`` where the layout allows it
    (:func:`~.fit.kronecker_whitened`). The errors returned are unweighted (``E L``) for weights
    and in the metric's coordinates (``R E L``, ``R^T R = M``) for a matrix: a full metric does
    not split into rows of ``E L``, and :func:`damage` prices it from those.
    """
    target = weight if factor is None else weight @ factor
    if layout.is_low_rank:  # one SVD gives every rank's cut (of W, or of W L: SVD-LLM)
        roots = None if rows is None or cov is None else metric_roots(rows.to(target.device))
        scaled = target if roots is None else weigh_rows(roots[0], target)
        u, s, _ = torch.linalg.svd(scaled, full_matrices=False)
        # The rank-chi cut leaves U[:, chi:] S[chi:] V[:, chi:]^T; V's columns are orthonormal,
        # so row o's squared error is sum_{j >= chi} (U[o, j] s_j)^2: a reversed cumulative sum
        # (of (R^-1 U S)[o, j]^2 where the output was weighted by a diagonal R; a full metric's
        # errors stay in its coordinates, R E L).
        us = (u * s).to(torch.float64)
        if roots is not None and roots[1].dim() == 1:
            us = weigh_rows(roots[1], us)
        tail = us.pow(2).flip(1).cumsum(1).flip(1)
        zero = tail.new_zeros(tail.shape[0])
        return [tail[:, chi] if chi < tail.shape[1] else zero for chi in chis]
    out_f, in_f = weight.shape
    probe = layout.cls(in_f, out_f, 1, layout.n_sites, in_shape=layout.in_shape,
                       out_shape=layout.out_shape, device="meta")

    full = rows is not None and rows.dim() == 2 and cov is not None
    root = metric_roots(rows.to(weight.device))[0] if full else None

    def row_norms(error: Tensor) -> Tensor:
        error = error.to(torch.float64)
        return (weigh_rows(root, error) if full else error).pow(2).sum(1)

    if cov is None or probe.padded_in != in_f or probe.padded_out != out_f:
        return [row_norms(target - layout.decompose(target, None, chi).to_dense()) for chi in chis]
    whitening = SiteWhitening(cov, probe.in_shape)
    whitened = whitening.whiten(weight)  # shared by every chi's cut
    errors = []
    for chi in chis:
        probe = layout.cls(in_f, out_f, chi, layout.n_sites, in_shape=layout.in_shape,
                           out_shape=layout.out_shape, device="meta")
        start = kronecker_whitened(probe, weight, cov, whitening, whitened, rows)
        if start is None:  # rank-deficient bonds: the plain cut of W L
            errors.append(row_norms(target - layout.decompose(target, None, chi).to_dense()))
        else:
            errors.append(row_norms((weight - start.to_dense().to(weight.dtype)) @ factor))
    return errors


def lower_hull(options: list[Option], call_cost: float = 0.0) -> list[Option]:
    """Options on the lower convex hull of (cost, damage), most costly first (the cost:
    :meth:`Option.cost`, the parameters when ``call_cost`` is 0).

    Dominated options (another costs no more and does no more damage) are dropped first;
    on what remains, damage falls as the cost grows, and the hull keeps the convex part, so
    along it each step saves cost at a rising price in damage.
    """
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.cost(call_cost), o.damage)):
        if not front or o.damage < front[-1].damage:
            front.append(o)
    hull: list[Option] = []
    for o in front:  # cost ascending, damage descending: monotone-chain lower hull
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (b.cost(call_cost) - a.cost(call_cost)) * (o.damage - a.damage) - (
                b.damage - a.damage) * (o.cost(call_cost) - a.cost(call_cost))
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(o)
    return hull[::-1]


def allocate(
    modules: Mapping[str, nn.Module],
    ratio: float,
    settings: Mapping[str, tuple[type[TensorNetworkLinear], int] | list[Layout]],
    covariances: Mapping[str, Tensor] | None = None,
    grad_sq: Mapping[str, Tensor] | None = None,
    keep_grid: tuple[float, ...] = KEEP_GRID,
    weigh_outputs: bool = False,
    max_keep: float = 1.0,
    tick: Tick | None = None,
) -> Allocation:
    """Choose chi per module so that the kept parameters total at most ``ratio`` of the dense.

    Args:
        modules: ``{name: linear-like module}``.
        ratio: fraction of the modules' parameters (weights and biases) to keep, in (0, 1].
        settings: ``{name: (MPOLinear or TTNSLinear, n_sites)}``, or ``{name: [Layout, ...]}``
            to offer a module several layouts.
        covariances: optional input covariance per module (``(in, in)``).
        grad_sq: optional ``E[g^2]`` per output feature per module (needs ``covariances``).
        keep_grid: keep fractions tried per module.
        weigh_outputs: price each network as fitted with its output rows weighted by
            ``grad_sq`` (see :func:`ladder`).
        max_keep: offer no network that keeps more than this fraction of its module's
            parameters (a module is then left dense or compressed at least that far).
        tick: called after each module's ladder is priced (a progress bar's).

    Raises:
        ValueError: ``ratio`` outside (0, 1] or below what the smallest grid rung keeps.
    """
    check_ratio(ratio)
    return choose(price(modules, settings, covariances, grad_sq, keep_grid, weigh_outputs,
                        max_keep, tick), ratio, estimate_kind(covariances, grad_sq))


def price(
    modules: Mapping[str, nn.Module],
    settings: Mapping[str, tuple[type[TensorNetworkLinear], int] | list[Layout]],
    covariances: Mapping[str, Tensor] | None = None,
    grad_sq: Mapping[str, Tensor] | None = None,
    keep_grid: tuple[float, ...] = KEEP_GRID,
    weigh_outputs: bool = False,
    max_keep: float = 1.0,
    tick: Tick | None = None,
) -> dict[str, list[Option]]:
    """Every module's :func:`ladder` (arguments as for :func:`allocate`), by name."""
    ladders = {}
    for name, module in modules.items():
        ladders[name] = ladder(module, settings[name],
                               covariances[name] if covariances is not None else None,
                               grad_sq[name] if grad_sq is not None else None, keep_grid,
                               weigh_outputs, max_keep)
        if tick is not None:
            tick()
    return ladders


def estimate_kind(covariances: object | None, grad_sq: object | None) -> str:
    """How damage is estimated: ``"fisher"`` with loss gradients, ``"output"`` with input
    statistics alone, ``"weight"`` without data."""
    return "weight" if covariances is None else ("fisher" if grad_sq is not None else "output")


def check_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ArgumentError(f"ratio must be a float in (0, 1], got {ratio!r}")


@torch.no_grad()
def ladder(
    module: nn.Module,
    setting: tuple[type[TensorNetworkLinear], int] | list[Layout],
    covariance: Tensor | None = None,
    grad_sq: Tensor | None = None,
    keep_grid: tuple[float, ...] = KEEP_GRID,
    weigh_outputs: bool = False,
    max_keep: float = 1.0,
) -> list[Option]:
    """One module's options: dense first, then each offered layout at each chi of the grid,
    with its estimated damage (see the module docs). Needs the module's weight, and nothing
    else of the model: a streaming pass builds the ladders one block at a time.
    ``weigh_outputs`` (with ``covariance`` and ``grad_sq``) prices each network as
    ``compactify`` then fits it: started from the cut with output rows weighted by
    :func:`~.fit.output_weights`, which for the low-rank layout minimises the damage itself.
    ``max_keep`` drops every network with more than that fraction of the dense parameters."""
    layouts = [Layout(*setting)] if isinstance(setting, tuple) else list(setting)
    weight, bias = linear_weight(module)
    out_f, in_f = weight.shape
    dense = weight.numel() + (bias.numel() if bias is not None else 0)
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    cov = factor = None
    reference = w
    if covariance is not None:  # errors are measured whitened, E L (see the module docs)
        cov = covariance.to(device=w.device, dtype=torch.float64)
        factor = stable_cholesky(cov).to(w.dtype)
        reference = w @ factor
    reference_sq = float(reference.to(torch.float64).pow(2).sum())
    rows = output_weights(grad_sq) if weigh_outputs and grad_sq is not None and cov is not None \
        else None
    options = [Option(None, dense, 0.0)]
    for layout in layouts:
        chis = sorted({aligned_rank(layout, chi_for_params(
            layout, in_f, out_f, None, int(k * dense) - (dense - weight.numel())))
            for k in keep_grid})
        counts = {chi: layout.num_parameters(in_f, out_f, chi, bias is not None) for chi in chis}
        chis = [chi for chi in chis if counts[chi] < dense and counts[chi] <= max_keep * dense]
        for chi, row_sq in zip(chis, _start_row_errors(layout, w, chis, cov, factor, rows)):
            options.append(Option(chi, counts[chi], damage(row_sq, reference_sq, grad_sq), layout,
                                  calls=layout.calls))
    return options


def _price(hull: list[Option], k: int, call_cost: float) -> float:
    """Damage added per cost saved by step ``k`` (> 0) down a :func:`lower_hull`."""
    return (hull[k].damage - hull[k - 1].damage) / (
        hull[k - 1].cost(call_cost) - hull[k].cost(call_cost))


def choose(ladders: Mapping[str, list[Option]], ratio: float, estimate: str,
           call_cost: float = 0.0) -> Allocation:
    """The allocation over ready ladders (``{name: ladder(...)}``) that keeps at most ``ratio``
    of their dense parameters with the least summed damage; with ``call_cost``, the least
    damage per unit of cost saved (module docs)."""
    check_ratio(ratio)
    ladders = dict(ladders)
    before = sum(o[0].params for o in ladders.values())
    budget = int(math.floor(ratio * before))
    hulls = {n: lower_hull(o, call_cost) for n, o in ladders.items()}
    smallest = sum(h[-1].params for h in hulls.values())
    if smallest > budget:
        raise ArgumentError(
            f"ratio={ratio} asks for {budget:,} parameters, but the smallest networks on the grid "
            f"need {smallest:,} ({smallest / before:.1%}); use ratio >= {smallest / before:.3f}"
            + (f" or a call_cost below {call_cost:g}" if call_cost else ""))
    # Global greedy over hull steps by damage added per cost saved.
    steps = sorted((_price(hull, k, call_cost), name, k)
                   for name, hull in hulls.items() for k in range(1, len(hull)))
    position = {n: 0 for n in hulls}
    # a ladder whose dense rung is dominated (a rung of no damage with fewer parameters)
    # starts at that rung
    total = sum(h[0].params for h in hulls.values())
    for _, name, k in steps:
        if total <= budget:
            break
        if position[name] != k - 1:  # convex hull: a module's steps come in order
            continue
        total -= hulls[name][k - 1].params - hulls[name][k].params
        position[name] = k
    # Spend what is left: step back up (toward dense) where it fits, best damage saved first.
    while True:
        moves = [
            (_price(hull, position[n], call_cost), n)
            for n, hull in hulls.items()
            if position[n] > 0
            and total + hull[position[n] - 1].params - hull[position[n]].params <= budget
        ]
        if not moves:
            break
        _, name = max(moves)
        hull = hulls[name]
        total += hull[position[name] - 1].params - hull[position[name]].params
        position[name] -= 1
    chosen = {n: hulls[n][position[n]] for n in hulls}
    return Allocation(
        chosen=chosen, params_before=before, params_after=sum(o.params for o in chosen.values()),
        budget=budget, damage=sum(o.damage for o in chosen.values()), estimate=estimate,
        options=ladders,
    )


def unit_ladder(members: Mapping[str, list[Option]], slim: list[Option] = (),
                call_cost: float = 0.0) -> list[Option]:
    """The ladder of a unit of modules compressed together (a gated MLP's three projections):
    every combination of the members' own rungs on the lower convex hull of (cost, damage)
    (:meth:`Option.cost`), which is their hulls' steps taken in order of damage added per cost
    saved (the Minkowski sum of the hulls), each as an :class:`Option` with ``parts``; plus the
    ``slim`` rungs, which change the unit as a whole. The first rung keeps every member dense."""
    hulls = {name: lower_hull(options, call_cost) for name, options in members.items()}
    steps = sorted((_price(hull, k, call_cost), name, k)
                   for name, hull in hulls.items() for k in range(1, len(hull)))
    position = {name: 0 for name in hulls}

    def combined() -> Option:
        parts = tuple((name, hulls[name][k]) for name, k in position.items())
        return Option(None, sum(o.params for _, o in parts), sum(o.damage for _, o in parts),
                      parts=parts, calls=sum(o.calls for _, o in parts))

    rungs = [combined()]
    for _, name, k in steps:
        position[name] = k
        rungs.append(combined())
    return rungs + list(slim)


@torch.no_grad()
def slim_ladder(gate: nn.Module | None, up: nn.Module, down: nn.Module, gram: Tensor,
                grad_sq: Tensor | None, keep_grid: tuple[float, ...] = KEEP_GRID,
                max_keep: float = 1.0, ridge: float = REFIT_RIDGE) -> tuple[list[Option], Tensor]:
    """The slim rungs of an MLP (:mod:`.slim`; ``gate`` ``None`` for a plain one): its width at
    each keep fraction of the grid (a multiple of :data:`RANK_MULTIPLE`), priced like every
    other layout from down's input second moment ``gram`` ``(m, m)`` and loss gradients
    ``grad_sq`` (or the relative output error without them), with the refit's ``ridge`` on the
    Gram (:mod:`.slim`: the refit's error plus its penalty); and the neurons in the order chosen
    (a rung of width ``k`` keeps the first ``k``)."""
    inputs = [linear_weight(layer) for layer in (gate, up) if layer is not None]
    w_down = linear_weight(down)[0]
    m = w_down.shape[1]
    # Per neuron: a row (and a bias entry) of each input projection, a column of down.
    per_neuron = sum(w.shape[1] + (b is not None) for w, b in inputs) + w_down.shape[0]
    fixed = down.bias.numel() if down.bias is not None else 0
    dense = per_neuron * m + fixed
    widths = sorted({aligned(max(1, int(k * m))) for k in keep_grid})
    widths = [k for k in widths if k < m and per_neuron * k + fixed <= max_keep * dense]
    if not widths:
        return [], torch.empty(0, dtype=torch.long)
    weighted, scale = damage_scale(w_down, grad_sq, gram)
    moments = gram.diagonal()
    order, left = greedy_neurons(gram + ridge * torch.diag_embed(moments), weighted, max(widths))
    # The ridge's share of the dropped neurons' own moments, ridge ||B[:, d]||^2 G[d, d], is no
    # risk of the refit: the price keeps only its error and its coefficients' penalty.
    own = ridge * weighted.to(left).pow(2).sum(0) * moments.to(left)
    left = left - (own.sum() - torch.cat([own.new_zeros(1), own[order].cumsum(0)]))
    return ([Option(k, per_neuron * k + fixed, scale * float(left[k]), width=k,
                    calls=len(inputs) + 1)
             for k in widths], order)
