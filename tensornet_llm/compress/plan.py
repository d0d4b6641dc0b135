"""What :func:`~.compactify.compactify` replaces and how, decided before any module is touched:
the targets, and each one's layout and bond dimension, given by the settings or chosen by the
parameter budget (:mod:`.budget`) from calibration statistics."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ArgumentError, EstimateFallbackWarning
from ..helpers.progress import stage
from ..layers.base import linear_weight
from ..layers.layout import METHODS, Layout
from ..layers.quantized import QuantizedLinear, QuantizedTensorNetworkLinear
from .budget import Option, choose, estimate_kind, price, slim_ladder, unit_ladder
from .calibrate import collect_covariances, output_gradients
from .config import CompactifyConfig
from .fit import output_weights
from .heads import HeadChoice, grouped_attentions, head_rungs
from .slim import SlimChoice, mlp_units
from .targets import (find_targets, fused_expert_tensors, output_embedding, resolve_override,
                      shared_weights)

__all__ = ["Plan", "make_plan", "chosen_targets", "offered_layouts", "layout_for"]

QUANTIZED = (QuantizedLinear, QuantizedTensorNetworkLinear)  # the library's own int4 / int8


def chosen_targets(model: nn.Module, cfg: CompactifyConfig
                   ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """The modules ``cfg`` targets, ``[(name, module)]``, and the ones passed over with the
    reason (fused MoE expert tensors among them); an error when nothing matches."""
    chosen, skipped = find_targets(model, cfg.targets, cfg.exclude, cfg.min_features,
                                   cfg.lm_head)
    if not chosen:
        quantized = next((n for n, m in model.named_modules() if isinstance(m, QUANTIZED)), None)
        raise ArgumentError(
            f"targets={cfg.targets!r} (exclude={cfg.exclude!r}) matched no nn.Linear or Conv1D "
            "module of the model" + (f" ({quantized} is quantized: compress the float model, "
                                     "then quantize)" if quantized else ""))
    skipped += [(name, f"fused MoE expert tensor {shape}, not tensorized")
                for name, shape in fused_expert_tensors(model)]
    return chosen, skipped


@dataclass
class Plan:
    """What ``compactify`` replaces and how, decided before any module is touched.

    ``settings`` holds ``(layout, chi)`` per target name (``None``: left dense by the budget, or
    part of a slim MLP or attention) in model order; ``chosen`` the targets replaced one by
    one, ``slim`` the gated MLPs the budget slims, by MLP name, ``heads`` the attention
    modules it gives fewer heads, by module name, and ``untied`` the targets whose
    weight another module keeps (a tied LM head), with that parameter's name."""

    chosen: list[tuple[str, nn.Module]]
    skipped: list[tuple[str, str]]
    settings: dict[str, tuple[Layout, int] | None]
    dense_target_params: int = 0
    estimate: str | None = None
    notes: list[str] = field(default_factory=list)
    #: Output row weights per target name (:func:`~.fit.output_weights`), for the fit.
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    slim: dict[str, SlimChoice] = field(default_factory=dict)
    heads: dict[str, HeadChoice] = field(default_factory=dict)
    untied: dict[str, str] = field(default_factory=dict)

    @property
    def slimmed(self) -> set[str]:
        """The targets that are part of a slim MLP or a slim attention."""
        return {n for c in [*self.slim.values(), *self.heads.values()] for n in c.members}


def make_plan(model: nn.Module, cfg: CompactifyConfig, batches: list | None,
              budget: Callable | None = None, progress: bool = False) -> Plan:
    """Targets, and every module's layout and chi (from the budget when ``cfg.ratio`` is set).
    Every per-module setting is resolved here, so a missing pattern fails before any work.
    ``budget(chosen, offered) -> (settings, estimate)`` replaces the in-memory budget pass
    (streaming compression builds the ladders block by block). ``progress``: a bar for each
    stage of the budget pass (statistics, loss gradients, pricing)."""
    chosen, skipped = chosen_targets(model, cfg)
    shared = shared_weights(model, chosen)
    if cfg.ratio is None:
        settings = {name: (layout_for(module, resolve_override(cfg.method, name, "method"),
                                      resolve_override(cfg.n_sites, name, "n_sites"),
                                      cfg.interpolative),
                           resolve_override(cfg.effective_chi, name, "chi"))
                    for name, module in chosen}
        notes = [f"{name} no longer shares its weight with {param}, which keeps the dense table"
                 for name, param in shared.items()]
        return Plan(chosen, skipped, settings, notes=notes, untied=shared)
    chosen = _priced_targets(model, chosen, skipped, shared, cfg)
    offered = {name: offered_layouts(name, module, cfg) for name, module in chosen}
    notes: list[str] = []
    if budget is None:
        settings, estimate, rows, slim, heads = _budget_settings(
            model, chosen, offered, batches, notes, cfg, progress)
    else:
        (settings, estimate), rows, slim, heads = budget(chosen, offered), {}, {}, {}
    if cfg.call_cost:
        notes.append(f"the budget priced each call of a layer's forward as {cfg.call_cost:,.0f} "
                     "parameters (call_cost)")
    slimmed = Plan([], [], {}, slim=slim, heads=heads).slimmed
    left = {id(m): m for n, m in chosen if settings[n] is None and n not in slimmed}
    dense_target_params = sum(
        sum(p.numel() for p in linear_weight(m) if p is not None) for m in left.values()
    )
    skipped += [(n, f"left dense by the ratio={cfg.ratio} budget")
                for n, _ in chosen if settings[n] is None and n not in slimmed]
    chosen = [(n, m) for n, m in chosen if settings[n] is not None]
    return Plan(chosen, skipped, settings, dense_target_params, estimate, notes, rows, slim,
                heads)


def _priced_targets(model: nn.Module, chosen: list[tuple[str, nn.Module]],
                    skipped: list[tuple[str, str]], shared: dict[str, str],
                    cfg: CompactifyConfig) -> list[tuple[str, nn.Module]]:
    """The targets the budget prices: not those whose weight another module keeps (any layout
    would add parameters; they join ``skipped``). Refuses, before any work, the full output
    metric on the LM head (an ``(out, out)`` matrix of the vocabulary's size)."""
    skipped += [(name, f"shares its weight with {param}, which stays: a compressed copy would "
                       f"add parameters, so the ratio={cfg.ratio} budget leaves it dense")
                for name, param in shared.items()]
    priced = [(n, m) for n, m in chosen if n not in shared]
    if not priced:
        raise ArgumentError(f"targets={cfg.targets!r} leave the ratio budget only modules that "
                            f"share their weight with another: {sorted(shared)}")
    head = output_embedding(model)
    if cfg.weigh_outputs and cfg.output_metric == "full" and any(m is head for _, m in priced):
        out = linear_weight(head)[0].shape[0]
        raise ArgumentError(f"output_metric='full' weighs the LM head's {out:,} outputs with an "
                            f"({out:,}, {out:,}) matrix ({out * out * 8 / 2**30:.1f} GiB); use "
                            "'diagonal' with lm_head")
    return priced


def offered_layouts(name: str, module: nn.Module, cfg: CompactifyConfig) -> list[Layout]:
    """The layouts the budget offers module ``name``: its ``method`` / ``n_sites`` layout, and
    the low-rank one too when ``cfg.low_rank``."""
    layout = layout_for(module, resolve_override(cfg.method, name, "method"),
                        resolve_override(cfg.n_sites, name, "n_sites"), cfg.interpolative)
    out_f, in_f = linear_weight(module)[0].shape
    low_rank = Layout.low_rank(in_f, out_f, cfg.interpolative)
    return [layout] + ([low_rank] if cfg.low_rank and layout != low_rank else [])


def layout_for(module: nn.Module, method: str, n_sites: int, rows: bool = True) -> Layout:
    if method == "low-rank":
        out_f, in_f = linear_weight(module)[0].shape
        return Layout.low_rank(in_f, out_f, rows)
    return Layout(METHODS[method], n_sites)


def _budget_settings(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], offered: dict[str, list[Layout]],
    batches: list | None, notes: list[str], cfg: CompactifyConfig, progress: bool = False,
) -> tuple[dict[str, tuple[Layout, int] | None], str, dict[str, torch.Tensor],
           dict[str, SlimChoice], dict[str, HeadChoice]]:
    """``(layout, chi)`` per target name (``None``: stays dense, or slimmed) under the parameter
    budget, how damage was estimated, the output row weights per target name the fit then uses
    (empty unless ``cfg.weigh_outputs`` and loss gradients), the gated MLPs to slim and the
    attention modules to give fewer heads. With calibration data and ``cfg.slim_mlp``,
    each gated MLP whose three projections are targets is priced as one unit: its projections'
    own rungs combined, and its slim widths; with ``cfg.slim_attention`` likewise each
    attention whose query and output projections are targets (:mod:`.heads`; with its
    key/value projections, whole key/value heads too).
    A weaker estimate than the data allows is warned and noted."""
    unique: dict[int, str] = {}
    for name, module in chosen:
        unique.setdefault(id(module), name)
    modules = {name: module for name, module in chosen if unique[id(module)] == name}
    covs = grads = None
    if batches is not None:
        with stage("budget: input statistics", len(batches), "batch", progress) as tick:
            collector = collect_covariances(model, batches, modules, tick=tick)
        covs = {n: cfg.regularize(collector.covariance(n)) for n in modules}
        full = cfg.weigh_outputs and cfg.output_metric == "full"
        grads, reason = None, None
        if cfg.gradients:
            with stage("budget: loss gradients", len(batches), "batch", progress) as tick:
                grads, reason = output_gradients(model, batches, modules, full=full, tick=tick)
        if reason is not None:
            note = (f"budget damage estimated from the output error, not the loss: {reason}")
            warnings.warn(note, EstimateFallbackWarning, stacklevel=4)
            notes.append(note)
    weigh = cfg.weigh_outputs and grads is not None
    units = mlp_units(model, modules) if cfg.slim_mlp and covs is not None else []
    attentions = grouped_attentions(model, modules) if cfg.slim_attention and covs is not None \
        else []
    orders = {}
    kept_heads: dict[str, list[torch.Tensor]] = {}
    with stage("budget: pricing layouts", len(modules) + len(units) + len(attentions), "module",
               progress) as tick:
        ladders = price(modules, {n: offered[n] for n in modules}, covs, grads,
                        weigh_outputs=weigh, max_keep=cfg.max_keep, tick=tick)
        for unit in units:
            gate, up, down = (None if n is None else modules[n] for n in (unit.gate, unit.up,
                                                                          unit.down))
            slim, orders[unit.name] = slim_ladder(
                gate, up, down, covs[unit.down], None if grads is None else grads[unit.down],
                max_keep=cfg.max_keep)
            ladders[unit.name] = unit_ladder({n: ladders.pop(n) for n in unit.members}, slim,
                                             cfg.call_cost)
            tick()
        for attn in attentions:
            rungs = head_rungs(attn, {n: modules[n] for n in attn.members}, covs[attn.o],
                               None if grads is None else grads[attn.o], cfg.max_keep)
            kept_heads[attn.name] = [keep for _, _, keep in rungs]
            ladders[attn.name] = unit_ladder(  # a rung's width: its place in kept_heads
                {n: ladders.pop(n) for n in attn.members},
                [Option(len(keep), params, damage, width=i, calls=len(attn.members))
                 for i, (params, damage, keep) in enumerate(rungs)], cfg.call_cost)
            tick()
    allocation = choose(ladders, cfg.ratio, estimate_kind(covs, grads), cfg.call_cost)
    picks: dict[str, Option | None] = dict(allocation.chosen)
    slim_choices = {}
    for unit in units:  # a unit's rung: its projections' own rungs, or the MLP slimmed
        option = picks.pop(unit.name)
        if option.width is None:
            picks.update(option.parts)
        else:
            slim_choices[unit.name] = SlimChoice(unit, orders[unit.name][:option.width])
            picks.update(dict.fromkeys(unit.members))
    head_choices = {}
    for attn in attentions:  # likewise: the projections' own rungs, or fewer heads
        option = picks.pop(attn.name)
        if option.width is None:
            picks.update(option.parts)
        else:
            head_choices[attn.name] = HeadChoice(attn, kept_heads[attn.name][option.width])
            picks.update(dict.fromkeys(attn.members))
    if weigh:
        notes.append("each network fitted to the Gauss-Newton loss estimate (output features "
                     "weighted by the loss gradient's second moment"
                     + (", the whole matrix: K-FAC)" if cfg.output_metric == "full" else ")"))
    settings = {
        name: None if option is None or option.chi is None else (option.layout, option.chi)
        for name, module in chosen
        for option in [picks[unique[id(module)]]]
    }
    rows = {name: output_weights(grads[unique[id(module)]]) for name, module in chosen
            if weigh and settings[name] is not None}  # only what the fit will use
    return settings, allocation.estimate, rows, slim_choices, head_choices
