"""``compactify``: replace the linear layers of a transformer by tensor networks, in place."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Union

import torch
from torch import nn

from ..errors import ArgumentError, EstimateFallbackWarning
from ..helpers.progress import stage
from ..layers.base import TensorNetworkLinear, linear_weight
from ..layers.cross_layer import SIDES
from ..layers.gated_mlp import share_mlp_rows
from ..layers.layout import METHODS, Layout
from .budget import allocate
from .calibrate import (
    BlockReplay, as_batches, calibrated_order, check_token_ids, collect_covariances,
    collect_paired_covariances, output_gradients,
)
from .fit import (
    corrected_target, fit_weighted, kronecker_whitened, output_weights, weighted_error,
    whitened_start_is_optimal,
)
from .report import CompactifyReport, LayerReport
from .targets import (
    DEFAULT_KEY, Targets, check_pattern, find_targets, fused_expert_tensors, resolve_override,
)

__all__ = ["compactify", "CompactifyConfig"]

Method = Literal["mpo", "ttns", "low-rank"]
#: What ``method`` may name: a network class, or the low-rank layout (a 2-site MPO, W = U V).
METHOD_NAMES = (*METHODS, "low-rank")
#: What ``CompactifyConfig.output_metric`` takes.
OUTPUT_METRICS = ("diagonal", "full")
PerModule = Union[int, Mapping[str, int]]
DEFAULT_CHI = 32


@dataclass
class CompactifyConfig:
    """Settings of :func:`compactify`.

    Attributes:
        chi: maximum bond dimension, or ``{pattern: chi, "_default": chi}`` per module
            (default 32 unless ``ratio`` is given).
        ratio: instead of ``chi``, the fraction of the targeted parameters to keep; each
            module's chi is then chosen (some modules may stay dense) to minimise the predicted
            damage, see :mod:`tensornet_llm.compress.budget`. Exclusive with ``chi``.
        method: ``"mpo"``, ``"ttns"`` or ``"low-rank"`` (the rank-chi factorisation ``W = U V``
            as a 2-site MPO; ``n_sites`` does not apply), or a per-module mapping like ``chi``.
        n_sites: sites per layer (int or per-module mapping).
        targets: ``None`` for every attention/MLP linear, patterns, or a filter on
            ``(module, qualified_name)``; see :mod:`tensornet_llm.compress.targets`.
        exclude: patterns of modules to leave dense.
        tol: optional relative Frobenius tolerance: bonds keep fewer than ``chi`` values where
            the weight allows it.
        min_features: the default targets skip layers narrower than this.
        fit_steps: with calibration data, L-BFGS iterations of the data-aware fit per layer
            (none for low-rank layers, whose whitened start is already the optimum).
        low_rank: with ``ratio``, also offer every module the low-rank layout (a 2-site MPO
            with the whole output leg on one site and the whole input leg on the other: the
            rank-chi factorisation, see :mod:`tensornet_llm.layers.layout`); the budget keeps, per
            module, whichever layout and chi predict the least damage.
        shrinkage: with calibration data, use ``(1 - s) C + s diag(C)`` for every input
            covariance ``C`` (budget and fit): directions the calibration text barely explores
            keep some weight, so the fit generalises beyond it (0: the raw covariance).
        ridge: with calibration data, add ``r * mean(diag C) * I`` to every input covariance
            ``C`` (budget and fit): every input direction counts at least ``r`` times the mean,
            which moves the fit from the calibration text's whitened optimum toward the plain
            truncated SVD (0: none; a very large ``r`` gives the plain SVD).
        match_dense: with calibration data, fit each layer to the *dense* model's outputs
            (its weight on the dense model's inputs), so that it also undoes what the layers
            compressed before it changed in its inputs; ``False`` fits it to its own weight on
            the inputs the compressed model gives it.
        gradients: with ``ratio`` and calibration data, weigh each module's output error by
            the loss gradient at its output (the Gauss-Newton estimate of the loss increase);
            ``False`` budgets by the relative output error alone, as streaming compression
            (:func:`~tensornet_llm.compress.stream.compactify_pretrained`) does, since loss
            gradients need the whole model at once.
        cross_layer: make the same-role modules of every ``cross_layer`` consecutive blocks one
            cross-layer network with shared bases (:mod:`tensornet_llm.compress.groups`;
            ``method`` and ``n_sites`` do not apply), an int or per-module mapping (``1``: a
            group of one, a low-rank layer); ``None`` (default): per-layer networks.
        cross_layer_side: which bases a group shares: ``"input"`` (Basis Sharing's
            ``W_l = C_l V``), ``"output"`` (``W_l = U C_l``), ``"both"`` (``W_l = U C_l V``) or
            ``"auto"`` (per group, whichever has the least output error at the same parameter
            count); a string or per-module mapping.
        sweeps: alternating sweeps of each cross-layer group's fit
            (:func:`~tensornet_llm.compress.sweeps.fit_group`).
        weigh_outputs: where the budget has loss gradients (``ratio``, calibration data,
            ``gradients``), fit each per-layer network to the quantity the budget ranks it by,
            the Gauss-Newton estimate of the loss increase: output feature ``o``'s error is
            weighted by ``E[g_o^2]``, the loss gradient's second moment at the module's output
            (``||D^(1/2) (W - W_hat) L||``; closed form for the low-rank layout). ``False``:
            every output feature counts alike (SVD-LLM's objective). With ``cross_layer`` this
            applies to the modules the budget compresses alone and to shared input bases
            (:func:`~tensornet_llm.compress.sweeps.fit_group`'s ``rows``); shared output bases
            are fitted to the unweighted output error.
        output_metric: how ``weigh_outputs`` weighs the output error: ``"diagonal"`` (each
            output feature by ``E[g_o^2]``) or ``"full"`` (the whole second moment
            ``E[g g^T]``, the Kronecker-factored (K-FAC) estimate
            ``||E[g g^T]^(1/2) (W - W_hat) L||``, which also counts how errors of different
            output features add up or cancel; it collects an ``(out, out)`` matrix per module).
            Cross-layer groups use the diagonal either way.
        interpolative: store every low-rank layer as kept rows and their combinations
            (:class:`~tensornet_llm.layers.interpolative.InterpolativeLinear`,
            ``W = P^T [I; Y] W[R]``): ``r (in + out - r)`` parameters at rank ``r`` instead of
            ``r (in + out)`` for the same weight, so the budget affords higher ranks at the same
            ``ratio``, and any rank below ``min(in, out)`` saves parameters. ``False``: two
            factors ``U, V`` (a 2-site MPO), which peft adapters merge into exactly. The same
            holds for a cross-layer group sharing its input basis alone: ``r`` rows of its
            stacked cores become the identity (``r^2`` fewer parameters per group;
            :func:`~tensornet_llm.layers.cross_layer.kept_rows_gauge`).
        min_saving: with ``ratio``, every module the budget compresses saves at least this
            fraction of its parameters (it is otherwise left dense). The default ``0`` lets the
            budget compress many modules a little, which costs least quality; a module kept at
            90% of its parameters runs as two thinner matmuls and decodes no faster than the
            dense layer, so for speed at batch 1 something like ``0.4`` concentrates the
            compression on fewer modules (see docs/speed.md).
        share_mlp_rows: give the kept-rows ``gate_proj`` and ``up_proj`` of every gated MLP one
            row order and run the MLP without gathering their outputs
            (:func:`~tensornet_llm.layers.gated_mlp.share_mlp_rows`; the same weights, faster
            prefill). ``False``: each layer keeps its own rows.
    """

    chi: PerModule | None = None
    ratio: float | None = None
    method: Union[Method, Mapping[str, Method]] = "mpo"
    n_sites: PerModule = 3
    targets: Targets = None
    exclude: list[str] = field(default_factory=list)
    tol: float | None = None
    min_features: int = 16
    fit_steps: int = 50
    low_rank: bool = True
    match_dense: bool = False
    shrinkage: float = 0.0
    ridge: float = 0.0
    gradients: bool = True
    cross_layer: PerModule | None = None
    cross_layer_side: Union[str, Mapping[str, str]] = "auto"
    sweeps: int = 2
    weigh_outputs: bool = True
    output_metric: str = "diagonal"
    interpolative: bool = True
    min_saving: float = 0.0
    share_mlp_rows: bool = True

    def validate(self) -> None:
        if self.ratio is not None:
            if self.chi is not None:
                raise ArgumentError("chi and ratio are exclusive: give one of them, not both")
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
                0 < self.ratio <= 1
            ):
                raise ArgumentError(f"ratio must be a float in (0, 1], got {self.ratio!r}")
        else:
            _check_setting(self.effective_chi, "chi", lambda v: _is_int(v) and v >= 1,
                           "an integer >= 1")
        _check_setting(self.n_sites, "n_sites", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check_setting(
            self.method, "method", lambda v: v in METHOD_NAMES, f"one of {list(METHOD_NAMES)}"
        )
        if self.tol is not None and not (isinstance(self.tol, (int, float)) and 0 <= self.tol < 1):
            raise ArgumentError(f"tol must be a float in [0, 1) or None, got {self.tol!r}")
        if not _is_int(self.min_features) or self.min_features < 1:
            raise ArgumentError(f"min_features must be an integer >= 1, got {self.min_features!r}")
        if not _is_int(self.fit_steps) or self.fit_steps < 0:
            raise ArgumentError(f"fit_steps must be an integer >= 0, got {self.fit_steps!r}")
        if not (_is_number(self.shrinkage) and 0 <= self.shrinkage <= 1):
            raise ArgumentError(f"shrinkage must be a number in [0, 1], got {self.shrinkage!r}")
        if not (_is_number(self.ridge) and 0 <= self.ridge < math.inf):
            raise ArgumentError(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        for flag in ("low_rank", "match_dense", "gradients", "weigh_outputs", "interpolative",
                     "share_mlp_rows"):
            if not isinstance(getattr(self, flag), bool):
                raise ArgumentError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if self.cross_layer is not None:
            _check_setting(self.cross_layer, "cross_layer", lambda v: _is_int(v) and v >= 1,
                           "an integer >= 1 (blocks per group)")
            if self.match_dense:
                raise ArgumentError("match_dense does not apply with cross_layer (a group spans "
                                    "several blocks and is fitted on the dense model's inputs)")
        _check_setting(self.cross_layer_side, "cross_layer_side",
                       lambda v: v in (*SIDES, "auto"), f"one of {[*SIDES, 'auto']}")
        if self.output_metric not in OUTPUT_METRICS:
            raise ArgumentError(f"output_metric must be one of {list(OUTPUT_METRICS)}, got "
                                f"{self.output_metric!r}")
        if not _is_int(self.sweeps) or self.sweeps < 0:
            raise ArgumentError(f"sweeps must be an integer >= 0, got {self.sweeps!r}")
        if not (_is_number(self.min_saving) and 0 <= self.min_saving < 1):
            raise ArgumentError(f"min_saving must be a number in [0, 1), got {self.min_saving!r}")
        if self.min_saving and self.ratio is None:
            raise ArgumentError("min_saving applies to the budget: give ratio as well")

    def regularize(self, cov: torch.Tensor) -> torch.Tensor:
        """The input covariance the budget and the fit use: ``cov`` with :attr:`shrinkage` and
        :attr:`ridge` applied (see :func:`shrunk`)."""
        return shrunk(cov, self.shrinkage, self.ridge)

    @property
    def max_keep(self) -> float:
        """The largest fraction of a module's parameters a network the budget offers keeps."""
        return 1.0 - self.min_saving

    @property
    def effective_chi(self) -> PerModule:
        return DEFAULT_CHI if self.chi is None else self.chi


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_setting(value, argument: str, ok, allowed: str) -> None:
    values = value.items() if isinstance(value, Mapping) else [(None, value)]
    if isinstance(value, Mapping) and not value:
        raise ArgumentError(f"{argument} mapping is empty")
    for pattern, v in values:
        if pattern is not None and pattern != DEFAULT_KEY:
            check_pattern(pattern, argument)
        if not ok(v):
            where = f" for pattern {pattern!r}" if pattern is not None else ""
            raise ArgumentError(f"{argument}{where} must be {allowed}, got {v!r}")


def relative_error(approx: torch.Tensor, exact: torch.Tensor, rows: int = 256) -> float:
    """``||approx - exact||_F / ||exact||_F`` in float64, ``rows`` rows at a time (no float64
    copy of a whole weight)."""
    diff = norm = 0.0
    for a, e in zip(approx.split(rows), exact.split(rows)):
        e64 = e.double()
        diff += float((a.double() - e64).pow(2).sum())
        norm += float(e64.pow(2).sum())
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-30)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(
    name: str, module: nn.Module, setting: tuple, cfg: CompactifyConfig, cov: torch.Tensor | None,
    cross: torch.Tensor | None = None, rows: torch.Tensor | None = None,
) -> tuple[TensorNetworkLinear, LayerReport]:
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
    for p in new.cores:
        p.requires_grad_(weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(bias.requires_grad)
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
def swaps_undone_on_error(done: list[tuple[nn.Module, str, nn.Module]], bar=None):
    """On any error inside, put back every original module ``done`` swapped out (newest
    first) and re-raise; the progress bar ``bar`` is closed either way."""
    try:
        yield
    except BaseException:
        for parent, child, original in reversed(done):
            setattr(parent, child, original)
        raise
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def _originals_in_place(done: list[tuple[nn.Module, str, nn.Module]]):
    """Temporarily put the original modules back where ``done`` swapped them out."""
    current = [(parent, child, getattr(parent, child)) for parent, child, _ in done]
    for parent, child, original in done:
        setattr(parent, child, original)
    try:
        yield
    finally:
        for parent, child, new in current:
            setattr(parent, child, new)


def _swap(model: nn.Module, name: str, new: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return parent, child, old


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
        config: a :class:`CompactifyConfig`; explicit keyword arguments override its fields.
        progress: show a progress bar while decomposing.

    Returns:
        A :class:`~tensornet_llm.compress.report.CompactifyReport`.

    Example:
        >>> report = compactify(model, chi={"re:.*mlp.*": 16, "_default": 48}, exclude=["layers.0."])
        >>> print(report)
    """
    cfg = _merged_config(config, chi=chi, ratio=ratio, method=method, n_sites=n_sites,
                         targets=targets, exclude=exclude, tol=tol, fit_steps=fit_steps,
                         low_rank=low_rank, cross_layer=cross_layer)
    start = time.perf_counter()
    batches = as_batches(calibration) if calibration is not None else None
    if batches is not None:
        check_token_ids(model, batches)
    if cfg.cross_layer is not None:
        from .groups import compactify_groups  # groups builds on this module

        return compactify_groups(model, cfg, batches, progress)
    plan = _plan(model, cfg, batches, progress=progress)
    params_before = _count(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.chosen), desc="compactify", unit="layer")
    built: dict[int, tuple[TensorNetworkLinear, LayerReport]] = {}
    done: list[tuple[nn.Module, str, nn.Module]] = []
    with swaps_undone_on_error(done, bar):
        if batches is None:
            _replace_all(model, plan, cfg, built, done, bar)
        else:
            _replace_block_by_block(model, plan, cfg, batches, built, done, bar)
    if cfg.share_mlp_rows:
        share_mlp_rows(model)
    return CompactifyReport(
        layers=[row for _, row in built.values()], skipped=plan.skipped,
        model_params_before=params_before, model_params_after=_count(model),
        seconds=time.perf_counter() - start, ratio=cfg.ratio,
        dense_target_params=plan.dense_target_params, estimate=plan.estimate, notes=plan.notes,
    )


def _merged_config(config: CompactifyConfig | None, **given: Any) -> CompactifyConfig:
    """``config`` (or the defaults) with the keyword arguments that were given, validated."""
    cfg = CompactifyConfig(**vars(config)) if config is not None else CompactifyConfig()
    for key, value in given.items():
        if value is not None:
            if key == "exclude":
                value = [value] if isinstance(value, str) else list(value)
            setattr(cfg, key, value)
    cfg.validate()
    return cfg


@dataclass
class _Plan:
    """What ``compactify`` replaces and how, decided before any module is touched.

    ``settings`` holds ``(layout, chi)`` per target name (``None``: left dense by the budget) in
    model order; ``chosen`` the targets that are replaced."""

    chosen: list[tuple[str, nn.Module]]
    skipped: list[tuple[str, str]]
    settings: dict[str, tuple[Layout, int] | None]
    dense_target_params: int = 0
    estimate: str | None = None
    notes: list[str] = field(default_factory=list)
    #: Output row weights per target name (:func:`~.fit.output_weights`), for the fit.
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


def _plan(model: nn.Module, cfg: CompactifyConfig, batches: list | None,
          budget: Callable | None = None, progress: bool = False) -> _Plan:
    """Targets, and every module's layout and chi (from the budget when ``cfg.ratio`` is set).
    Every per-module setting is resolved here, so a missing pattern fails before any work.
    ``budget(chosen, offered) -> (settings, estimate)`` replaces the in-memory budget pass
    (streaming compression builds the ladders block by block). ``progress``: a bar for each
    stage of the budget pass (statistics, loss gradients, pricing)."""
    chosen, skipped = find_targets(model, cfg.targets, cfg.exclude, cfg.min_features)
    if not chosen:
        raise ArgumentError(
            f"targets={cfg.targets!r} (exclude={cfg.exclude!r}) matched no nn.Linear or Conv1D "
            "module of the model"
        )
    skipped += [(name, f"fused MoE expert tensor {shape}, not tensorized")
                for name, shape in fused_expert_tensors(model)]
    if cfg.ratio is None:
        settings = {name: (_layout(module, resolve_override(cfg.method, name, "method"),
                                   resolve_override(cfg.n_sites, name, "n_sites"),
                                   cfg.interpolative),
                           resolve_override(cfg.effective_chi, name, "chi"))
                    for name, module in chosen}
        return _Plan(chosen, skipped, settings)
    offered = {name: offered_layouts(name, module, cfg) for name, module in chosen}
    notes: list[str] = []
    if budget is None:
        settings, estimate, rows = _budget_settings(model, chosen, offered, batches, notes, cfg,
                                                    progress)
    else:
        (settings, estimate), rows = budget(chosen, offered), {}
    left = {id(m): m for n, m in chosen if settings[n] is None}
    dense_target_params = sum(
        sum(p.numel() for p in linear_weight(m) if p is not None) for m in left.values()
    )
    skipped += [(n, f"left dense by the ratio={cfg.ratio} budget")
                for n, _ in chosen if settings[n] is None]
    chosen = [(n, m) for n, m in chosen if settings[n] is not None]
    return _Plan(chosen, skipped, settings, dense_target_params, estimate, notes, rows)


def shrunk(cov: torch.Tensor, shrinkage: float, ridge: float = 0.0) -> torch.Tensor:
    """``(1 - s) C + s diag(C) + r mean(diag C) I``: the covariance pulled toward its diagonal
    (``shrinkage`` s) and lifted by a ridge (``ridge`` r; see :class:`CompactifyConfig`)."""
    if shrinkage:
        cov = (1 - shrinkage) * cov + shrinkage * torch.diag_embed(cov.diagonal())
    if ridge:
        cov = cov + ridge * cov.diagonal().mean() * torch.eye(
            cov.shape[0], dtype=cov.dtype, device=cov.device)
    return cov


def offered_layouts(name: str, module: nn.Module, cfg: CompactifyConfig) -> list[Layout]:
    """The layouts the budget offers module ``name``: its ``method`` / ``n_sites`` layout, and
    the low-rank one too when ``cfg.low_rank``."""
    layout = _layout(module, resolve_override(cfg.method, name, "method"),
                     resolve_override(cfg.n_sites, name, "n_sites"), cfg.interpolative)
    out_f, in_f = linear_weight(module)[0].shape
    low_rank = Layout.low_rank(in_f, out_f, cfg.interpolative)
    return [layout] + ([low_rank] if cfg.low_rank and layout != low_rank else [])


def _layout(module: nn.Module, method: str, n_sites: int, rows: bool = True) -> Layout:
    if method == "low-rank":
        out_f, in_f = linear_weight(module)[0].shape
        return Layout.low_rank(in_f, out_f, rows)
    return Layout(METHODS[method], n_sites)


def _replace_all(
    model: nn.Module, plan: _Plan, cfg: CompactifyConfig,
    built: dict[int, tuple[TensorNetworkLinear, LayerReport]],
    done: list[tuple[nn.Module, str, nn.Module]], bar,
) -> None:
    """Without calibration: decompose every module, then swap them all in."""
    for name, module in plan.chosen:
        if id(module) not in built:  # the same module under two names is built once
            built[id(module)] = _build(name, module, plan.settings[name], cfg, None)
        if bar is not None:
            bar.update()
    for name, module in plan.chosen:
        done.append(_swap(model, name, built[id(module)][0]))


def _replace_block_by_block(
    model: nn.Module, plan: _Plan, cfg: CompactifyConfig, batches: list,
    built: dict[int, tuple[TensorNetworkLinear, LayerReport]],
    done: list[tuple[nn.Module, str, nn.Module]], bar,
) -> None:
    """With calibration: in forward order of the blocks, collect the inputs of a block's
    targets (as the already-compressed earlier blocks produce them), fit, swap them in."""
    modules = dict(plan.chosen)
    # Finished blocks replay their outputs (the paired pass needs the originals rerun).
    replay = None if cfg.match_dense else BlockReplay()
    # Blocks left wholly dense still take part in the order (so they are replayed).
    for block, names in calibrated_order(model, list(plan.settings)):
        names = [n for n in names if n in modules]
        fresh = {n: modules[n] for n in names if id(modules[n]) not in built}
        covs: dict[str, torch.Tensor] = {}
        cross: dict[str, torch.Tensor] = {}
        if cfg.match_dense and done and fresh:
            covs, cross = collect_paired_covariances(
                model, batches, fresh, block, lambda: _originals_in_place(done)
            )
        elif fresh:
            collector = collect_covariances(model, batches, fresh, block, replay)
            covs = {n: cfg.regularize(collector.take(n)) for n in fresh}
        for name in names:
            module = modules[name]
            if id(module) not in built:
                built[id(module)] = _build(
                    name, module, plan.settings[name], cfg, covs[name], cross.get(name),
                    plan.rows.get(name))
            done.append(_swap(model, name, built[id(module)][0]))
            if bar is not None:
                bar.update()
        if replay is not None and block is not None:
            replay.finish(block)


def _budget_settings(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], offered: dict[str, list[Layout]],
    batches: list | None, notes: list[str], cfg: CompactifyConfig, progress: bool = False,
) -> tuple[dict[str, tuple[Layout, int] | None], str, dict[str, torch.Tensor]]:
    """``(layout, chi)`` per target name (``None``: stays dense) under the parameter budget, how
    damage was estimated, and the output row weights per target name the fit then uses (empty
    unless ``cfg.weigh_outputs`` and loss gradients). A weaker estimate than the data allows is
    warned and noted."""
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
    with stage("budget: pricing layouts", len(modules), "module", progress) as tick:
        allocation = allocate(modules, cfg.ratio, {n: offered[n] for n in modules}, covs, grads,
                              weigh_outputs=weigh, max_keep=cfg.max_keep, tick=tick)
    if weigh:
        notes.append("each network fitted to the Gauss-Newton loss estimate (output features "
                     "weighted by the loss gradient's second moment"
                     + (", the whole matrix: K-FAC)" if cfg.output_metric == "full" else ")"))
    settings = {
        name: None if allocation.chi[key] is None else (allocation.layout[key], allocation.chi[key])
        for name, module in chosen
        for key in [unique[id(module)]]
    }
    rows = {name: output_weights(grads[unique[id(module)]]) for name, module in chosen
            if weigh and settings[name] is not None}  # only what the fit will use
    return settings, allocation.estimate, rows
