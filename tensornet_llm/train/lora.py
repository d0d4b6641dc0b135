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

The adapter computes ``y = base(x) + scaling * B (A x)`` with ``A (r, in)``, ``B (out, r)``.
Merging it into the base layer is exact only for the low-rank layout, ``W = U V``: the merged
layer is ``[U, scaling * B] [V; A]``, a low-rank layer of rank ``rank + r`` (and unmerging cuts
it back). A low-rank layer stored as kept rows (:class:`InterpolativeLinear`, the default of
``compactify``) takes the same sum as ``r`` more kept rows
(:meth:`InterpolativeLinear.append_factors_`, exact up to float rounding), and unmerging restores
its earlier cores bit for bit. For a many-site MPO or a tree, ``W + scaling * B A`` is in general not a network of
the same bond dimensions, and a quantized layer cannot absorb float factors, so merging those is
refused with an error instead of approximated silently.

DoRA (``use_dora=True``) works on every layer kind: peft reads the base weight through the
layer's ``weight`` property (rebuilt from the cores) for the row norms of ``W + scaling * B A``.
Its merge ``W' = g (W + scaling * B A)``, ``g = magnitude / ||W + scaling * B A||`` (per output
row), is exact into a low-rank layer too: ``g`` scales the rows of ``[U, scaling * B]`` (of a
kept-rows layer: its kept rows and coefficients, :meth:`InterpolativeLinear.scale_rows_`).

Needs ``pip install 'tensornet-llm[peft]'``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..errors import ArgumentError
from ..layers.base import TensorNetworkLinear
from ..layers.cross_layer import CrossLayerLinear
from ..layers.interpolative import InterpolativeLinear
from ..layers.mpo import MPOLinear
from ..layers.quantized import QuantizedCrossLayerLinear, QuantizedTensorNetworkLinear

__all__ = ["lora_config", "load_lora_config", "TensorNetworkLoraLinear", "MergeNotExactError"]


class MergeNotExactError(ArgumentError):
    """The adapter cannot be merged into this layer without changing what it computes."""


class TensorNetworkLoraLinear(_PeftLoraLinear):
    """peft's LoRA layer around a tensor-network layer (float or quantized).

    Forward, training, saving and loading are peft's own; what differs is reading the base
    layer's size, device and dtype from its cores (never materialising the dense weight) and
    merging, which is exact for the low-rank layout and refused elsewhere (see the module docs).
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        if isinstance(base_layer, QuantizedTensorNetworkLinear):
            first = base_layer.qcores[0]
            return first.codes.device, first.dtype
        if isinstance(base_layer, QuantizedCrossLayerLinear):
            return base_layer.qcore.codes.device, base_layer.qcore.dtype
        core = base_layer.core if isinstance(base_layer, CrossLayerLinear) else base_layer.cores[0]
        return core.device, core.dtype

    def _mergeable(self, adapter: str, merging: int = 1) -> MPOLinear:
        base = self.get_base_layer()
        variant = self.lora_variant.get(adapter)
        if variant is not None and not isinstance(variant, DoraLinearVariant):
            raise MergeNotExactError(
                f"merging a {type(variant).__name__} adapter into a tensor-network layer is not "
                "supported; keep it unmerged")
        if variant is not None and (merging > 1 or self.merged_adapters):
            raise MergeNotExactError(
                f"DoRA adapter {adapter!r} merges exactly only alone, into a layer with no other "
                "adapter merged (its norm is that of the unmerged weight); merge it by itself, "
                "or keep it unmerged")
        if not (isinstance(base, MPOLinear) and base.is_low_rank):
            kind = type(base).__name__
            raise MergeNotExactError(
                f"adapter {adapter!r} cannot be merged exactly into this {kind}: only a low-rank "
                "layer (W = U V) absorbs B A without changing its structure (a cross-layer "
                "member would change the bases its group shares); keep the adapter unmerged "
                "(it costs two thin matmuls per call)")
        return base

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge exactly into a low-rank base layer: its rank grows by ``r`` per adapter (a DoRA
        adapter also rescales the rows of the left factor)."""
        adapters = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        for adapter in adapters:  # check all first: nothing is half-merged
            self._mergeable(adapter, len(adapters))
        for adapter in adapters:
            base = self._mergeable(adapter, len(adapters))
            scaling = self.scaling[adapter]
            left = self.lora_B[adapter].weight * scaling  # (out, r)
            right = self.lora_A[adapter].weight  # (r, in)
            if safe_merge and not (torch.isfinite(left).all() and torch.isfinite(right).all()):
                raise ValueError(f"NaNs detected in adapter {adapter!r}; it seems to be broken")
            gain = None
            if adapter in self.lora_variant:  # DoRA: W' = g (W + s B A), g per output row
                with torch.no_grad():
                    norm = (base.to_dense() + left @ right).norm(dim=1)
                    gain = self.lora_magnitude_vector[adapter].weight.detach() / norm
            if isinstance(base, InterpolativeLinear):  # unmerged by going back, bit for bit
                self._cache_store(f"{adapter}-kept-rows", base.state())
            base.append_factors_(left, right)
            if gain is not None:
                base.scale_rows_(gain)
                self._cache_store(f"{adapter}-dora-gain", gain)
            if self.lora_bias[adapter]:
                if base.bias is None:
                    raise MergeNotExactError("lora_bias=True needs a base layer with a bias")
                with torch.no_grad():
                    base.bias += self.lora_B[adapter].bias * scaling
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Take merged adapters out again: the low-rank layer is cut back to its rank before."""
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            base = self.get_base_layer()
            if isinstance(base, InterpolativeLinear):
                if adapter in self.lora_variant:
                    self._cache_pop(f"{adapter}-dora-gain")
                base.restore_(self._cache_pop(f"{adapter}-kept-rows"))
            else:
                if adapter in self.lora_variant:
                    base.scale_rows_(1 / self._cache_pop(f"{adapter}-dora-gain"))
                base.truncate_bond_(base.bond_dims[0] - self.r[adapter])
            if self.lora_bias[adapter]:
                with torch.no_grad():
                    base.bias -= self.lora_B[adapter].bias * self.scaling[adapter]

    def __repr__(self) -> str:
        return "tensornet_lora." + super().__repr__()


_CUSTOM = {TensorNetworkLinear: TensorNetworkLoraLinear,
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
