"""Layouts: how one linear layer is cut into a tensor network.

A layout is the network class, the number of sites and, optionally, the leg sizes per site
(``in_shape``, ``out_shape``; ``None`` lets the layer factorise the features evenly). Two
layouts of the same layer hold different parameters at the same bond dimension ``chi`` and
approximate different weights well: a 3-site MPO of a ``576 x 1536`` weight splits both legs
three ways, while the *low-rank* layout, a 2-site MPO with the whole output leg on the first
site and the whole input leg on the second,

    W[o, i] = sum_a A[o, a] B[a, i]         (out_shape = (out, 1), in_shape = (1, in))

is the rank-``chi`` factorisation. By default it is stored as kept rows and their combinations
(:class:`~tensornet_llm.layers.interpolative.InterpolativeLinear`: ``chi (in + out - chi)``
parameters for the same weight); it is always built and fitted as the two factors and converted
at the end (:meth:`Layout.stored`). Under a parameter budget ``compactify`` may offer each module
several layouts and keep, per module, the one predicted to do the least damage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from .base import TensorNetworkLinear
from .interpolative import InterpolativeLinear
from .mpo import MPOLinear
from .ttns import TTNSLinear

__all__ = ["Layout", "METHODS", "LAYER_CLASSES"]

#: The network classes by their ``method`` name (as ``compactify(method=...)`` and saved
#: checkpoints spell them).
METHODS: dict[str, type[TensorNetworkLinear]] = {"mpo": MPOLinear, "ttns": TTNSLinear}
#: Every layer class by the ``method`` its saved layout records (what loading looks up): the
#: methods, and the kept-rows storage of the low-rank layout.
LAYER_CLASSES: dict[str, type[TensorNetworkLinear]] = {
    **METHODS, InterpolativeLinear.method: InterpolativeLinear}


@dataclass(frozen=True)
class Layout:
    """Network class, sites and optional leg sizes of one layer's tensor network."""

    cls: type[TensorNetworkLinear]
    n_sites: int
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None

    @classmethod
    def low_rank(cls, in_features: int, out_features: int, rows: bool = True) -> "Layout":
        """The rank-chi factorisation ``W = A B`` (see the module docs), stored as kept rows
        (``rows``, :class:`InterpolativeLinear`) or as the two factors (a 2-site MPO)."""
        return cls(InterpolativeLinear if rows else MPOLinear, 2, (1, in_features),
                   (out_features, 1))

    def factor_form(self) -> "Layout":
        """The layout the fit works on: the two factors of a kept-rows layout, else itself."""
        return replace(self, cls=MPOLinear) if self.cls is InterpolativeLinear else self

    def stored(self, layer: TensorNetworkLinear) -> TensorNetworkLinear:
        """``layer``, built in :meth:`factor_form`, as this layout stores it (same weight)."""
        if self.cls is InterpolativeLinear and not isinstance(layer, InterpolativeLinear):
            return InterpolativeLinear.from_factors(layer)
        return layer

    @property
    def is_low_rank(self) -> bool:
        return self.n_sites == 2 and self.in_shape is not None and self.in_shape[0] == 1 and (
            self.out_shape is not None and self.out_shape[1] == 1
        )

    @property
    def name(self) -> str:
        """Short label for reports: ``"mpo"``, ``"ttns"`` or ``"low-rank"``."""
        return "low-rank" if self.is_low_rank else self.cls.method

    def decompose(
        self, weight: Tensor, bias: Tensor | None, chi: int, tol: float | None = None
    ) -> TensorNetworkLinear:
        """The layer of this layout cut from ``weight`` ``(out, in)`` at bond dimension ``chi``."""
        return self.cls.from_weight(
            weight, bias, chi, self.n_sites, in_shape=self.in_shape, out_shape=self.out_shape,
            tol=tol,
        )

    def num_parameters(self, in_features: int, out_features: int, chi: int, bias: bool) -> int:
        """Parameters (cores, plus the bias) of this layout's layer at ``chi``."""
        return self.cls.count_parameters(
            in_features, out_features, chi, self.n_sites, bias, in_shape=self.in_shape,
            out_shape=self.out_shape,
        )
