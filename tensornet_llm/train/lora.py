"""LoRA adapters on tensor-network layers, through peft.

peft only knows the layer types it ships; this module teaches it the tensor-network ones through
peft's custom-module dispatch. :func:`lora_config` returns an ordinary ``peft.LoraConfig`` that
also maps :class:`~tensornet_llm.layers.base.TensorNetworkLinear`, the cross-layer members
(:class:`~tensornet_llm.layers.cross_layer.CrossLayerLinear`) and their quantized forms to
:class:`TensorNetworkLoraLinear`, so ``peft.get_peft_model(model, lora_config(...))``
puts adapters on a compactified model like on any other::

    from peft import PeftModel, get_peft_model
    peft_model = get_peft_model(model, tensornet_llm.lora_config(r=8, target_modules=["q_proj"]))
    ...                                    # train: only the adapters have gradients
    peft_model.save_pretrained("adapters")  # peft's own format
    again = PeftModel.from_pretrained(load_compactified("model"), "adapters",
                                      config=tensornet_llm.load_lora_config("adapters"))

The low-rank and kept-rows layers (:mod:`~tensornet_llm.layers.low_rank`) are two ordinary
``nn.Linear``, so peft reaches their factors without this module: a plain
``LoraConfig(target_modules="all-linear")``, or names such as ``"q_proj.kept"``, puts peft's own
adapters on them, which merge exactly. :func:`lora_config` instead puts one adapter on the
whole named layer, of any kind.

The adapter computes ``y = base(x) + scaling * B (A x)`` with ``A (r, in)``, ``B (out, r)``.
It trains, saves and loads as peft's own; it is never merged: ``W + scaling * B A`` is in
general not a network of the same bond dimensions, and a quantized layer cannot absorb float
factors, so ``merge`` is refused with an error instead of approximated silently. Adapters on
the factors of the two-``nn.Linear`` layers (above) merge exactly.

DoRA (``use_dora=True``) works on every layer kind: peft reads the base weight through the
layer's ``weight`` property (rebuilt from the cores) for the row norms of ``W + scaling * B A``.

Needs ``pip install 'tensornet-llm[peft]'``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..errors import ArgumentError
from ..layers.base import TensorNetworkLinear
from ..layers.cross_layer import CrossLayerLinear
from ..layers.low_rank import FactoredLinear
from ..layers.quantized import QuantizedCrossLayerLinear, QuantizedTensorNetworkLinear

__all__ = ["lora_config", "load_lora_config", "TensorNetworkLoraLinear", "MergeNotExactError"]


class MergeNotExactError(ArgumentError):
    """The adapter cannot be merged into this layer without changing what it computes."""


class TensorNetworkLoraLinear(_PeftLoraLinear):
    """peft's LoRA layer around a tensor-network layer (float or quantized).

    Forward, training, saving and loading are peft's own; what differs is reading the base
    layer's size, device and dtype from its cores (never materialising the dense weight), and
    merging, which is refused (see the module docs).
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        if isinstance(base_layer, QuantizedTensorNetworkLinear):
            first = base_layer.qcores[0]
            return first.codes.device, first.dtype
        if isinstance(base_layer, QuantizedCrossLayerLinear):
            return base_layer.qcore.codes.device, base_layer.qcore.dtype
        if isinstance(base_layer, CrossLayerLinear):
            core = base_layer.core
        elif isinstance(base_layer, FactoredLinear):
            core = next(base_layer.parameters())
        else:
            core = base_layer.cores[0]
        return core.device, core.dtype

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Refused (module docs): nothing is merged, and the error says what merges exactly."""
        adapters = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if adapters:
            kind = type(self.get_base_layer()).__name__
            raise MergeNotExactError(
                f"adapter {adapters[0]!r} cannot be merged exactly into this {kind}: W + B A is "
                "not a layer of the same structure; keep it unmerged, or compress with "
                "method='low-rank' and adapt its nn.Linear factors with a plain peft LoraConfig "
                "(target_modules='all-linear' or names such as 'q_proj.kept'), which peft merges "
                "exactly")

    def unmerge(self) -> None:
        """Nothing to take out: :meth:`merge` never merges."""

    def __repr__(self) -> str:
        return "tensornet_lora." + super().__repr__()


_CUSTOM = {TensorNetworkLinear: TensorNetworkLoraLinear,
           FactoredLinear: TensorNetworkLoraLinear,
           QuantizedTensorNetworkLinear: TensorNetworkLoraLinear,
           CrossLayerLinear: TensorNetworkLoraLinear,
           QuantizedCrossLayerLinear: TensorNetworkLoraLinear}


def lora_config(**kwargs: Any) -> LoraConfig:
    """A ``peft.LoraConfig`` (same keyword arguments) that also targets tensor-network layers.

    Pass it to ``peft.get_peft_model``; ``target_modules`` names modules as usual (``["q_proj",
    "v_proj"]``), whether they are dense, tensor networks or quantized tensor networks.
    """
    config = LoraConfig(**kwargs)
    config._register_custom_module(_CUSTOM)
    return config


def load_lora_config(path: str | os.PathLike, **kwargs: Any) -> LoraConfig:
    """The config of adapters saved by peft at ``path``, able to target tensor-network layers
    again: pass it as ``PeftModel.from_pretrained(model, path, config=...)`` (peft does not
    save the custom-module mapping)."""
    config = LoraConfig.from_pretrained(str(path), **kwargs)
    config._register_custom_module(_CUSTOM)
    return config
