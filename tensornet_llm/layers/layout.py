"""Layouts: how one linear layer is cut into a tensor network.

A layout is the network class, the number of sites and, optionally, the leg sizes per site
(``in_shape``, ``out_shape``; ``None`` lets the layer factorise the features evenly). Two
layouts of the same layer hold different parameters at the same bond dimension ``chi`` and
approximate different weights well: a 3-site MPO of a ``576 x 1536`` weight splits both legs
three ways, while the *low-rank* layout, a 2-site MPO with the whole output leg on the first
site and the whole input leg on the second,

    W[o, i] = sum_a A[o, a] B[a, i]         (out_shape = (out, 1), in_shape = (1, in))

is the rank-``chi`` factorisation. It is built and fitted as that 2-site MPO, then stored as two
ordinary ``nn.Linear`` (:mod:`~tensornet_llm.layers.low_rank`): by default as kept rows and their
combinations (:class:`~tensornet_llm.layers.low_rank.KeptRowsLinear`, ``chi (in + out - chi)``
parameters for the same weight), else as the two factors
(:class:`~tensornet_llm.layers.low_rank.LowRankLinear`); see :meth:`Layout.stored`. Under a
parameter budget ``compactify`` may offer each module several layouts and keep, per module, the
one predicted to do the least damage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from .base import TensorNetworkLinear
from .low_rank import FactoredLinear, KeptRowsLinear, LowRankLinear
from .mpo import MPOLinear
from .ttns import TTNSLinear

__all__ = ["Layout", "METHODS", "LAYER_CLASSES", "CompressedLayer", "COMPRESSED"]

#: A layer ``compactify`` builds for one linear (``COMPRESSED`` for ``isinstance``).
CompressedLayer = TensorNetworkLinear | FactoredLinear
COMPRESSED = (TensorNetworkLinear, FactoredLinear)

#: The network classes by their ``method`` name (as ``compactify(method=...)`` and saved
#: checkpoints spell them).
METHODS: dict[str, type[TensorNetworkLinear]] = {"mpo": MPOLinear, "ttns": TTNSLinear}
#: Every layer class by the ``method`` its saved layout records (what loading looks up): the
#: methods, and the two storages of the low-rank layout.
LAYER_CLASSES: dict[str, type[CompressedLayer]] = {
    **METHODS, LowRankLinear.method: LowRankLinear, KeptRowsLinear.method: KeptRowsLinear}


@dataclass(frozen=True)
class Layout:
    """Network class, sites and optional leg sizes of one layer's tensor network."""

    cls: type[CompressedLayer]
    n_sites: int
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None

    @classmethod
    def low_rank(cls, in_features: int, out_features: int, rows: bool = True) -> "Layout":
        """The rank-chi factorisation ``W = A B`` (see the module docs), stored as kept rows
        (``rows``, :class:`KeptRowsLinear`) or as the two factors (:class:`LowRankLinear`)."""
        return cls(KeptRowsLinear if rows else LowRankLinear, 2, (1, in_features),
                   (out_features, 1))

    def factor_form(self) -> "Layout":
        """The layout the fit works on: a low-rank layout as a 2-site MPO, else itself."""
        return replace(self, cls=MPOLinear) if issubclass(self.cls, FactoredLinear) else self

    def stored(self, layer: TensorNetworkLinear) -> CompressedLayer:
        """``layer``, built in :meth:`factor_form`, as this layout stores it (same weight,
        device, dtype, ``requires_grad`` and mode)."""
        if not issubclass(self.cls, FactoredLinear):
            return layer
        u, v = (c.detach() for c in layer.cores)
        r = v.shape[0]
        new = self.cls.from_factors(u.reshape(-1, r), v.reshape(r, -1), layer.bias)
        return new.train(layer.training).requires_grad_(layer.cores[0].requires_grad)

    @property
    def is_low_rank(self) -> bool:
        return self.n_sites == 2 and self.in_shape is not None and self.in_shape[0] == 1 and (
            self.out_shape is not None and self.out_shape[1] == 1
        )

    @property
    def calls(self) -> int:
        """Operations of this layout's forward that each take a fixed time whatever their size
        (decoding at batch 1 is mostly such time on a CPU; the budget's ``call_cost`` prices
        them): a low-rank layer 2, its two linears (kept rows also concatenate and gather one
        row of outputs, a fraction of a call), a many-site network one contraction per site."""
        return 2 if issubclass(self.cls, FactoredLinear) else self.n_sites

    @property
    def name(self) -> str:
        """Short label for reports: ``"mpo"``, ``"ttns"`` or ``"low-rank"``."""
        return "low-rank" if self.is_low_rank else self.cls.method

    def decompose(
        self, weight: Tensor, bias: Tensor | None, chi: int, tol: float | None = None
    ) -> CompressedLayer:
        """The layer of this layout cut from ``weight`` ``(out, in)`` at bond dimension ``chi``
        (a low-rank layout: truncated SVD, then stored)."""
        return self.stored(self.factor_form().cls.from_weight(
            weight, bias, chi, self.n_sites, in_shape=self.in_shape, out_shape=self.out_shape,
            tol=tol,
        ))

    def num_parameters(self, in_features: int, out_features: int, chi: int, bias: bool) -> int:
        """Parameters (cores, plus the bias) of this layout's layer at ``chi``."""
        return self.cls.count_parameters(
            in_features, out_features, chi, self.n_sites, bias, in_shape=self.in_shape,
            out_shape=self.out_shape,
        )
