"""Weight-only int8 / int4 quantization of a whole model: tensor-network cores, the linears
left dense and the embeddings.

CompactifAI's size figures come from two steps: tensorize, then quantize what remains.
:func:`quantize` does the second step, replacing modules by the quantized layers of
:mod:`tensornet_llm.layers.quantized`, so the model runs (and saves) anywhere.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..errors import ArgumentError
from ..compress.targets import check_pattern, matches
from ..layers.base import TensorNetworkLinear, is_linear_like, linear_weight
from ..layers.cross_layer import CrossLayerLinear, plain_members
from ..layers.low_rank import FactoredLinear, KeptRowsLinear, LowRankLinear, balanced_factors
from ..layers.quantized import (
    INT4_GROUP_SIZE, QuantizedCrossLayerLinear, QuantizedEmbedding, QuantizedLinear, QuantizedModule,
    QuantizedTensorNetworkLinear, QuantizedWeight, round_tensor,
)
from ..saving import attach

__all__ = ["QuantizeConfig", "QuantizeReport", "as_quantize_config", "low_rank_as_factors",
           "quantize", "rounded_weights", "rounding_plan"]


@dataclass
class QuantizeConfig:
    """What :func:`quantize` converts, and how.

    Attributes:
        bits: 8 or 4.
        group_size: entries per scale; ``None`` means one scale per channel for int8 and
            groups of 64 for int4. Must be even.
        cores: quantize the cores of tensor-network layers.
        dense: quantize linear layers that are not tensor networks (the LM head, excluded or
            untargeted modules; for an uncompressed model, every linear).
        embeddings: quantize ``nn.Embedding`` tables.
        exclude: name patterns (as in :func:`tensornet_llm.compactify`) left in float.
    """

    bits: int = 8
    group_size: int | None = None
    cores: bool = True
    dense: bool = True
    embeddings: bool = True
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (8, 4):
            raise ArgumentError(f"bits must be 8 or 4, got {self.bits!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2):
            raise ArgumentError(f"group_size must be None or an even integer >= 2, got {g!r}")
        for flag in ("cores", "dense", "embeddings"):
            if not isinstance(getattr(self, flag), bool):
                raise ArgumentError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(check_pattern(p, "exclude") for p in self.exclude)

    @property
    def effective_group_size(self) -> int | None:
        return self.group_size if self.group_size or self.bits == 8 else INT4_GROUP_SIZE


@dataclass
class QuantizeReport:
    """Bytes of every converted module's weights before and after."""

    bits: int
    group_size: int | None
    rows: list[tuple[str, str, int, int]] = field(default_factory=list)  # name, kind, before, after

    @property
    def bytes_before(self) -> int:
        return sum(r[2] for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r[3] for r in self.rows)

    def summary(self) -> str:
        kinds: dict[str, list[int]] = {}
        for _, kind, before, after in self.rows:
            k = kinds.setdefault(kind, [0, 0, 0])
            k[0] += 1
            k[1] += before
            k[2] += after
        group = "per channel" if self.group_size is None else f"groups of {self.group_size}"
        lines = [f"int{self.bits} ({group}): {len(self.rows)} modules, "
                 f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"]
        lines += [f"  {kind:<15} {n:>4} modules  {b / 2**20:8.2f} MiB -> {a / 2**20:7.2f} MiB"
                  for kind, (n, b, a) in kinds.items()]
        return "\n".join(lines)


def _float_bytes(module: nn.Module, counted: set[int]) -> int:
    """Bytes of ``module``'s float weights (not the biases, the 1-D parameters) not yet in
    ``counted``, which it joins (the bases a cross-layer group shares count on its first
    member)."""
    total = 0
    for p in module.parameters(recurse=True):
        if p.dim() > 1 and id(p) not in counted:
            counted.add(id(p))
            total += p.numel() * p.element_size()
    return total


def as_quantize_config(bits: "int | QuantizeConfig | None" = None, *,
                       config: QuantizeConfig | None = None, **given: Any) -> QuantizeConfig:
    """A validated copy of ``config`` (or the defaults) with ``bits`` and every other
    non-``None`` keyword of ``given`` set; ``bits`` may itself be a :class:`QuantizeConfig`."""
    if isinstance(bits, QuantizeConfig):
        config, bits = bits, None
    cfg = QuantizeConfig(**{f.name: getattr(config, f.name) for f in fields(QuantizeConfig)}
                         ) if config is not None else QuantizeConfig()
    exclude = given.get("exclude")
    if exclude is not None and not isinstance(exclude, str):
        given["exclude"] = tuple(exclude)
    for key, value in {"bits": bits, **given}.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate()
    return cfg


def _selected(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module :func:`quantize` replaces, in model order."""
    plan: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(matches(name, p) for p in cfg.exclude) or isinstance(module, QuantizedModule):
            continue
        if isinstance(module, FactoredLinear) and any(
                isinstance(c, QuantizedModule) for c in module.children()):
            continue  # quantized already
        if isinstance(module, (TensorNetworkLinear, CrossLayerLinear, FactoredLinear)):
            if cfg.cores:
                plan.append((name, module))
        elif isinstance(module, nn.Embedding):
            if cfg.embeddings:
                plan.append((name, module))
        elif is_linear_like(module) and cfg.dense:
            plan.append((name, module))
    inside_network = {n for n, m in plan
                      if isinstance(m, (TensorNetworkLinear, CrossLayerLinear, FactoredLinear))}
    return [(n, m) for n, m in plan if not any(n.startswith(p + ".") for p in inside_network)]


def rounding_plan(model: nn.Module, bits: "int | QuantizeConfig | None" = None,
                  **options: Any) -> list[tuple[nn.Parameter, int]]:
    """``(parameter, channel_dim)`` of every float tensor :func:`quantize` (same arguments)
    would round, each once (a tied table, a group's shared basis), with the leg it would give
    its own scales: exactly the tensors and groupings of the quantized layers it builds."""
    cfg = as_quantize_config(bits, **options)
    plan: dict[int, tuple[nn.Parameter, int]] = {}
    for name, module in _selected(model, cfg):
        if isinstance(module, KeptRowsLinear):
            raise ArgumentError(
                f"{name} is a low-rank layer stored as kept rows, which quantize() rounds as two "
                "balanced factors, a form its own parameters cannot take; call "
                "low_rank_as_factors(model) first (the same weights as two factors)")
        if isinstance(module, CrossLayerLinear) and module.kept is not None:
            raise ArgumentError(
                f"{name} is a cross-layer member stored as kept rows, which quantize() rounds "
                "with an orthonormal shared basis, a form its own parameters cannot take; call "
                "low_rank_as_factors(model) first (the same maps in that form)")
        if isinstance(module, TensorNetworkLinear):
            tensors = [(c, QuantizedTensorNetworkLinear._channel_dim(tuple(c.shape)))
                       for c in module.cores]
        elif isinstance(module, LowRankLinear):
            tensors = [(module.first.weight, 0), (module.second.weight, 0)]
        elif isinstance(module, CrossLayerLinear):
            tensors = [(t, 0) for t in (module.shared.in_basis, module.shared.out_basis,
                                        module.core) if t is not None]
        elif isinstance(module, nn.Embedding):
            tensors = [(module.weight, 0)]
        else:  # quantized as (out, in): a Conv1D stores (in, out), so its channels are leg 1
            tensors = [(module.weight, 0 if linear_weight(module)[0] is module.weight else 1)]
        for t, channel_dim in tensors:
            plan.setdefault(id(t), (t, channel_dim))
    return list(plan.values())


@contextmanager
def rounded_weights(model: nn.Module, bits: "int | QuantizeConfig | None" = None,
                    **options: Any) -> Iterator[None]:
    """Within the block, every weight that :func:`quantize` (same arguments) would round holds
    its rounded value, so ``model`` computes what the quantized model will; the float values
    come back on exit. Gradients computed inside are taken at the rounded weights and, applied
    to the float ones after the block, make the straight-through estimate of
    quantization-aware training (``heal(..., quantize=4)``)."""
    cfg = as_quantize_config(bits, **options)
    group = cfg.effective_group_size
    saved = []
    try:
        with torch.no_grad():
            for p, channel_dim in rounding_plan(model, cfg):
                saved.append((p, p.detach().clone()))
                p.copy_(round_tensor(p, cfg.bits, group, channel_dim))
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def _plain_groups(modules: Iterable[nn.Module]) -> dict[int, CrossLayerLinear]:
    """``id`` of every cross-layer member stored with kept rows among ``modules`` -> the same
    member without them (:func:`~tensornet_llm.layers.cross_layer.plain_members`; the members
    of one group get one new shared basis)."""
    groups: dict[int, dict[int, CrossLayerLinear]] = {}
    for module in modules:
        if isinstance(module, CrossLayerLinear):
            groups.setdefault(id(module.shared), {})[id(module)] = module
    plain: dict[int, CrossLayerLinear] = {}
    for members in groups.values():  # every selected member of a group changes gauge together
        if any(m.kept is not None for m in members.values()):
            plain.update(zip(members, plain_members(list(members.values()))))
    return plain


def low_rank_as_factors(model: nn.Module) -> int:
    """Replace every low-rank layer stored as kept rows
    (:class:`~tensornet_llm.layers.low_rank.KeptRowsLinear`) by the same weight as two
    balanced factors (:func:`~tensornet_llm.layers.low_rank.balanced_factors`,
    ``r^2`` more parameters each), and every cross-layer group stored as kept rows by the same
    maps with an orthonormal shared basis
    (:func:`~tensornet_llm.layers.cross_layer.plain_members`, ``in_rank^2`` more parameters per
    group): the forms :func:`quantize` rounds, so quantization-aware healing can train them.
    Returns how many modules were replaced."""
    modules = list(model.named_modules())
    plain = _plain_groups([m for _, m in modules])
    found = [(name, m) for name, m in modules
             if isinstance(m, KeptRowsLinear) or id(m) in plain]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = plain[id(module)] if id(module) in plain else balanced_factors(module)
        setattr(parent, child, new)
    return len(found)


def quantize(
    model: nn.Module,
    bits: int | None = None,
    *,
    group_size: int | None = None,
    cores: bool | None = None,
    dense: bool | None = None,
    embeddings: bool | None = None,
    exclude: Iterable[str] | None = None,
    config: QuantizeConfig | None = None,
) -> QuantizeReport:
    """Quantize ``model``'s weights in place (tensor-network cores, dense linears, embeddings).

    Arguments default to :class:`QuantizeConfig`'s fields (``config`` supplies others; explicit
    keywords win). Everything is validated before any module is replaced. A tied input
    embedding and LM head stay tied: both read one quantized table. Quantize after compactify
    and after healing; the quantized weights are buffers, not trainable parameters.

    Returns:
        A :class:`QuantizeReport` with the bytes of each converted module before and after.
    """
    cfg = as_quantize_config(bits, config=config, group_size=group_size, cores=cores,
                             dense=dense, embeddings=embeddings, exclude=exclude)
    group = cfg.effective_group_size
    plan = _selected(model, cfg)

    # Build every replacement first (nothing in the model changes if this fails).
    by_weight: dict[int, QuantizedWeight] = {}
    replacements: list[tuple[str, nn.Module, nn.Module]] = []
    plain = _plain_groups([m for _, m in plan])  # kept rows: rounded in the orthonormal gauge
    for name, module in plan:
        if isinstance(module, FactoredLinear):  # kept rows: rounded as balanced factors
            new = (balanced_factors(module) if isinstance(module, KeptRowsLinear)
                   else copy.deepcopy(module))
            new.first = QuantizedLinear.from_module(new.first, cfg.bits, group)
            new.second = QuantizedLinear.from_module(new.second, cfg.bits, group)
        elif isinstance(module, TensorNetworkLinear):
            new = QuantizedTensorNetworkLinear.from_module(module, cfg.bits, group)
        elif isinstance(module, CrossLayerLinear):  # a group's bases are quantized once
            new = QuantizedCrossLayerLinear.from_module(plain.get(id(module), module), cfg.bits,
                                                        group, by_weight)
        elif isinstance(module, nn.Embedding):
            shared = by_weight.get(id(module.weight))
            new = QuantizedEmbedding(shared, module.padding_idx) if shared else \
                QuantizedEmbedding.from_module(module, cfg.bits, group)
            by_weight.setdefault(id(module.weight), new.qweight)
        else:
            shared = by_weight.get(id(getattr(module, "weight", None)))
            new = QuantizedLinear.from_module(module, cfg.bits, group, shared)
            by_weight.setdefault(id(module.weight), new.qweight)
        replacements.append((name, module, new))

    report = QuantizeReport(cfg.bits, group)
    counted: set[int] = set()
    for name, module, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        weights = [q for q in new.modules() if isinstance(q, QuantizedWeight)]
        after = sum(q.nbytes for q in weights if id(q) not in counted)
        before = _float_bytes(module, counted) if after else 0  # a tied table counts once
        counted.update(id(q) for q in weights)
        report.rows.append((name, getattr(new, "kind", "low-rank"), before, after))
    attach(model)  # so that model.save_pretrained writes what from_pretrained loads
    return report
