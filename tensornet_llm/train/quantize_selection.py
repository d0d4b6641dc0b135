"""What :func:`~tensornet_llm.train.quantize.quantize` converts: its configuration, and the
selection of modules and weights it rounds, which quantization-aware training
(:mod:`~tensornet_llm.train.qat`) reads too, so that both round the same weights the same way.

* :func:`leaves`: every module whose weights are rounded (linears, the factors of low-rank and
  cross-layer layers among them, embeddings, tensor-network layers), after the exclusions.
* :func:`by_torchao`: which of them torchao's int8 takes; the rest get the library's layers
  (:mod:`~tensornet_llm.train.quantize` says why).
* :func:`in_other_form`: the layers rounded in another form of the same map (kept rows).
* :func:`probed`: the leaves with a forward of their own that only the library's layer runs
  right (:mod:`~tensornet_llm.train.quantize_probe`), or an error naming one that none does.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..compress.targets import check_pattern, matches
from ..errors import ArgumentError
from ..layers.base import TensorNetworkLinear, is_linear_like, linear_weight
from ..layers.cross_layer import CrossLayerLinear
from ..layers.low_rank import FactoredLinear, KeptRowsLinear
from ..layers.quantized import INT4_GROUP_SIZE
from ..saving.tensors import int8_config, is_torchao_tensor
from .quantize_probe import has_own_forward, own_mismatch, torchao_mismatch

__all__ = ["QuantizeConfig", "as_quantize_config", "by_torchao", "channel_dim",
           "in_other_form", "leaves", "probed", "require_torchao"]


@dataclass
class QuantizeConfig:
    """What :func:`~tensornet_llm.train.quantize.quantize` converts, and how.

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

    def excluded(self, name: str) -> bool:
        return any(matches(name, p) for p in self.exclude)


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


def require_torchao(cfg: QuantizeConfig) -> None:
    if cfg.bits == 8 and importlib.util.find_spec("torchao") is None:
        raise ArgumentError("bits=8 quantizes through torchao, which is not installed: "
                            "pip install 'tensornet-llm[torchao]'")


def in_other_form(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the selected layers that
    :func:`~tensornet_llm.train.quantize.quantize` rounds in another form of the same map:
    kept-rows layers, and every selected member of a cross-layer group some of whose members
    have kept rows (they share the gauged basis)."""
    if not cfg.cores:
        return []
    selected = [(n, m) for n, m in model.named_modules() if n and not cfg.excluded(n)]
    gauged = {id(m.shared) for _, m in selected
              if isinstance(m, CrossLayerLinear) and m.kept is not None}
    return [(n, m) for n, m in selected if isinstance(m, KeptRowsLinear) or (
        isinstance(m, CrossLayerLinear) and id(m.shared) in gauged)]


def leaves(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module whose weights
    :func:`~tensornet_llm.train.quantize.quantize` converts, in model order (a shared basis
    once): each ``nn.Linear`` (the parts of low-rank layers and cross-layer members among
    them), GPT-2 ``Conv1D``, ``nn.Embedding`` and tensor-network layer."""
    found, containers = [], ()
    for name, module in model.named_modules():
        if not name or cfg.excluded(name):
            continue
        if isinstance(module, (FactoredLinear, CrossLayerLinear)):
            containers += (name + ".",)
            continue
        if isinstance(module, TensorNetworkLinear):
            wanted = cfg.cores
        elif isinstance(module, nn.Embedding):
            wanted = cfg.embeddings
        elif is_linear_like(module):
            wanted = cfg.cores if name.startswith(containers) else cfg.dense
        else:
            continue
        done = isinstance(module, (nn.Linear, nn.Embedding)) and is_torchao_tensor(module.weight)
        if wanted and not done:
            found.append((name, module))
    group = cfg.group_size
    for name, module in found:  # torchao's groups must divide the rows
        if by_torchao(module, cfg) and group and module.weight.shape[1] % group:
            raise ArgumentError(f"group_size={group} does not divide the rows of {name} "
                                f"{tuple(module.weight.shape)}")
    return found


def by_torchao(module: nn.Module, cfg: QuantizeConfig) -> bool:
    """int8 of an ``nn.Linear`` or ``nn.Embedding`` goes through torchao (module docs say why
    the rest does not)."""
    return cfg.bits == 8 and isinstance(module, (nn.Linear, nn.Embedding))


def channel_dim(module: nn.Module) -> int:
    """The leg of ``module.weight`` that is the output channels (a ``Conv1D`` stores
    ``(in, out)``)."""
    return 0 if isinstance(module, nn.Embedding) or linear_weight(module)[0] is module.weight else 1


def probed(found: list[tuple[str, nn.Module]], cfg: QuantizeConfig) -> set[str]:
    """The leaves with a forward of their own (:mod:`~.quantize_probe`) that torchao's int8
    form does not run right and the library's own layer does. One that no form reproduces
    stops :func:`~tensornet_llm.train.quantize.quantize` with an error naming it."""
    fallback = set()
    for name, module in found:
        if not has_own_forward(module):
            continue
        if by_torchao(module, cfg) and torchao_mismatch(module, int8_config(cfg.group_size)) is None:
            continue
        why = own_mismatch(module, cfg.bits, cfg.effective_group_size)
        if why is not None:
            hint = " or embeddings=False" if isinstance(module, nn.Embedding) else ""
            raise ArgumentError(
                f"{name} ({type(module).__name__}) computes more than its weight: int{cfg.bits} "
                f"does not reproduce its forward ({why}); leave it in float with exclude="
                f"[{name!r}]{hint}")
        if by_torchao(module, cfg):
            fallback.add(name)
    return fallback


