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

import re
from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointError
from .structure import (
    QUANT_METHOD, build_structure, describe, marker_keys, replaced, with_markers,
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

    def _process_model_before_weight_loading(self, model: nn.Module, **_: Any) -> None:
        structure = self.quantization_config.structure
        _refuse_cross_layer(structure, "from_pretrained")
        build_structure(model, structure, "config.json quantization_config")
        ignored = {re.escape(k) + "$" for k in marker_keys(replaced(structure))}
        model._keys_to_ignore_on_load_unexpected = (
            set(model._keys_to_ignore_on_load_unexpected or ()) | ignored)

    def _process_model_after_weight_loading(self, model: nn.Module, **_: Any) -> nn.Module:
        model.is_quantized = False  # float layers: .half() and .float() stay allowed
        return model

    def get_state_dict_and_metadata(self, model: nn.Module):
        """The structure as the model holds it now, into ``config.json``; the weights with
        the markers."""
        structure = describe(model)
        _refuse_cross_layer(structure, "save_pretrained")
        self.quantization_config.structure = structure
        model.config.quantization_config = self.quantization_config
        return with_markers(model.state_dict(), replaced(structure)), {}

    def is_serializable(self, **_: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def attach(model: nn.Module) -> nn.Module:
    """Give a compressed transformers model the quantizer and config that make
    ``model.save_pretrained`` write a folder ``from_pretrained`` rebuilds; any other module (no
    ``config`` and ``save_pretrained``), or a model with nothing replaced, is left as it is.
    Returns ``model``."""
    if not (hasattr(model, "config") and hasattr(model, "save_pretrained")):
        return model
    structure = describe(model)
    if not replaced(structure):
        return model
    config = TensorNetworkConfig(structure)
    model.config.quantization_config = config
    model.hf_quantizer = TensorNetworkQuantizer(config, pre_quantized=True)
    return model
