"""``compactify(model, cross_layer=G)``: same-role modules of ``G`` consecutive blocks become one
cross-layer network (:mod:`tensornet_llm.layers.cross_layer`), fitted by :mod:`.sweeps`.

A *role* is a module's name inside its block (``self_attn.q_proj``); a group is a run of at
most ``G`` modules of one role, one shape and one bias setting, in consecutive blocks of one
stack (a stack of 30 blocks with ``G = 4`` gives seven groups of four and one of two). Modules
outside the block stacks form groups of one (a group of one is a low-rank layer).

With calibration the modules are fitted in forward order of the blocks, as in the per-layer
path: each block's inputs come from the compressed blocks before it. A shared network is fitted
once its last member's block is reached, on each member's covariance as the pass reached it
(its earlier members still dense while the later ones are collected).
With ``ratio`` the budget of :mod:`.budget` chooses per group, by the same predicted
damage (from one pass of the dense model): the group as one cross-layer network at some size (and side), its members as per-layer
networks (each at its own chi and layout), or dense.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EstimateFallbackWarning, RankDeficientError
from ..helpers.progress import stage
from ..layers.base import linear_weight
from ..layers.cross_layer import SIDES, CrossLayerLinear, SharedBases, kept_rows_gauge
from ..layers.gated_mlp import share_mlp_rows
from ..saving import attach
from .budget import KEEP_GRID, Option, choose, damage, estimate_kind, ladder, lower_hull
from .calibrate import BlockReplay, calibrated_order, collect_covariances, output_gradients
from .config import CompactifyConfig
from .plan import chosen_targets, offered_layouts
from .surgery import build_layer, count_parameters, relative_error, replacing
from .fit import output_weights
from .report import CompactifyReport, LayerReport
from .sweeps import GroupFit, fit_group, group_parameters, group_ranks, start_row_errors
from .targets import resolve_override

__all__ = ["Group", "compactify_groups", "find_groups"]


@dataclass
class Group:
    """Modules of one role in consecutive blocks: ``names`` and ``modules`` in block order."""

    role: str
    names: list[str]
    modules: list[nn.Module]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of every member's weight."""
        return tuple(linear_weight(self.modules[0])[0].shape)

    @property
    def dense_parameters(self) -> int:
        out_f, in_f = self.shape
        return len(self.modules) * out_f * in_f


def _stack_role(name: str) -> tuple[tuple[str, str], int]:
    """``((stack, role), block index)``, split at the first numeric component of ``name``
    (``("encoder.block", "layer.0.SelfAttention.q"), 3`` for ``encoder.block.3.layer.0.
    SelfAttention.q``: blocks that hold lists of their own are grouped by the outer list)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return (".".join(parts[:i]), ".".join(parts[i + 1:])), int(part)
    return ("", name), 0


def find_groups(chosen: list[tuple[str, nn.Module]],
                size: int | Mapping[str, int]) -> list[Group]:
    """Split the targets ``chosen`` (in model order) into groups of at most ``size`` (or
    ``{pattern: size, "_default": size}`` per module) same-role modules of consecutive blocks
    (see the module docs); groups come in model order of their first member. A module reachable
    under two names is grouped once, under the first."""
    runs: dict[tuple, list[tuple[int, str, nn.Module]]] = {}
    seen: set[int] = set()
    order: list[tuple] = []
    for name, module in chosen:
        if id(module) in seen:
            continue
        seen.add(id(module))
        weight, bias = linear_weight(module)
        key, index = _stack_role(name)
        key += (tuple(weight.shape), bias is not None, resolve_override(size, name, "cross_layer"))
        if key not in runs:
            runs[key] = []
            order.append(key)
        runs[key].append((index, name, module))
    groups: list[Group] = []
    for key in order:
        members = sorted(runs[key], key=lambda t: t[0])
        current: list[tuple[int, str, nn.Module]] = []
        for member in members:
            if current and (len(current) == key[-1] or member[0] != current[-1][0] + 1):
                groups.append(Group(key[1], [n for _, n, _ in current], [m for _, _, m in current]))
                current = []
            current.append(member)
        groups.append(Group(key[1], [n for _, n, _ in current], [m for _, _, m in current]))
    position = {name: i for i, (name, _) in enumerate(chosen)}
    return sorted(groups, key=lambda g: position[g.names[0]])


def _ranks(group: Group, side: str, cfg: CompactifyConfig) -> tuple[int | None, int | None]:
    """The ranks ``chi`` gives the shared bases of ``side`` (clipped to the features)."""
    out_f, in_f = group.shape
    chi = resolve_override(cfg.effective_chi, group.names[0], "chi")
    return (min(chi, in_f) if side != "output" else None,
            min(chi, out_f) if side != "input" else None)


def _fit(group: Group, cfg: CompactifyConfig, covs: list | None) -> tuple[str, GroupFit]:
    """The group's side and fit at ``chi`` (without ``ratio``); ``"auto"`` starts every side
    within the parameters the input side has at ``chi`` and sweeps the one whose start has the
    least output error."""
    side = resolve_override(cfg.cross_layer_side, group.names[0], "cross_layer_side")
    weights = [linear_weight(m)[0].detach() for m in group.modules]
    out_f, in_f = group.shape
    g = len(group.modules)
    if side != "auto":
        in_rank, out_rank = _ranks(group, side, cfg)
        return side, fit_group(weights, covs, side=side, in_rank=in_rank, out_rank=out_rank,
                               sweeps=cfg.sweeps)
    keep = group_parameters("input", in_f, out_f, g, *_ranks(group, "input", cfg),
                            cfg.interpolative) / group.dense_parameters
    starts = {}  # every side's closed-form start, at the same parameters; sweep the best
    for candidate in SIDES:
        in_rank, out_rank = group_ranks(candidate, in_f, out_f, g, keep, cfg.interpolative)
        fit = fit_group(weights, covs, side=candidate, in_rank=in_rank, out_rank=out_rank,
                        sweeps=0)
        starts[candidate] = (fit.history[-1], in_rank, out_rank, fit)
    side = min(starts, key=lambda c: starts[c][0])
    _, in_rank, out_rank, fit = starts[side]
    if cfg.sweeps and side != "output":
        fit = fit_group(weights, covs, side=side, in_rank=in_rank, out_rank=out_rank,
                        sweeps=cfg.sweeps)
    return side, fit


def _members(group: Group, fit: GroupFit, kept_rows: bool) -> list[CrossLayerLinear]:
    """The drop-in modules of a fitted group, on the originals' device and dtype; a shared
    input basis alone in the kept-rows gauge with ``kept_rows`` (where its rank allows:
    ``in_rank <= G out``, as :func:`~.sweeps.group_parameters` counts, and the stacked cores
    have full column rank, which fails only when no member uses some shared direction, as
    for exact twins fitted in closed form: those keep the plain form, ``in_rank^2``
    parameters more than priced)."""
    weight, _ = linear_weight(group.modules[0])
    kw = {"device": weight.device, "dtype": weight.dtype}
    out_f, in_f = group.shape
    in_basis, cores = fit.in_basis, fit.cores
    kept: list[tuple | None] = [None] * len(cores)
    if kept_rows and fit.out_basis is None and in_basis.shape[0] <= len(cores) * out_f:
        try:
            gauged_basis, gauged = kept_rows_gauge(in_basis, cores)
        except RankDeficientError:  # only exact twins give it; the plain form holds the maps
            pass
        else:
            in_basis = gauged_basis
            kept = [(k, order) if k.numel() else None for k, order, _ in gauged]  # none: plain
            cores = [core for _, _, core in gauged]
    shared = SharedBases(
        in_f, out_f, None if in_basis is None else in_basis.shape[0],
        None if fit.out_basis is None else fit.out_basis.shape[1], len(group.modules), **kw)
    with torch.no_grad():
        for param, value in ((shared.in_basis, in_basis), (shared.out_basis, fit.out_basis)):
            if param is not None:
                param.copy_(value)
                param.requires_grad_(weight.requires_grad)
    members = []
    for index, module in enumerate(group.modules):
        w, bias = linear_weight(module)
        k, order = kept[index] or (None, None)
        member = CrossLayerLinear(shared, index, bias is not None, kept=k, row_order=order, **kw)
        with torch.no_grad():
            member.core.copy_(cores[index])
            if bias is not None:
                member.bias.copy_(bias)
        member.core.requires_grad_(w.requires_grad)
        if bias is not None:
            member.bias.requires_grad_(bias.requires_grad)
        member.train(module.training)
        members.append(member)
    return members


@dataclass(frozen=True)
class _Choice:
    """What the budget chose for a group: leave it ``"dense"``, compress its ``"members"``
    one by one (their per-layer options), or make it one cross-layer ``"group"`` (``side``
    and ``ranks``; ``None``: from ``chi`` and ``cross_layer_side``)."""

    kind: str
    members: tuple[Option, ...] = ()
    side: str | None = None
    ranks: tuple[int | None, int | None] | None = None


def _reference_sq(weight: torch.Tensor, cov: torch.Tensor | None) -> float:
    w = weight.detach().to(torch.float64)
    return float(((w @ cov.to(torch.float64)) * w).sum()) if cov is not None else float(
        w.pow(2).sum())


def _group_ladder(group: Group, cfg: CompactifyConfig, covs: dict | None, grads: dict | None,
                  ) -> tuple[list[Option], list[_Choice]]:
    """One ladder for the whole group: dense; the members' per-layer ladders summed (their
    lower hulls merged in order of damage per parameter, as the budget would step them); and
    the group as one cross-layer network at every keep of the grid, for every side offered.
    Each rung's ``chi`` is its index in the returned choices."""
    choices: list[_Choice] = []
    options: list[Option] = []

    def add(params: int, damage: float, choice: _Choice) -> None:
        options.append(Option(len(choices), params, damage))
        choices.append(choice)

    names, modules = group.names, group.modules
    weigh = cfg.weigh_outputs and grads is not None  # as build_layer then fits them
    hulls = [lower_hull(ladder(m, offered_layouts(n, m, cfg), covs[n] if covs else None,
                                grads[n] if grads else None, weigh_outputs=weigh,
                                max_keep=cfg.max_keep))
             for n, m in zip(names, modules)]
    dense = sum(h[0].params for h in hulls)
    add(dense, 0.0, _Choice("dense"))
    position = [0] * len(hulls)
    steps = sorted(((h[k].damage - h[k - 1].damage) / (h[k - 1].params - h[k].params), m, k)
                   for m, h in enumerate(hulls) for k in range(1, len(h)))
    for _, m, k in steps:  # a hull's steps get dearer, so each member's come in order
        position[m] = k
        picked = tuple(h[p] for h, p in zip(hulls, position))
        add(sum(o.params for o in picked), sum(o.damage for o in picked),
            _Choice("members", picked))
    if len(modules) == 1:  # a group of one is a per-layer low-rank layer, offered above
        return options, choices
    out_f, in_f = group.shape
    g = len(modules)
    weights = [linear_weight(m)[0] for m in modules]
    group_covs = [covs[n] for n in names] if covs else None
    references = [_reference_sq(w, c) for w, c in zip(weights, group_covs or [None] * g)]
    biases = sum(b.numel() for m in modules for b in [linear_weight(m)[1]] if b is not None)
    side = resolve_override(cfg.cross_layer_side, names[0], "cross_layer_side")
    group_rows = [output_weights(grads[n]) for n in names] if weigh else None
    for candidate in SIDES if side == "auto" else (side,):
        # "both" is priced rank by rank, so on every other rung of the grid
        grid = KEEP_GRID[::2] if candidate == "both" else KEEP_GRID
        ranks = sorted({group_ranks(candidate, in_f, out_f, g, keep, cfg.interpolative)
                        for keep in grid},
                       key=lambda r: (r[0] or 0, r[1] or 0))
        rows_of = group_rows if candidate == "input" else None
        for rank, rows in zip(ranks, start_row_errors(weights, group_covs, candidate, ranks,
                                                      rows_of)):
            params = group_parameters(candidate, in_f, out_f, g, *rank,
                                      cfg.interpolative) + biases
            if params < dense and params <= cfg.max_keep * dense:
                add(params, sum(damage(r, ref, grads[n] if grads else None)
                                for r, ref, n in zip(rows, references, names)),
                    _Choice("group", side=candidate, ranks=rank))
    return options, choices


def _budget(model: nn.Module, groups: list[Group], cfg: CompactifyConfig, batches: list | None,
            covs: dict | None, notes: list[str], progress: bool = False
            ) -> tuple[list[_Choice], str, dict | None]:
    """Per group, the choice that keeps at most ``cfg.ratio`` of the targeted parameters with
    the least summed damage (the same estimate and greedy as the per-layer budget); how damage
    was estimated; the loss gradients' second moments per module (``None`` without them)."""
    grads = None
    if batches is not None and cfg.gradients:
        modules = {n: m for g in groups for n, m in zip(g.names, g.modules)}
        with stage("budget: loss gradients", len(batches), "batch", progress) as tick:
            grads, reason = output_gradients(model, batches, modules, tick=tick)
        if reason is not None:
            note = f"budget damage estimated from the output error, not the loss: {reason}"
            warnings.warn(note, EstimateFallbackWarning, stacklevel=4)
            notes.append(note)
    estimate = estimate_kind(covs, grads)
    ladders, table = {}, {}
    with stage("budget: pricing layouts", len(groups), "group", progress) as tick:
        for group in groups:
            ladders[group.names[0]], table[group.names[0]] = _group_ladder(group, cfg, covs,
                                                                           grads)
            tick()
    allocation = choose(ladders, cfg.ratio, estimate)
    return [table[g.names[0]][allocation.chi[g.names[0]]] for g in groups], estimate, grads


def _group_rows(group: Group, side: str, fit: GroupFit, members: list[CrossLayerLinear],
                calibrated: bool, seconds: float) -> list[LayerReport]:
    rows = []
    for index, (name, module, member) in enumerate(zip(group.names, group.modules, members)):
        weight, bias = linear_weight(module)
        rows.append(LayerReport(
            name=name, in_features=member.in_features, out_features=member.out_features,
            method=f"cross-layer {side} x{len(members)}",
            chi=max(member.shared.core_shape), bond_dims=list(member.shared.core_shape),
            params_before=weight.numel() + (bias.numel() if bias is not None else 0),
            # the shared bases are counted once, on the group's first member
            params_after=member.own_parameters + (member.shared_parameters if index == 0 else 0),
            rel_error=relative_error(member.to_dense().detach(), weight.detach()),
            seconds=seconds / len(members),
            act_error_start=fit.start_errors[index] if calibrated else None,
            act_error=fit.errors[index] if calibrated else None,
        ))
    return rows


def _in_block_order(model: nn.Module, groups: list[Group], plans: list[_Choice],
                    cfg: CompactifyConfig, batches: list, realise, tick) -> None:
    """Fit in forward order of the blocks, like the per-layer path: each block's inputs come
    from the already-compressed blocks before it. A module compressed alone is realised as soon
    as its block is reached; a shared network when its last member's block is (its earlier
    members stay dense until then). A block is replayed only once every block up to it is
    final."""
    group_of = {n: i for i, g in enumerate(groups) for n in g.names}
    modules = {n: m for g in groups for n, m in zip(g.names, g.modules)}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    replay = BlockReplay()
    unfinished: list[nn.Module] = []
    for block, names in calibrated_order(model, list(modules)):
        collector = collect_covariances(model, batches, {n: modules[n] for n in names}, block,
                                        replay)
        for name in names:
            pending.setdefault(group_of[name], {})[name] = cfg.regularize(collector.take(name))
        for index in list(pending):
            group, plan = groups[index], plans[index]
            ready = pending[index]
            if plan.kind != "group":  # members on their own: as soon as they are reached
                realise(group, plan, ready, [n for n in names if n in ready])
            if len(ready) == len(group.names):
                if plan.kind == "group":
                    realise(group, plan, ready, group.names)
                del pending[index]
                tick()
        if block is not None:
            unfinished.append(block)
            if not pending:  # every block so far holds its final modules
                for finished in unfinished:
                    replay.finish(finished)
                unfinished = []


def compactify_groups(model: nn.Module, cfg: CompactifyConfig, batches: list | None,
                      progress: bool = True) -> CompactifyReport:
    """:func:`~.compactify.compactify` with ``cross_layer`` set: every group is fitted before
    the first module is swapped, so an error leaves the model untouched. With ``ratio`` the
    budget chooses per group between the cross-layer network (at some size), the members'
    own per-layer networks, and leaving them dense."""
    start = time.perf_counter()
    chosen, skipped = chosen_targets(model, cfg)
    groups = find_groups(chosen, cfg.cross_layer)
    for group in groups:  # every per-module setting resolves before any work
        resolve_override(cfg.cross_layer_side, group.names[0], "cross_layer_side")
        for name, module in zip(group.names, group.modules):
            if cfg.ratio is None:
                resolve_override(cfg.effective_chi, name, "chi")
            else:
                offered_layouts(name, module, cfg)
    params_before = count_parameters(model)
    covs = None
    if batches is not None and cfg.ratio is not None:  # the budget's: the dense model's inputs
        modules = {n: m for g in groups for n, m in zip(g.names, g.modules)}
        with stage("budget: input statistics", len(batches), "batch", progress) as tick:
            collector = collect_covariances(model, batches, modules, tick=tick)
        covs = {n: cfg.regularize(collector.take(n)) for n in modules}
    notes = [f"cross-layer groups of up to {cfg.cross_layer} blocks per role"]
    estimate = grads = None
    if cfg.ratio is None:
        plans = [_Choice("group") for _ in groups]
    else:
        plans, estimate, grads = _budget(model, groups, cfg, batches, covs, notes, progress)
    # Output weights per module for the fit (as the budget priced it); empty when unweighted.
    out_weights = ({n: output_weights(g) for n, g in grads.items()}
                   if cfg.weigh_outputs and grads is not None else {})
    if out_weights:
        notes.append("fitted to the Gauss-Newton loss estimate (output features weighted by the "
                     "loss gradient's second moment): modules compressed alone and shared input "
                     "bases; shared output bases to the unweighted output error")
    rows: list[LayerReport] = []
    dense: list[tuple[str, nn.Module]] = []
    names_of = {id(m): [n for n, mm in chosen if mm is m] for _, m in chosen}

    def realise(swaps, group: Group, plan: _Choice, group_covs: dict | None,
                names: list[str]) -> None:
        """Build ``names`` of ``group`` as planned (all of it for a shared network) and swap
        them in under every name they have."""
        t0 = time.perf_counter()
        built: list[tuple[nn.Module, nn.Module]] = []
        if plan.kind == "group":
            covs_list = None if group_covs is None else [group_covs[n] for n in group.names]
            if plan.ranks is None:
                side, fit = _fit(group, cfg, covs_list)
            else:
                side = plan.side
                fit = fit_group([linear_weight(m)[0] for m in group.modules], covs_list,
                                side=side, in_rank=plan.ranks[0], out_rank=plan.ranks[1],
                                sweeps=cfg.sweeps,
                                rows=[out_weights[n] for n in group.names]
                                if out_weights and side == "input" else None)
            members = _members(group, fit, cfg.interpolative)
            rows.extend(_group_rows(group, side, fit, members, covs_list is not None,
                                    time.perf_counter() - t0))
            built = list(zip(group.modules, members))
        else:
            options = plan.members or (Option(None, 0, 0.0),) * len(group.modules)
            for name, module, option in zip(group.names, group.modules, options):
                if name not in names:
                    continue
                if option.chi is None:
                    dense.append((name, module))
                    continue
                new, row = build_layer(name, module, (option.layout, option.chi), cfg,
                                  group_covs[name] if group_covs else None,
                                  rows=out_weights.get(name))
                built.append((module, new))
                rows.append(row)
        for module, new in built:
            for name in names_of[id(module)]:
                swaps.swap(name, new)

    with replacing(model, len(groups), "compactify (cross-layer)", "group", progress) as (
            swaps, tick):
        if batches is None:
            for group, plan in zip(groups, plans):
                realise(swaps, group, plan, None, group.names)
                tick()
        else:
            notes.append("each block's modules fitted on the inputs the compressed blocks before "
                         "it give (a shared network once its last member's block is reached)")
            _in_block_order(model, groups, plans, cfg, batches,
                            lambda *a: realise(swaps, *a), tick)
    skipped += [(n, f"left dense by the ratio={cfg.ratio} budget") for n, _ in dense]
    dense_target_params = sum(sum(p.numel() for p in linear_weight(m) if p is not None)
                              for _, m in dense)
    if cfg.share_mlp_rows:  # MLPs whose gate and up the budget left to per-layer kept rows
        share_mlp_rows(model)
    attach(model)  # so that model.save_pretrained writes what from_pretrained loads
    return CompactifyReport(
        layers=rows, skipped=skipped, model_params_before=params_before,
        model_params_after=count_parameters(model), seconds=time.perf_counter() - start, ratio=cfg.ratio,
        dense_target_params=dense_target_params, estimate=estimate, notes=notes)
