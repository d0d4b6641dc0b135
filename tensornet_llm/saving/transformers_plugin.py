"""``from_pretrained`` and ``save_pretrained`` of compressed models, through transformers' own
quantizer registry.

A saved folder's ``config.json`` carries ``quantization_config = {"quant_method": "tensornet",
"structure": {...}}`` (the layouts ``tensornet.json`` also holds). ``import tensornet_llm``
registers, under that method, a quantization config and an ``HfQuantizer`` (the extension
point torchao, bitsandbytes and compressed-tensors use), so that

    AutoModelForCausalLM.from_pretrained(folder)            # also device_map=, dtype=, shards

builds the architecture on ``meta``, swaps in the saved compressed modules before the weights
load (:meth:`TensorNetworkQuantizer._process_model_before_weight_loading`), and loads them as
transformers loads any weight. A compressed model carries the quantizer
(:func:`attach`, done by ``compactify``, ``quantize`` and ``load_compactified``), so
``model.save_pretrained(folder)`` writes such a folder.

Without the import, transformers warns about an unknown quantization method and would load the
dense architecture with those layers at random; the folder prevents that: it holds a zero-size
tensor at each replaced layer's dense ``weight`` key (:func:`~.structure.marker_keys`), and
transformers stops with a size mismatch. Cross-layer groups (whose members share bases) load
with :func:`~tensornet_llm.load_compactified` only.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import Tensor, nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointError
from ..layers.quantized import QuantizedWeight
from . import torchao_cpu
from .structure import (
    QUANT_METHOD, build_structure, describe, marker_keys, replaced, submodule, with_markers,
)
from .tensors import (
    dedupe, flatten, int8_config, is_torchao_tensor, part_names, quantized_names, read_metadata,
    realigned, storage_key, torchao_to_dtype,
)

__all__ = ["TensorNetworkConfig", "TensorNetworkQuantizer", "attach"]


@register_quantization_config(QUANT_METHOD)
class TensorNetworkConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed model: the structure of its replaced modules
    (:func:`~.structure.describe`)."""

    def __init__(self, structure: dict[str, Any] | None = None, **_: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.structure = dict(structure or {})

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "structure": self.structure}


def _refuse_cross_layer(structure: dict[str, Any], what: str) -> None:
    if structure.get("cross_layer"):
        raise CheckpointError(f"{what}: a model with cross-layer groups (shared bases) is saved "
                              "with save_compactified and loaded with load_compactified")


@register_quantizer(QUANT_METHOD)
class TensorNetworkQuantizer(HfQuantizer):
    """Rebuilds a compressed model inside ``from_pretrained`` and saves it in
    ``save_pretrained`` (module docs). It only loads compressed folders: compressing happens in
    :func:`~tensornet_llm.compactify`."""

    requires_calibration = True  # pre-compressed folders only

    def _process_model_before_weight_loading(self, model: nn.Module,
                                             checkpoint_files: list[str] | None = None,
                                             **_: Any) -> None:
        self.metadata = read_metadata(checkpoint_files or [])  # for torchao's tensors
        structure = self.quantization_config.structure
        _refuse_cross_layer(structure, "from_pretrained")
        build_structure(model, structure, "config.json quantization_config")
        ignored = {re.escape(k) + "$" for k in marker_keys(replaced(structure))}
        model._keys_to_ignore_on_load_unexpected = (
            set(model._keys_to_ignore_on_load_unexpected or ()) | ignored)
        # int4 tables shared by two modules: saved once, shared again after loading; not
        # tied by transformers (those modules' weight is the dequantized one, not a parameter)
        shared = _shared_quantized_weights(model, structure.get("aliases", {}))
        missing = {re.escape(f"{n}.{part}") + "$" for n in shared for part in ("codes", "scale")}
        model._keys_to_ignore_on_load_missing = (
            set(model._keys_to_ignore_on_load_missing or ()) | missing)
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for key, value in list(tied.items()):
            if not (_is_parameter(model, key) and _is_parameter(model, value)):
                del tied[key]

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype  # what from_pretrained was asked for (dtype=), or its default
        return dtype

    def _process_model_after_weight_loading(self, model: nn.Module, **_: Any) -> nn.Module:
        model.is_quantized = False  # float layers: .half() and .float() stay allowed
        structure = self.quantization_config.structure
        _initialise_buffers(model, structure.get("buffered", {}))
        for alias, source in _shared_quantized_weights(model, structure.get("aliases", {})).items():
            parent, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent), child, model.get_submodule(source))
        torchao_to_dtype(model, self.dtype)  # as the rest of the model
        realigned(model)  # computes bit for bit as the model that was saved
        # transformers keeps the converters it loaded with, to run them backwards on save;
        # torchao's have no reverse, and get_state_dict_and_metadata writes those parts itself.
        operations = set(self.get_load_operations().values())
        model._weight_conversions = [
            c for c in getattr(model, "_weight_conversions", None) or ()
            if not any(type(op) in operations for op in getattr(c, "operations", ()))]
        return model

    def get_state_dict_and_metadata(self, model: nn.Module):
        """The structure as the model holds it now, into ``config.json``; the weights with
        the markers."""
        # a tensor several modules share (a tied table, also torchao's or the library's int4
        # one) once: transformers refuses to write shared tensors it does not tie itself
        state, aliases = dedupe(model.state_dict())
        structure = describe(model, aliases)
        _refuse_cross_layer(structure, "save_pretrained")
        self.quantization_config.structure = structure
        model.config.quantization_config = self.quantization_config
        # after flattening: a weight torchao quantized is written as its parts, and its own
        # key then holds the marker as well
        tensors, metadata = flatten(state)
        return with_markers(tensors, replaced(structure)), metadata

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        """The parameters torchao quantized, by the names their parts are saved under."""
        names = quantized_names(getattr(self, "metadata", None)) if self.pre_quantized else ()
        return {name: part_names(name) for name in sorted(names)}

    def get_load_operations(self) -> dict:
        """torchao's weights are put together as transformers' own torchao quantizer does."""
        if not self.serialized_names:
            return {}
        torchao_cpu.register()
        return {"deserialize": _deserialize()}

    def is_serializable(self, **_: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _shared_quantized_weights(model: nn.Module, aliases: dict[str, str]) -> dict[str, str]:
    """``{alias module: source module}`` for the quantized weights
    (:class:`~tensornet_llm.layers.quantized.QuantizedWeight`) that ``aliases`` (a
    structure's, by state-dict key) saves under another module's name."""
    shared = {}
    for alias, source in aliases.items():
        alias_owner, _, part = alias.rpartition(".")
        source_owner = source.rpartition(".")[0]
        if part in ("codes", "scale") and all(isinstance(submodule(model, n), QuantizedWeight)
                                              for n in (alias_owner, source_owner)):
            shared[alias_owner] = source_owner
    return shared


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    module = submodule(model, owner) if owner else model
    return module is not None and isinstance(module._parameters.get(attr), nn.Parameter)


def _initialise_buffers(model: nn.Module, buffered: dict[str, list[str]]) -> None:
    """Set the buffers of the ``buffered`` modules as the model's own initialisation does
    (``_init_weights``): transformers' torchao loader marks a module it loads as initialised,
    which skips them. The module's parameters are marked loaded first, so that only the
    buffers change."""
    from transformers import initialization

    with torch.no_grad(), initialization.guard_torch_init_functions():
        for name in buffered:
            module = model.get_submodule(name)
            for p in module.parameters(recurse=False):
                p._is_hf_initialized = True
            model._init_weights(module)


@functools.cache
def _deserialize() -> type:
    """transformers' torchao deserialization, passing over the marker a folder holds at the
    key of a replaced module's weight where torchao's parts of that weight are written
    (:meth:`TensorNetworkQuantizer.get_state_dict_and_metadata`): it reaches the same
    converter as the parts."""
    from transformers.integrations.torchao import TorchAoDeserialize

    class Deserialize(TorchAoDeserialize):
        def convert(self, input_dict: dict, *args: Any, **kwargs: Any) -> dict:
            parts = {k: v for k, v in input_dict.items() if not all(
                t.numel() == 0 for t in (v if isinstance(v, list) else [v]))}
            return super().convert(parts, *args, **kwargs)

    return Deserialize


def _untied(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the second name of a torchao tensor saved under two (a tied table),
    which transformers ties again on load and could not compare (torchao's tensors have no
    ``torch.equal``)."""
    seen: set[tuple] = set()
    out = {}
    for key, tensor in state.items():
        if is_torchao_tensor(tensor):
            if storage_key(tensor) in seen:
                continue
            seen.add(storage_key(tensor))
        out[key] = tensor
    return out


def _torchao_config(model: nn.Module):
    """transformers' ``TorchAoConfig`` for a model whose only quantized layers are torchao's
    int8 ones: the folder is then an ordinary torchao checkpoint."""
    from transformers import TorchAoConfig

    weight = next(p for p in model.parameters() if is_torchao_tensor(p))
    group = weight.block_size[-1]
    return TorchAoConfig(int8_config(None if group == weight.shape[-1] else group),
                         include_input_output_embeddings=True, modules_to_not_convert=[])


def _torchao_quantizer() -> type:
    """transformers' torchao quantizer, saving a tied table once: its own writes it under both
    names, and transformers' loader then fails comparing them (``torch.equal`` of torchao's
    tensors)."""
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    class TiedTorchAoQuantizer(TorchAoHfQuantizer):
        def get_state_dict_and_metadata(self, model: nn.Module):
            return flatten(_untied(model.state_dict()))

    return TiedTorchAoQuantizer


def attach(model: nn.Module) -> nn.Module:
    """Give a compressed or quantized transformers model the quantizer and config that make
    ``model.save_pretrained`` write a folder ``from_pretrained`` rebuilds: this library's, or,
    where torchao quantized a model that is otherwise as transformers built it, transformers'
    own torchao quantizer. Any other module (no ``config`` and ``save_pretrained``), or a
    model with nothing replaced or quantized, is left as it is. Returns ``model``."""
    if not (hasattr(model, "config") and hasattr(model, "save_pretrained")):
        return model
    structure = describe(model)
    if replaced(structure):
        config = TensorNetworkConfig(structure)
        model.hf_quantizer = TensorNetworkQuantizer(config, pre_quantized=True)
    elif any(is_torchao_tensor(p) for p in model.parameters()):
        config = _torchao_config(model)
        model.hf_quantizer = _torchao_quantizer()(config, pre_quantized=True)
    else:
        return model
    model.config.quantization_config = config
    return model
