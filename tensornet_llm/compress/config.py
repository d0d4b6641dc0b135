"""The settings of :func:`~.compactify.compactify`: :class:`CompactifyConfig`, validated in one
place before any work, and shared by the per-layer, cross-layer and streaming paths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

import torch

from ..errors import ArgumentError
from ..layers.cross_layer import SIDES
from ..layers.layout import METHODS
from .targets import DEFAULT_KEY, Targets, check_pattern

__all__ = ["CompactifyConfig", "merged_config", "shrunk", "METHOD_NAMES", "OUTPUT_METRICS",
           "DEFAULT_CHI", "Method", "PerModule"]

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
            (:class:`~tensornet_llm.layers.low_rank.KeptRowsLinear`,
            ``W = P^T [I; Y] W[R]``): ``r (in + out - r)`` parameters at rank ``r`` instead of
            ``r (in + out)`` for the same weight, so the budget affords higher ranks at the same
            ``ratio``, and any rank below ``min(in, out)`` saves parameters. ``False``: two
            factors ``U, V`` (:class:`~tensornet_llm.layers.low_rank.LowRankLinear`). The same
            holds for a cross-layer group sharing its input basis alone: ``r`` rows of its
            stacked cores become the identity (``r^2`` fewer parameters per group;
            :func:`~tensornet_llm.layers.cross_layer.kept_rows_gauge`).
        min_saving: with ``ratio``, every module the budget compresses saves at least this
            fraction of its parameters (it is otherwise left dense). The default ``0`` lets the
            budget compress many modules a little, which costs least quality; a module kept at
            90% of its parameters runs as two thinner matmuls and decodes no faster than the
            dense layer, so for speed at batch 1 something like ``0.4`` concentrates the
            compression on fewer modules (see docs/speed.md).
        call_cost: with ``ratio``, price each choice the budget weighs by its parameters plus
            this many per operation its forward makes that takes a fixed time whatever its size
            (:attr:`~tensornet_llm.layers.layout.Layout.calls`: a dense linear 1, a low-rank
            layer 2, a slim MLP or attention the dense count): that time in parameters' worth
            of weight reading. Decoding at batch 1 is largely such time on a CPU, so a positive
            value makes the budget prefer the layouts that decode faster (low rank only where
            it saves more than ``call_cost`` parameters) at the same ``ratio``, at some
            quality. :func:`~tensornet_llm.helpers.speed.call_cost` measures it for a machine
            and dtype. ``0``: parameters alone (the least damage).
        share_mlp_rows: give the kept-rows ``gate_proj`` and ``up_proj`` of every gated MLP one
            row order and ``down_proj`` the matching input order, so the MLP runs without
            gathers (:func:`~tensornet_llm.layers.gated_mlp.share_mlp_rows`; the same function,
            faster prefill). ``False``: each layer keeps its own rows.
        slim_mlp: with ``ratio`` and calibration data, also offer every gated MLP whose three
            projections are targets the slim layout (:mod:`~tensornet_llm.compress.slim`): a
            dense MLP of fewer neurons, plain ``nn.Linear`` of smaller shape, with ``down_proj``
            refitted by least squares; the budget prices it against the projections' own
            layouts by the same damage per parameter. ``False``: per-projection layouts only.
            Cross-layer groups and streaming compression price modules alone and offer none.
        slim_attention: likewise offer every attention whose ``q_proj`` and ``o_proj`` are
            targets fewer heads (:mod:`~tensornet_llm.compress.heads`): fewer query heads, an
            equal number per key/value group (rows of ``q_proj``, ``o_proj`` refitted; the KV
            cache keeps its shape), and where ``k_proj`` and ``v_proj`` are targets too, whole
            key/value heads with their query heads (rows of ``k_proj`` and ``v_proj`` too; the
            KV cache shrinks alike). ``False``: none.
        lm_head: also target the model's output embedding (``get_output_embeddings()``, the
            LM head), which the default targets leave dense. With ``ratio`` its damage is the
            loss increase under the model's own next-token distribution (the softmax's Fisher
            at the logits, see :func:`~tensornet_llm.compress.calibrate.output_gradients`). A
            head tied to the input embedding is not priced by the budget: the embedding keeps
            the table, so any factored head adds parameters; with ``chi`` it is factored as
            asked and untied (``config.tie_word_embeddings`` set to ``False``), which reads
            fewer bytes per decoded token and grows the model.
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
    call_cost: float = 0.0
    share_mlp_rows: bool = True
    slim_mlp: bool = True
    slim_attention: bool = True
    lm_head: bool = False

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
                     "share_mlp_rows", "slim_mlp", "slim_attention", "lm_head"):
            if not isinstance(getattr(self, flag), bool):
                raise ArgumentError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if self.cross_layer is not None:
            _check_setting(self.cross_layer, "cross_layer", lambda v: _is_int(v) and v >= 1,
                           "an integer >= 1 (blocks per group)")
            if self.lm_head:
                raise ArgumentError("lm_head does not apply with cross_layer (groups are made "
                                    "of the blocks' modules); compress the head without it")
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
        if not (_is_number(self.call_cost) and 0 <= self.call_cost < math.inf):
            raise ArgumentError(f"call_cost must be a finite number >= 0, got {self.call_cost!r}")
        if self.call_cost and self.ratio is None:
            raise ArgumentError("call_cost applies to the budget: give ratio as well")
        if self.call_cost and self.cross_layer is not None:
            raise ArgumentError("call_cost does not apply with cross_layer (a group's members "
                                "are priced together); give one of them")

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


def merged_config(config: CompactifyConfig | None, **given: Any) -> CompactifyConfig:
    """``config`` (or the defaults) with the keyword arguments that were given, validated."""
    cfg = CompactifyConfig(**vars(config)) if config is not None else CompactifyConfig()
    for key, value in given.items():
        if value is not None:
            if key == "exclude":
                value = [value] if isinstance(value, str) else list(value)
            setattr(cfg, key, value)
    cfg.validate()
    return cfg


def shrunk(cov: torch.Tensor, shrinkage: float, ridge: float = 0.0) -> torch.Tensor:
    """``(1 - s) C + s diag(C) + r mean(diag C) I``: the covariance pulled toward its diagonal
    (``shrinkage`` s) and lifted by a ridge (``ridge`` r; see :class:`CompactifyConfig`)."""
    if shrinkage:
        cov = (1 - shrinkage) * cov + shrinkage * torch.diag_embed(cov.diagonal())
    if ridge:
        cov = cov + ridge * cov.diagonal().mean() * torch.eye(
            cov.shape[0], dtype=cov.dtype, device=cov.device)
    return cov
