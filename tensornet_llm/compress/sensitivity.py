"""Layer sensitivity (CompactifAI): how much the loss rises when one module is compressed.

For every targeted module and every keep fraction, the module alone is replaced by a tensor
network keeping that fraction of its parameters (TT-SVD / hierarchical SVD, no fitting), the
mean token loss on the calibration batches is measured, and the module is put back. The
result is one row per (module, keep) with the measured loss increase and, next to it, the
Gauss-Newton *prediction* of that increase from one gradient pass (what ``ratio=`` budgets
use), so the cheap estimate can be checked against the expensive measurement.

Profiles are cached on disk (keyed by the model's weights, the calibration tokens and the
settings), so asking again costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers.base import linear_weight
from .budget import damage, chi_for_params
from .calibrate import (
    as_batches, check_token_ids, collect_covariances, collect_output_gradients, model_inputs,
)
from ..layers.layout import METHODS
from .fit import stable_cholesky
from .targets import Targets, block_prefix, block_stacks, find_targets

__all__ = [
    "SensitivityRow", "SensitivityProfile", "profile_sensitivity", "calibration_loss",
    "module_position", "rank_correlation",
]


@dataclass
class SensitivityRow:
    """One module compressed alone at one keep fraction."""

    name: str
    block: str | None  # e.g. "model.layers.3"; None outside the repeated blocks
    module_type: str  # the name inside its block, e.g. "self_attn.q_proj"
    keep: float  # requested fraction of the module's parameters
    chi: int
    params_before: int
    params_after: int
    loss: float  # mean token loss with this module compressed
    delta_loss: float  # loss - dense loss
    predicted_delta: float | None  # Gauss-Newton estimate of delta_loss (None without a loss)


@dataclass
class SensitivityProfile:
    """All rows plus the dense model's calibration loss."""

    base_loss: float
    method: str
    n_sites: int
    tokens: int
    rows: list[SensitivityRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"base_loss": self.base_loss, "method": self.method, "n_sites": self.n_sites,
                "tokens": self.tokens, "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SensitivityProfile":
        rows = [SensitivityRow(**r) for r in data["rows"]]
        return cls(data["base_loss"], data["method"], data["n_sites"], data["tokens"], rows)

    def table(self) -> str:
        """The rows as a plain-text table, most sensitive first."""
        rows = sorted(self.rows, key=lambda r: -r.delta_loss)
        lines = [f"dense loss {self.base_loss:.4f} on {self.tokens} tokens ({self.method}, "
                 f"{self.n_sites} sites)",
                 f"{'module':<44} {'keep':>5} {'chi':>4} {'delta loss':>11} {'predicted':>10}"]
        for r in rows:
            pred = f"{r.predicted_delta:10.4g}" if r.predicted_delta is not None else f"{'-':>10}"
            lines.append(f"{r.name:<44} {r.keep:>5.2f} {r.chi:>4} {r.delta_loss:>11.4g} {pred}")
        return "\n".join(lines)


def module_position(model: nn.Module, name: str) -> tuple[str | None, str]:
    """``(block, module type)`` of a qualified module name, e.g.
    ``("model.layers.3", "self_attn.q_proj")``."""
    block = block_prefix(name, block_stacks(model))
    return block, name[len(block) + 1 :] if block else name


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Mean token loss of ``model`` on ``batches`` (the model's own loss with ``labels`` =
    the input ids, weighted by tokens)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            inputs = model_inputs(model, batch, device)
            out = model(**inputs, labels=inputs["input_ids"])
            if getattr(out, "loss", None) is None:
                raise ArgumentError("the model returns no loss for labels=input_ids; sensitivity "
                                 "profiling needs a language-modelling head")
            n = inputs["input_ids"].numel()
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count


def _fingerprint(model: nn.Module, batches: list[dict[str, Tensor]], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for batch in batches:
        h.update(batch["input_ids"].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _cache_path(cache_dir: str | os.PathLike | None | bool) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        from ..helpers.models import default_cache_dir

        return default_cache_dir() / "profiles"
    return Path(cache_dir)


def profile_sensitivity(
    model: nn.Module,
    calibration: Iterable[Any],
    keep: Sequence[float] = (0.5,),
    *,
    method: str = "mpo",
    n_sites: int = 3,
    targets: Targets = None,
    exclude: Iterable[str] | None = None,
    predict: bool = True,
    cache_dir: str | os.PathLike | bool | None = None,
    progress: bool = True,
) -> SensitivityProfile:
    """Measure the calibration-loss increase of compressing each targeted module alone.

    Args:
        model: a model that returns ``.loss`` given ``labels`` (causal or masked LM, seq2seq).
        calibration: token-id tensors ``(batch, seq)`` or dicts of inputs (as for compactify).
        keep: fractions of each module's parameters to keep, each in (0, 1).
        method: ``"mpo"`` or ``"ttns"``; n_sites: sites per network.
        targets, exclude: which modules, as for :func:`~tensornet_llm.compactify`.
        predict: also compute the Gauss-Newton prediction of each row (one gradient pass).
        cache_dir: where profiles are cached (default ``~/.cache/tensornet_llm/profiles``);
            ``False`` disables the cache.

    Returns:
        A :class:`SensitivityProfile` with one row per (module, keep), modules in forward order.
        The model is left exactly as it was.
    """
    if method not in METHODS:
        raise ArgumentError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ArgumentError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    keep = tuple(keep)
    if not keep or any(isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < 1
                       for k in keep):
        raise ArgumentError(f"keep must be fractions in (0, 1), got {keep!r}")
    batches = as_batches(calibration)
    check_token_ids(model, batches)
    chosen, _ = find_targets(model, targets, exclude)
    if not chosen:
        raise ArgumentError(f"targets={targets!r} matched no linear module of the model")
    unique: dict[int, tuple[str, nn.Module]] = {}
    for name, module in chosen:
        unique.setdefault(id(module), (name, module))
    modules = dict(unique.values())
    cls = METHODS[method]
    settings = {"keep": keep, "method": method, "n_sites": n_sites, "predict": predict,
                "modules": sorted(modules), "version": 1}
    cache = _cache_path(cache_dir)
    key = _fingerprint(model, batches, settings) if cache is not None else None
    if cache is not None and (cache / f"{key}.json").is_file():
        return SensitivityProfile.from_dict(json.loads((cache / f"{key}.json").read_text()))

    base = calibration_loss(model, batches)
    covs = grads = None
    if predict:
        grads = collect_output_gradients(model, batches, modules)
        if grads is not None:
            covs = collect_covariances(model, batches, modules)
    tokens = sum(b["input_ids"].numel() for b in batches)
    profile = SensitivityProfile(base, method, n_sites, tokens)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(modules) * len(keep), desc="sensitivity", unit="run")
    try:
        for name, module in modules.items():
            weight, bias = linear_weight(module)
            out_f, in_f = weight.shape
            dense = weight.numel() + (bias.numel() if bias is not None else 0)
            block, kind = module_position(model, name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            for k in keep:
                biases = dense - weight.numel()
                chi = chi_for_params(cls, in_f, out_f, n_sites, max(int(k * dense) - biases, 1))
                layer = cls.from_linear(module, chi=chi, n_sites=n_sites)
                setattr(parent, child, layer)
                try:
                    loss = calibration_loss(model, batches)
                finally:
                    setattr(parent, child, module)
                predicted = None
                if covs is not None and grads is not None:
                    w = weight.detach().to(torch.float64)
                    factor = stable_cholesky(covs.covariance(name).to(torch.float64))
                    error = (w - layer.to_dense().detach().double()) @ factor  # E L
                    predicted = damage(error.pow(2).sum(1), 0.0, grads[name])  # needs no reference
                profile.rows.append(SensitivityRow(
                    name=name, block=block, module_type=kind, keep=float(k), chi=chi,
                    params_before=dense, params_after=layer.num_parameters, loss=loss,
                    delta_loss=loss - base, predicted_delta=predicted,
                ))
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(profile.to_dict()))
        os.replace(tmp, cache / f"{key}.json")
    return profile


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (average ranks for ties)."""
    if len(x) != len(y) or len(x) < 2:
        raise ArgumentError(f"x and y must have the same length >= 2, got {len(x)} and {len(y)}")

    def ranks(v: Sequence[float]) -> Tensor:
        t = torch.tensor(list(v), dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for value in torch.unique(t):  # ties share their mean rank
            tied = t == value
            r[tied] = r[tied].mean()
        return r

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0
