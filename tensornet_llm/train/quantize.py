"""Weight-only int8 / int4 quantization of a whole model: the linears (the factors of low-rank
and kept-rows layers included), the embeddings and the cores of tensor-network layers.

CompactifAI's size figures come from two steps: tensorize, then quantize what remains.
:func:`quantize` does the second step:

* **int8** goes through torchao (``quantize_`` with ``Int8WeightOnlyConfig``) for every
  ``nn.Linear`` and ``nn.Embedding``: the weight becomes torchao's ``Int8Tensor`` (one scale per
  output row, or per group), the module stays what it was, and torch.compile, saving
  (:func:`~tensornet_llm.save_compactified`, ``save_pretrained``) and loading handle it as
  torchao's own models. A tied table stays one tensor.
* The cores of MPO / TTNS layers are not ``nn.Linear`` weights but operands of a contraction,
  which torchao's tensors do not support (an ``Int8Tensor`` in ``einsum``: "Int8Tensor
  dispatch: attempting to run unimplemented operator/function: aten.unsqueeze"), and GPT-2's
  ``Conv1D`` computes ``addmm`` with an ``(in, out)`` weight (unimplemented too); int4 has no
  torchao kernel on a CPU
  (``Int4WeightOnlyConfig``: "Unsupported int4 packing format: opaque", and
  ``IntxWeightOnlyConfig(torch.int4)`` stores one byte per weight). Those are quantized by the
  layers of :mod:`tensornet_llm.layers.quantized`, written here for that reason.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..helpers.evaluate import stored_tensors
from ..compress.targets import check_pattern, matches
from ..layers.base import TensorNetworkLinear, is_linear_like, linear_weight
from ..layers.cross_layer import CrossLayerLinear, plain_members
from ..layers.low_rank import FactoredLinear, KeptRowsLinear, balanced_factors
from ..layers.quantized import (
    INT4_GROUP_SIZE, QuantizedEmbedding, QuantizedLinear, QuantizedTensorNetworkLinear,
    QuantizedWeight, round_tensor,
)
from ..saving import attach
from ..saving.tensors import int8_config, is_torchao_tensor

__all__ = ["QuantizeConfig", "QuantizeReport", "as_quantize_config", "low_rank_as_factors",
           "quantize", "rounded_weights", "rounding_plan"]


@dataclass
class QuantizeConfig:
    """What :func:`quantize` converts, and how.

    Attributes:
        bits: 8 or 4.
        group_size: entries per scale; ``None`` means one scale per channel for int8 and
            groups of 64 for int4. Must be even (and, for int8, divide every row torchao
            quantizes).
        cores: quantize the compressed layers (tensor-network cores, low-rank factors,
            cross-layer bases and cores).
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


def _weight_bytes(module: nn.Module, counted: set[int]) -> int:
    """Bytes of ``module``'s weights not yet in ``counted``, which they join (a tied table, or
    the bases a cross-layer group shares, count on their first module): its float matrices
    (not the biases), torchao's parts of a quantized one, the library's codes and scales."""
    tensors = [t for p in module.parameters() if p.dim() > 1 for t in stored_tensors(p)] + [
        t for q in module.modules() if isinstance(q, QuantizedWeight) for t in (q.codes, q.scale)]
    fresh = {id(t): t for t in tensors if id(t) not in counted}
    counted.update(fresh)
    return sum(t.numel() * t.element_size() for t in fresh.values())


def as_quantize_config(bits: "int | QuantizeConfig | None" = None, *,
                       config: QuantizeConfig | None = None, **given: Any) -> QuantizeConfig:
    """A validated copy of ``config`` (or the defaults) with ``bits`` and every other
    non-``None`` keyword of ``given`` set; ``bits`` may itself be a :class:`QuantizeConfig`."""
    if isinstance(bits, QuantizeConfig):
        config, bits = bits, None
    given = {k: v for k, v in {"bits": bits, **given}.items() if v is not None}
    cfg = replace(config or QuantizeConfig(), **given)  # validate() makes exclude a tuple
    cfg.validate()
    return cfg


def _excluded(name: str, cfg: QuantizeConfig) -> bool:
    return any(matches(name, p) for p in cfg.exclude)


def _kept_rows(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the selected layers stored with kept rows, and of every selected
    member of a cross-layer group some of whose members are (they share the gauged basis):
    what :func:`quantize` rounds in another form of the same map (:func:`_forms`)."""
    if not cfg.cores:
        return []
    selected = [(n, m) for n, m in model.named_modules() if n and not _excluded(n, cfg)]
    gauged = {id(m.shared) for _, m in selected
              if isinstance(m, CrossLayerLinear) and m.kept is not None}
    return [(n, m) for n, m in selected if isinstance(m, KeptRowsLinear) or (
        isinstance(m, CrossLayerLinear) and id(m.shared) in gauged)]


def _forms(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, module, form)`` for :func:`_kept_rows`: a kept-rows layer as
    :func:`_rounded_form`, a cross-layer group with kept rows with an orthonormal shared basis
    (rounded directly, kept-rows coefficients cost more accuracy). Built, not swapped in."""
    found = _kept_rows(model, cfg)
    plain = _plain_groups([m for _, m in found])
    return [(n, m, plain[id(m)] if id(m) in plain else _rounded_form(m)) for n, m in found]


def _rounded_form(layer: KeptRowsLinear) -> nn.Module:
    """The smaller of the two forms of ``layer``'s map that round like a dense weight: two
    balanced factors (``r (in + out)`` entries), or the product as one ``nn.Linear``
    (``in out`` entries, and one matmul instead of two), the smaller where ``r`` is above
    ``in out / (in + out)``, as in about a third of the kept-rows layers at keep 80%."""
    if layer.rank * (layer.in_features + layer.out_features) < (
            layer.in_features * layer.out_features):
        return balanced_factors(layer)
    ref = layer.kept.weight
    return layer.to_linear().train(layer.training).requires_grad_(ref.requires_grad)


def _leaves(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module whose weights :func:`quantize` converts, in model
    order (a shared basis once): each ``nn.Linear`` (the parts of low-rank layers and
    cross-layer members among them), GPT-2 ``Conv1D``, ``nn.Embedding`` and tensor-network
    layer."""
    leaves, containers = [], []
    for name, module in model.named_modules():
        if not name or _excluded(name, cfg):
            continue
        if isinstance(module, (FactoredLinear, CrossLayerLinear)):
            containers.append(name + ".")
            continue
        if isinstance(module, TensorNetworkLinear):
            wanted = cfg.cores
        elif isinstance(module, nn.Embedding):
            wanted = cfg.embeddings
        elif is_linear_like(module):
            wanted = cfg.cores if any(name.startswith(c) for c in containers) else cfg.dense
        else:
            continue
        done = isinstance(module, (nn.Linear, nn.Embedding)) and is_torchao_tensor(module.weight)
        if wanted and not done:
            leaves.append((name, module))
    group = cfg.group_size
    for name, module in leaves:  # torchao's groups must divide the rows
        if _by_torchao(module, cfg) and group and module.weight.shape[1] % group:
            raise ArgumentError(f"group_size={group} does not divide the rows of {name} "
                                f"{tuple(module.weight.shape)}")
    return leaves


def _by_torchao(module: nn.Module, cfg: QuantizeConfig) -> bool:
    """int8 of an ``nn.Linear`` or ``nn.Embedding`` goes through torchao (module docs say why
    the rest does not)."""
    return cfg.bits == 8 and isinstance(module, (nn.Linear, nn.Embedding))


def _channel_dim(module: nn.Module) -> int:
    """The leg of ``module.weight`` that is the output channels (a ``Conv1D`` stores
    ``(in, out)``)."""
    return 0 if isinstance(module, nn.Embedding) or linear_weight(module)[0] is module.weight else 1


def _require_torchao(cfg: QuantizeConfig) -> None:
    if cfg.bits == 8 and importlib.util.find_spec("torchao") is None:
        raise ArgumentError("bits=8 quantizes through torchao, which is not installed: "
                            "pip install 'tensornet-llm[torchao]'")


def _round_torchao(p: Tensor, cfg: QuantizeConfig) -> Tensor:
    """``p`` (an ``(out, in)`` weight or an embedding table) as torchao's int8 stores it."""
    from torchao.quantization import Int8Tensor

    return Int8Tensor.from_hp(p.detach(), int8_config(cfg.group_size).granularity).dequantize().to(p.dtype)


def rounding_plan(model: nn.Module, bits: "int | QuantizeConfig | None" = None,
                  **options: Any) -> list[tuple[nn.Parameter, Callable[[Tensor], Tensor]]]:
    """``(parameter, rounding)`` of every float tensor :func:`quantize` (same arguments) would
    round, each once (a tied table, a group's shared basis): ``rounding(parameter)`` is the
    value the quantized model computes with."""
    cfg = as_quantize_config(bits, **options)
    _require_torchao(cfg)
    for name, module in _kept_rows(model, cfg):
        if isinstance(module, CrossLayerLinear) and module.kept is None:
            continue  # named by its group's member with kept rows
        form = "two balanced factors or one linear" if isinstance(module, KeptRowsLinear) \
            else "members with an orthonormal shared basis"
        raise ArgumentError(f"{name} is stored with kept rows, which quantize() rounds as {form}, "
                            "a form its own parameters cannot take; call "
                            "low_rank_as_factors(model) first (the same maps in that form)")
    group = cfg.effective_group_size
    plan: dict[int, tuple[nn.Parameter, Callable[[Tensor], Tensor]]] = {}
    for _, module in _leaves(model, cfg):
        if _by_torchao(module, cfg):
            legs = [(module.weight, partial(_round_torchao, cfg=cfg))]
        else:
            legs = [(t, partial(round_tensor, bits=cfg.bits, group_size=group, channel_dim=d))
                    for t, d in (
                        [(c, QuantizedTensorNetworkLinear._channel_dim(tuple(c.shape)))
                         for c in module.cores] if isinstance(module, TensorNetworkLinear)
                        else [(module.weight, _channel_dim(module))])]
        for t, rounding in legs:
            plan.setdefault(id(t), (t, rounding))
    return list(plan.values())


@contextmanager
def rounded_weights(model: nn.Module, bits: "int | QuantizeConfig | None" = None,
                    **options: Any) -> Iterator[None]:
    """Within the block, every weight that :func:`quantize` (same arguments) would round holds
    its rounded value, so ``model`` computes what the quantized model will; the float values
    come back on exit. Gradients computed inside are taken at the rounded weights and, applied
    to the float ones after the block, make the straight-through estimate of
    quantization-aware training (``heal(..., quantize=4)``)."""
    saved = []
    try:
        with torch.no_grad():
            for p, rounding in rounding_plan(model, bits, **options):
                saved.append((p, p.detach().clone()))
                p.copy_(rounding(p))
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
    ``r^2`` more parameters each) or, where that is smaller, as one ``nn.Linear``, and every
    cross-layer group stored as kept rows by the same
    maps with an orthonormal shared basis
    (:func:`~tensornet_llm.layers.cross_layer.plain_members`, ``in_rank^2`` more parameters per
    group): the forms :func:`quantize` rounds, so quantization-aware healing can train them.
    Returns how many modules were replaced."""
    forms = _forms(model, QuantizeConfig())
    _swap(model, [(name, form) for name, _, form in forms])
    return len(forms)


def _swap(model: nn.Module, modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Put each ``(name, module)`` into ``model`` at ``name``."""
    for name, module in modules:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


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
    """Quantize ``model``'s weights in place (linears, low-rank factors, tensor-network cores,
    embeddings; module docs say which go through torchao).

    Arguments default to :class:`QuantizeConfig`'s fields (``config`` supplies others; explicit
    keywords win). Everything is validated before any module changes. A tied input embedding
    and LM head stay tied: both hold one quantized table. Quantize after compactify and after
    healing; the quantized weights do not train.

    Returns:
        A :class:`QuantizeReport`: the bytes of each converted layer's weights before and after
        (a compressed layer is one row, whatever form it is rounded in).
    """
    cfg = as_quantize_config(bits, config=config, group_size=group_size, cores=cores,
                             dense=dense, embeddings=embeddings, exclude=exclude)
    _require_torchao(cfg)
    modules = dict(model.named_modules())  # as they are before any change
    compressed = [n for n, m in modules.items() if isinstance(m, (FactoredLinear, CrossLayerLinear))]
    forms = _forms(model, cfg)
    _swap(model, [(name, form) for name, _, form in forms])  # the same maps
    try:  # build the library's own layers; nothing else changes if this fails
        leaves = _leaves(model, cfg)
        own = _own_layers(leaves, cfg)
    except BaseException:
        _swap(model, [(name, module) for name, module, _ in forms])
        raise
    counted: set[int] = set()
    before: dict[str, int] = {}
    for name, _ in leaves:
        unit = next((c for c in compressed if name == c or name.startswith(c + ".")), name)
        if unit not in before:
            before[unit] = _weight_bytes(modules[unit], counted)
    _swap(model, own.items())
    _torchao_int8(model, [m for n, m in leaves if n not in own], cfg)

    report = QuantizeReport(cfg.bits, cfg.effective_group_size)
    counted.clear()
    for unit, nbytes in before.items():
        after = _weight_bytes(model.get_submodule(unit), counted)
        original = modules[unit]
        kind = "embedding" if isinstance(original, nn.Embedding) else \
            "tensor network" if isinstance(original, TensorNetworkLinear) else \
            "low-rank" if isinstance(original, FactoredLinear) else \
            "cross-layer" if isinstance(original, CrossLayerLinear) else "linear"
        report.rows.append((unit, kind, nbytes, after))
    attach(model)  # so that model.save_pretrained writes what from_pretrained loads
    return report


def _own_layers(leaves: list[tuple[str, nn.Module]], cfg: QuantizeConfig
                ) -> dict[str, nn.Module]:
    """``{name: the library's quantized layer}`` for each leaf torchao does not take (module
    docs); leaves that share a weight (a tied table) share its quantized one."""
    group = cfg.effective_group_size
    own: dict[str, nn.Module] = {}
    by_weight: dict[int, QuantizedWeight] = {}
    for name, module in leaves:
        if _by_torchao(module, cfg):
            continue
        if isinstance(module, TensorNetworkLinear):
            own[name] = QuantizedTensorNetworkLinear.from_module(module, cfg.bits, group)
            continue
        shared = by_weight.get(id(module.weight))
        if isinstance(module, nn.Embedding):
            own[name] = QuantizedEmbedding(shared, module.padding_idx) if shared else \
                QuantizedEmbedding.from_module(module, cfg.bits, group)
        else:
            own[name] = QuantizedLinear.from_module(module, cfg.bits, group, shared)
        by_weight.setdefault(id(module.weight), own[name].qweight)
    return own


def _torchao_int8(model: nn.Module, modules: list[nn.Module], cfg: QuantizeConfig) -> None:
    """torchao's ``quantize_`` on ``modules`` of ``model``, each once; modules that shared one
    float weight (a tied table) share the quantized one afterwards (torchao would quantize it
    twice, untied). Nothing to do (int4, or nothing selected) needs no torchao."""
    if not modules:
        return
    from torchao.quantization import quantize_

    first: dict[int, nn.Module] = {}
    followers: list[tuple[nn.Module, nn.Module]] = []
    for module in modules:
        key = id(module.weight)
        if key in first:
            followers.append((module, first[key]))
        else:
            first[key] = module
    pending = {id(m) for m in first.values()}

    def once(module: nn.Module, _fqn: str) -> bool:  # torchao walks a shared module per parent
        taken = id(module) in pending
        pending.discard(id(module))
        return taken

    quantize_(model, int8_config(cfg.group_size), filter_fn=once)
    for module, leader in followers:
        module.weight = leader.weight
