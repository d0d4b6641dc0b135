"""``compactify``: replace the linear layers of a transformer by tensor networks, in place."""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Union

import torch
from torch import nn

from ..layers.layout import CompressedLayer
from ..layers.gated_mlp import share_mlp_rows
from ..saving import attach
from .calibrate import (
    BlockReplay, as_batches, calibrated_order, check_token_ids, collect_covariances,
    collect_paired_covariances,
)
from .config import CompactifyConfig, Method, PerModule, merged_config
from .groups import compactify_groups
from .plan import Plan, make_plan
from .report import CompactifyReport, LayerReport
from .heads import build_heads
from .slim import build_slim
from .surgery import Swaps, build_layer, count_parameters, originals_in_place, replacing
from .targets import Targets

__all__ = ["compactify", "CompactifyConfig"]


def compactify(
    model: nn.Module,
    chi: PerModule | None = None,
    *,
    ratio: float | None = None,
    method: Union[Method, Mapping[str, Method], None] = None,
    n_sites: PerModule | None = None,
    targets: Targets = None,
    exclude: Iterable[str] | None = None,
    tol: float | None = None,
    calibration: Iterable[Any] | None = None,
    fit_steps: int | None = None,
    low_rank: bool | None = None,
    cross_layer: PerModule | None = None,
    lm_head: bool | None = None,
    config: CompactifyConfig | None = None,
    progress: bool = True,
) -> CompactifyReport:
    """Replace the attention and MLP linears of ``model`` by tensor networks, in place.

    Every argument is validated before any module is touched, and on any error the model is
    left exactly as it was. Without calibration every decomposition is computed before the first
    swap. With calibration the blocks are processed in forward order: each block's layers are
    fitted to the activations the already-compressed earlier blocks produce, and swapped in
    before the next block is calibrated; an error undoes every swap. Replacements keep the
    original's device, dtype and ``requires_grad``; biases stay dense.

    Args:
        model: any ``nn.Module``, typically a Hugging Face transformer.
        chi: bond dimension, or ``{pattern: chi, "_default": chi}`` (default 32).
        ratio: keep this fraction of the targeted parameters instead, choosing each module's
            chi (or leaving it dense) to minimise the predicted damage; with ``calibration``
            the damage is the Gauss-Newton estimate of the loss increase. Exclusive with ``chi``.
        method: ``"mpo"`` (matrix product operator), ``"ttns"`` (tree tensor network) or
            ``"low-rank"`` (``W = U V``, two matmuls per call).
        n_sites: sites per layer.
        targets, exclude, tol: see :class:`CompactifyConfig`.
        calibration: optional iterable of token-id tensors ``(batch, seq)`` (or dicts of model
            inputs, or a DataLoader of either). Each layer is then fitted to minimise its output
            error on these inputs, ``||(W - W_hat) X||``, starting from the SVD construction.
        fit_steps: L-BFGS iterations per layer for that fit (default 50).
        low_rank: with ``ratio``, also offer every module the low-rank layout (default True);
            see :class:`CompactifyConfig`.
        cross_layer: make the same-role modules of every ``cross_layer`` consecutive blocks one
            network with shared bases (:mod:`tensornet_llm.compress.groups`); with ``ratio``
            every group keeps that fraction of its parameters. Off (``None``) by default.
        lm_head: also compress the output embedding (default False); see
            :class:`CompactifyConfig`.
        config: a :class:`CompactifyConfig`; explicit keyword arguments override its fields.
        progress: show a progress bar while decomposing.

    Returns:
        A :class:`~tensornet_llm.compress.report.CompactifyReport`.

    Example:
        >>> report = compactify(model, chi={"re:.*mlp.*": 16, "_default": 48}, exclude=["layers.0."])
        >>> print(report)
    """
    cfg = merged_config(config, chi=chi, ratio=ratio, method=method, n_sites=n_sites,
                        targets=targets, exclude=exclude, tol=tol, fit_steps=fit_steps,
                        low_rank=low_rank, cross_layer=cross_layer, lm_head=lm_head)
    start = time.perf_counter()
    batches = as_batches(calibration) if calibration is not None else None
    if batches is not None:
        check_token_ids(model, batches)
    if cfg.cross_layer is not None:
        return compactify_groups(model, cfg, batches, progress)
    plan = make_plan(model, cfg, batches, progress=progress)
    params_before = count_parameters(model)
    built: dict[int, tuple[nn.Module, LayerReport]] = {}
    units = [*plan.slim.values(), *plan.heads.values()]
    total = len(plan.chosen) + sum(len(c.members) for c in units)
    with replacing(model, total, "compactify", "layer", progress) as (swaps, tick):
        if batches is None:
            _replace_all(plan, cfg, built, swaps, tick)
        else:
            _replace_block_by_block(model, plan, cfg, batches, built, swaps, tick)
        _untie(model, plan, swaps)
    if cfg.share_mlp_rows:
        share_mlp_rows(model)
    attach(model)  # so that model.save_pretrained writes what from_pretrained loads
    return CompactifyReport(
        layers=[row for _, row in built.values()], skipped=plan.skipped,
        model_params_before=params_before, model_params_after=count_parameters(model),
        seconds=time.perf_counter() - start, ratio=cfg.ratio,
        dense_target_params=plan.dense_target_params, estimate=plan.estimate, notes=plan.notes,
    )


def _untie(model: nn.Module, plan: Plan, swaps: Swaps) -> None:
    """A replaced LM head that was tied to the input embedding is tied no more: say so in the
    model's config, so that ``save_pretrained`` / ``from_pretrained`` and ``tie_weights`` do not
    tie the embedding's table to it again."""
    config = getattr(model, "config", None)
    if plan.untied and getattr(config, "tie_word_embeddings", False):
        swaps.set(config, "tie_word_embeddings", False)


def _replace_all(plan: Plan, cfg: CompactifyConfig,
                 built: dict[int, tuple[CompressedLayer, LayerReport]], swaps: Swaps,
                 tick) -> None:
    """Without calibration: decompose every module, then swap them all in."""
    for name, module in plan.chosen:
        if id(module) not in built:  # the same module under two names is built once
            built[id(module)] = build_layer(name, module, plan.settings[name], cfg, None)
        tick()
    for name, module in plan.chosen:
        swaps.swap(name, built[id(module)][0])


def _replace_block_by_block(
    model: nn.Module, plan: Plan, cfg: CompactifyConfig, batches: list,
    built: dict[int, tuple[nn.Module, LayerReport]], swaps: Swaps, tick,
) -> None:
    """With calibration: in forward order of the blocks, collect the inputs of a block's
    targets (as the already-compressed earlier blocks produce them), fit, swap them in; a slim
    MLP's layers are built from the inputs of its ``down_proj``, a slim attention's from those
    of its ``o_proj``."""
    modules = dict(plan.chosen)
    slim_by_down = {choice.unit.down: choice for choice in plan.slim.values()}
    heads_by_o = {choice.unit.o: choice for choice in plan.heads.values()}
    # Finished blocks replay their outputs (the paired pass needs the originals rerun).
    replay = None if cfg.match_dense else BlockReplay()
    # Blocks left wholly dense still take part in the order (so they are replayed).
    for block, names in calibrated_order(model, list(plan.settings)):
        slims = [slim_by_down[n] for n in names if n in slim_by_down]
        heads = [heads_by_o[n] for n in names if n in heads_by_o]
        names = [n for n in names if n in modules]
        fresh = {n: modules[n] for n in names if id(modules[n]) not in built}
        fresh.update({c.unit.down: model.get_submodule(c.unit.down) for c in slims})
        fresh.update({c.unit.o: model.get_submodule(c.unit.o) for c in heads})
        covs: dict[str, torch.Tensor] = {}
        cross: dict[str, torch.Tensor] = {}
        if cfg.match_dense and swaps.done and fresh:
            covs, cross = collect_paired_covariances(
                model, batches, fresh, block, lambda: originals_in_place(swaps.done)
            )
        elif fresh:
            collector = collect_covariances(model, batches, fresh, block, replay)
            covs = {n: cfg.regularize(collector.take(n)) for n in fresh}
        for name in names:
            module = modules[name]
            if id(module) not in built:
                built[id(module)] = build_layer(
                    name, module, plan.settings[name], cfg, covs[name], cross.get(name),
                    plan.rows.get(name))
            swaps.swap(name, built[id(module)][0])
            tick()
        for choice in slims:
            originals = tuple(model.get_submodule(n) for n in choice.unit.members)
            layers, rows = build_slim(choice, originals, covs[choice.unit.down],
                                      cross.get(choice.unit.down))
            for name, original, layer, row in zip(choice.unit.members, originals, layers, rows):
                built[id(original)] = (layer, row)
                swaps.swap(name, layer)
                tick()
        for choice in heads:
            attn = model.get_submodule(choice.unit.name)
            originals = tuple(model.get_submodule(n) for n in choice.members)
            layers, rows = build_heads(choice, attn, covs[choice.unit.o], cross.get(choice.unit.o))
            for name, original, layer, row in zip(choice.members, originals, layers, rows):
                built[id(original)] = (layer, row)
                swaps.swap(name, layer)
                tick()
            swaps.set(attn, "num_key_value_groups", choice.width)
        if replay is not None and block is not None:
            replay.finish(block)
