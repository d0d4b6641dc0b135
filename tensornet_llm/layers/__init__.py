"""The drop-in layers: tensor-network replacements for ``nn.Linear`` and what they need.

Everything here runs with torch and opt_einsum alone (no transformers, no accelerate). From the
bottom up: how feature sizes split into sites (``factorize``, ``tree``), the decompositions of a
dense matrix (``decompose``), the pure contraction functions and their cached plans
(``contract``), the ``nn.Module`` classes (``base``, ``mpo``, ``ttns``; ``cross_layer`` for
networks shared by same-role layers of several blocks), how one layer is cut
(``layout``), the int8 / int4 layers (``quantized``) and the per-machine strategy timing
(``autotune``); ``low_rank`` holds the rank-``r`` layer as two ``nn.Linear`` (plain factors or
kept rows, chosen by ``maxvol``); ``shared_rows`` and ``gated_mlp`` give a gated MLP's kept-rows
layers one row order, so it runs without gathers. Nothing in this room knows about whole models (``gated_mlp`` knows a gated MLP
by its ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``): see ``tensornet_llm.compress``.
"""

from .autotune import TuneRow, autotune
from .base import TensorNetworkLinear, is_linear_like, linear_weight
from .cross_layer import CrossLayerLinear, SharedBases
from .decompose import BondSpectrum
from .factorize import factorize
from .gated_mlp import share_mlp_rows
from .layout import METHODS, Layout
from .low_rank import FactoredLinear, KeptRowsLinear, LowRankLinear
from .mpo import MPOLinear
from .quantized import (
    QuantizedEmbedding, QuantizedLinear, QuantizedModule, QuantizedTensorNetworkLinear,
    QuantizedWeight,
)
from .ttns import TTNSLinear

__all__ = [
    "MPOLinear", "TTNSLinear", "TensorNetworkLinear", "BondSpectrum", "Layout", "METHODS",
    "factorize", "is_linear_like", "linear_weight", "QuantizedWeight", "QuantizedLinear",
    "QuantizedEmbedding", "QuantizedTensorNetworkLinear", "QuantizedModule", "autotune",
    "TuneRow", "CrossLayerLinear", "SharedBases", "share_mlp_rows", "FactoredLinear",
    "KeptRowsLinear", "LowRankLinear",
]
