"""tensornet-llm: compress transformer language models with tensor networks."""

from .autotune import TuneRow, autotune
from .base import TensorNetworkLinear
from .budget import Allocation, allocate
from .compactify import CompactifyConfig, compactify
from .decompose import BondSpectrum
from .entanglement import EntanglementRow, entanglement_profile, layer_entropy
from .factorize import factorize
from .heal import HealConfig, HealResult, heal
from .layout import Layout
from .mpo import MPOLinear
from .quantize import QuantizeConfig, QuantizeReport, quantize
from .report import CompactifyReport, LayerReport
from .sensitivity import SensitivityProfile, SensitivityRow, profile_sensitivity, rank_correlation
from .serialization import load_compactified, save_compactified
from .ttns import TTNSLinear

__all__ = [
    "MPOLinear",
    "TTNSLinear",
    "TensorNetworkLinear",
    "BondSpectrum",
    "compactify",
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
