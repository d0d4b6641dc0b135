"""Model surgery and choosing what to compress.

Which modules are replaced (``targets``), the activations they see (``calibrate``), the
data-aware fit of a layer (``fit``), the bond dimension of every module under a parameter
budget (``budget``), and ``compactify`` itself, which swaps the layers in and returns a
``report``; ``stream`` does the same for a checkpoint on disk, one block at a time;
``groups`` and ``sweeps`` make and fit cross-layer networks (``compactify(cross_layer=G)``).
Beside them, the diagnostics that guide those choices: ``sensitivity`` (loss rise per
module), ``entanglement`` (bond entropies), ``profiling`` and ``plots`` (both written to a
directory).
"""

from .budget import Allocation, allocate
from .compactify import CompactifyConfig, compactify
from .sweeps import GroupFit, basis_sharing, fit_group
from .entanglement import EntanglementRow, entanglement_profile, layer_entropy
from .report import CompactifyReport, LayerReport
from .stream import CheckpointReader, compactify_pretrained
from .sensitivity import SensitivityProfile, SensitivityRow, profile_sensitivity, rank_correlation

__all__ = [
    "compactify", "CompactifyConfig", "CompactifyReport", "LayerReport", "allocate",
    "Allocation", "profile_sensitivity", "SensitivityProfile", "SensitivityRow",
    "rank_correlation", "entanglement_profile", "EntanglementRow", "layer_entropy",
    "compactify_pretrained", "CheckpointReader", "fit_group", "basis_sharing", "GroupFit",
]
