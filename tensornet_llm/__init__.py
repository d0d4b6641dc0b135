"""tensornet-llm: compress transformer language models with tensor networks.

The package is split into rooms whose imports only run downwards (see docs/architecture.md)::

    layers/    the drop-in modules: MPOLinear, TTNSLinear, LowRankLinear, KeptRowsLinear, quantized
               layers (torch + opt_einsum)
    helpers/   bundled text, the bundled model, perplexity, atomic files
    saving/    save_compactified / load_compactified
    compress/  compactify: targets, calibration, fit, budget; sensitivity and entanglement
    train/     heal, quantize
    cli.py     the tensornet-llm command

Every public name is importable from here.
"""

from .compress import (
    Allocation, CompactifyConfig, CompactifyReport, EntanglementRow, LayerReport,
    SensitivityProfile, SensitivityRow, allocate, compactify, entanglement_profile,
    GroupFit, basis_sharing, compactify_pretrained, fit_group, layer_entropy,
    profile_sensitivity, rank_correlation,
)
from .layers import (
    BondSpectrum, CrossLayerLinear, KeptRowsLinear, Layout, LowRankLinear, MPOLinear, SharedBases,
    TensorNetworkLinear, TTNSLinear, TuneRow, autotune, factorize, share_mlp_rows,
)
from .saving import load_compactified, save_compactified
from .train import HealConfig, HealResult, QuantizeConfig, QuantizeReport, heal, quantize

__all__ = [
    "MPOLinear",
    "TTNSLinear",
    "LowRankLinear",
    "KeptRowsLinear",
    "TensorNetworkLinear",
    "CrossLayerLinear",
    "SharedBases",
    "fit_group",
    "basis_sharing",
    "GroupFit",
    "BondSpectrum",
    "compactify",
    "compactify_pretrained",
    "share_mlp_rows",
    "CompactifyConfig",
    "CompactifyReport",
    "LayerReport",
    "save_compactified",
    "load_compactified",
    "factorize",
    "profile_sensitivity",
    "SensitivityProfile",
    "SensitivityRow",
    "entanglement_profile",
    "EntanglementRow",
    "layer_entropy",
    "rank_correlation",
    "allocate",
    "Allocation",
    "Layout",
    "heal",
    "HealConfig",
    "HealResult",
    "quantize",
    "QuantizeConfig",
    "QuantizeReport",
    "autotune",
    "TuneRow",
]
__version__ = "0.1.0"

#: Names importable from here that need an optional package (imported on first use).
_OPTIONAL = {"lora_config": "train.lora", "load_lora_config": "train.lora"}


def __getattr__(name: str):
    if name in _OPTIONAL:  # LoRA adapters need peft: pip install 'tensornet-llm[peft]'
        import importlib

        from .errors import MissingDependencyError

        try:
            module = importlib.import_module(f".{_OPTIONAL[name]}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != "peft":
                raise
            raise MissingDependencyError(
                f"tensornet_llm.{name} needs peft: pip install 'tensornet-llm[peft]'") from exc
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

