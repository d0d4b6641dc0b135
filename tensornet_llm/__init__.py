"""tensornet-llm: compress transformer language models with tensor networks."""

from .base import TensorNetworkLinear
from .compactify import CompactifyConfig, compactify
from .decompose import BondSpectrum
from .factorize import factorize
from .mpo import MPOLinear
from .report import CompactifyReport, LayerReport
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
]
__version__ = "0.1.0"
