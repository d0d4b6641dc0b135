"""The structure of a compressed model: which modules are replaced, by what, and how to
rebuild them.

:func:`describe` reads it off a model (the content of ``tensornet.json`` and of the
``quantization_config`` in ``config.json``); :func:`build_structure` swaps uninitialised
modules of that structure into a model built on ``meta``, before its weights load (by
:func:`~.serialization.load_compactified` or by transformers' ``from_pretrained`` through
:mod:`~.transformers_plugin`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, first_line
from ..layers.cross_layer import CrossLayerLinear, SharedBases, cross_layer_members, group_names
from ..layers.layout import COMPRESSED, LAYER_CLASSES, CompressedLayer
from ..layers.quantized import QUANTIZED_TYPES, QuantizedModule
from .legacy import LEGACY_KEPT_ROWS, kept_rows_layer
from .tensors import is_torchao_tensor

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "structure", "compressed_modules", "describe",
           "replaced", "resized_linears", "marker_keys", "with_markers", "add_quantization_config", "build_structure",
           "submodule"]

FORMAT_VERSION = 1
#: The ``quant_method`` of the ``quantization_config`` a saved ``config.json`` holds.
QUANT_METHOD = "tensornet"


def structure(architecture: str, modules: Mapping[str, dict], quantized: Mapping[str, dict],
              aliases: Mapping[str, str], **extra: Any) -> dict[str, Any]:
    """The content of ``tensornet.json``: the layouts of the replaced and quantized modules by
    name, and which state-dict keys alias another."""
    return {"format_version": FORMAT_VERSION, "architecture": architecture,
            "modules": dict(modules), "quantized": dict(quantized), "aliases": dict(aliases),
            **extra}


def compressed_modules(model: nn.Module) -> dict[str, CompressedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, COMPRESSED)}


def describe(model: nn.Module, aliases: Mapping[str, str] | None = None, **extra: Any
             ) -> dict[str, Any]:
    """The structure of ``model``'s replaced modules (what ``tensornet.json`` and the
    ``quantization_config`` of ``config.json`` hold)."""
    return structure(
        type(model).__name__,
        {n: m.layout() for n, m in compressed_modules(model).items()},
        {n: m.layout() for n, m in model.named_modules() if isinstance(m, QuantizedModule)},
        aliases or {}, **_resized_section(model), **_cross_layer_section(model),
        **_buffered_section(model), **extra)


def replaced(structure: Mapping[str, Any]) -> set[str]:
    """The qualified names of the modules ``structure`` replaces (compressed, quantized,
    cross-layer, or plain ``nn.Linear`` of another shape than the architecture's), or whose
    buffers the loader sets (``buffered``)."""
    return {*structure.get("modules", {}), *structure.get("quantized", {}),
            *structure.get("cross_layer", {}), *structure.get("resized", {}),
            *structure.get("buffered", {})}


def _buffered_section(model: nn.Module) -> dict[str, Any]:
    """``{"buffered": {name: [buffer, ...]}}`` for every module whose weight torchao quantized
    and that holds buffers a checkpoint does not (non-persistent, such as Gemma's
    ``embed_scale``): transformers' torchao loader marks such a module loaded and leaves those
    buffers uninitialised, so this library's loader sets them (and the folder needs it)."""
    found = {n: sorted(m._non_persistent_buffers_set) for n, m in model.named_modules()
             if m._non_persistent_buffers_set and is_torchao_tensor(getattr(m, "weight", None))}
    return {"buffered": found} if found else {}


def _architecture(model: nn.Module) -> dict[str, nn.Module]:
    """The modules, by name, that ``model``'s architecture builds from ``model.config`` (on
    the meta device); empty without a config to build from."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return {}
    with torch.device("meta"):
        return dict(type(model)._from_config(config).named_modules())


def resized_linears(model: nn.Module, built: Mapping[str, nn.Module] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """``{name: {"in_features", "out_features", "bias"}}`` of every plain ``nn.Linear`` of
    ``model`` where its architecture (``built``, else built here) builds another shape or
    another module: a slim MLP's or attention's projections (:mod:`tensornet_llm.compress.slim`,
    :mod:`tensornet_llm.compress.heads`), or the form ``quantize`` rounds a kept-rows layer in
    where the architecture has GPT-2's ``Conv1D`` (weight ``(in, out)``) or an ``nn.Linear``
    subclass."""
    built = _architecture(model) if built is None else built
    return {n: {"in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
            for n, m in model.named_modules() if type(m) is nn.Linear and n in built
            and (type(built[n]) is not nn.Linear or built[n].weight.shape != m.weight.shape)}


def _resized_section(model: nn.Module) -> dict[str, Any]:
    """``{"resized": ...}`` (:func:`resized_linears`), and ``{"query_groups": {name: k}}`` for
    every attention module that runs ``k`` query heads per key/value group where the
    architecture runs another number; each section only where it is not empty, none without a
    config to build the architecture from."""
    if not any(type(m) is nn.Linear for m in model.modules()):
        return {}
    built = _architecture(model)
    if not built:
        return {}
    resized = resized_linears(model, built)
    groups = {n: m.num_key_value_groups for n, m in model.named_modules()
              if n in built and getattr(m, "num_key_value_groups", None) != getattr(
                  built[n], "num_key_value_groups", None)}
    return {k: v for k, v in (("resized", resized), ("query_groups", groups)) if v}


def marker_keys(names: Iterable[str]) -> list[str]:
    """``<name>.weight`` of every replaced module ``names``: the key the dense architecture
    loads that module's weight from. A saved folder holds a zero-size tensor there, so that
    loading it as a dense model (transformers without this library's plugin) stops with a size
    mismatch instead of initialising those layers at random."""
    return sorted(f"{n}.weight" for n in names)


def with_markers(state: Mapping[str, torch.Tensor], names: Iterable[str]
                 ) -> dict[str, torch.Tensor]:
    """``state`` plus the zero-size markers of :func:`marker_keys` (float32, on the CPU) at
    the keys ``state`` leaves free: a compressed layer has no ``weight``, and a weight torchao
    quantized is written as its parts (:func:`~.tensors.flatten`, which runs first)."""
    markers = {k: torch.zeros(0) for k in marker_keys(names) if k not in state}
    return {**state, **markers}


def add_quantization_config(path: Path, description: Mapping[str, Any]) -> None:
    """Record ``description`` in the ``config.json`` at ``path`` as its ``quantization_config``
    (method ``"tensornet"``), which transformers' ``from_pretrained`` hands to this library's
    plugin (:mod:`~tensornet_llm.saving.transformers_plugin`)."""
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "structure": dict(description)}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _cross_layer_section(model: nn.Module) -> dict[str, Any]:
    members = cross_layer_members(model)
    if not members:
        return {}
    groups = group_names(members)
    return {"cross_layer": {n: m.layout(groups[n]) for n, m in members.items()}}


def _build_cross_layer(model: nn.Module, entries: Mapping[str, dict], where: Path) -> None:
    """Swap in the saved cross-layer members on ``meta``; the members of one group get one
    :class:`SharedBases`, so loading the (aliased) shared tensors restores the sharing."""
    shared: dict[str, SharedBases] = {}
    for name, layout in entries.items():
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, child)  # the module must exist in this architecture
            member = CrossLayerLinear.from_layout(layout, shared.get(layout["group"]),
                                                  device="meta")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: cross_layer entry {name!r} does not fit "
                                  f"{type(model).__name__} ({first_line(exc)})") from exc
        shared.setdefault(layout["group"], member.shared)
        setattr(parent, child, member)


def build_structure(model: nn.Module, structure: Mapping[str, Any], where: Any) -> None:
    """Swap the replaced modules ``structure`` describes into ``model`` (built on ``meta``),
    uninitialised; errors name ``where`` the structure came from."""
    _build(model, "resized", structure, lambda l: nn.Linear(
        l["in_features"], l["out_features"], bias=l["bias"], device="meta"), where)
    for name, groups in structure.get("query_groups", {}).items():
        attention = submodule(model, name)
        if not (isinstance(groups, int) and groups >= 1
                and isinstance(getattr(attention, "num_key_value_groups", None), int)):
            raise CheckpointError(f"{where}: query_groups entry {name!r} does not fit "
                                  f"{type(model).__name__}")
        attention.num_key_value_groups = groups
    _build(model, "modules", structure, _compressed_layer, where)
    _build_cross_layer(model, structure.get("cross_layer", {}), where)
    # last: the parts of compressed layers and cross-layer members may be quantized
    _build(model, "quantized", structure, lambda l: QUANTIZED_TYPES[l["kind"]].from_layout(l),
           where)


def _build(model: nn.Module, section: str, structure: Mapping[str, Any], build, where: Any
           ) -> None:
    for name, layout in structure.get(section, {}).items():
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, child)  # the module must exist in this architecture
            setattr(parent, child, build(layout))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: {section} entry {name!r} does not fit "
                                  f"{type(model).__name__} ({first_line(exc)})") from exc


def submodule(model: nn.Module, name: str) -> nn.Module | None:
    """``model.get_submodule(name)``, or ``None`` where ``model`` has no such module."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _compressed_layer(layout: dict[str, Any]) -> nn.Module:
    """The (meta) module of a ``modules`` entry, a legacy kept-rows one included."""
    if layout["method"] == LEGACY_KEPT_ROWS:
        return kept_rows_layer(layout)
    return LAYER_CLASSES[layout["method"]].from_layout(layout, device="meta")
