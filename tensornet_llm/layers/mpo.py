"""Matrix product operator layer (CompactifAI, arXiv:2401.14109).

The weight ``W[(o_1..o_N), (i_1..i_N)]`` is a chain of cores::

    W = sum_{a_1..a_{N-1}} G_1[1, o_1, i_1, a_1] G_2[a_1, o_2, i_2, a_2] ... G_N[a_{N-1}, o_N, i_N, 1]

Core ``k`` has legs ``(r_{k-1}, o_k, i_k, r_k)``: left bond, output leg, input leg, right bond,
with ``r_0 = r_N = 1`` and ``r_k <= chi``.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import TensorNetworkLinear
from .contract import NetworkSpec, factors_linear
from .decompose import BondSpectrum, mpo_bond_dims, tt_svd

__all__ = ["MPOLinear", "mpo_network"]


def mpo_network(
    out_shape: Sequence[int], in_shape: Sequence[int], bond_dims: Sequence[int]
) -> NetworkSpec:
    """Index structure of an MPO. Labels: ``1..N`` outputs, ``N+1..2N`` inputs, then the
    ``N-1`` inner bonds. The size-1 boundary bonds ``r_0``, ``r_N`` are not operand legs: the
    first operand is ``(o_1, i_1, r_1)`` and the last ``(r_{N-1}, o_N, i_N)``."""
    n = len(out_shape)
    out_legs = tuple(range(1, n + 1))
    in_legs = tuple(range(n + 1, 2 * n + 1))
    bonds = (None, *range(2 * n + 1, 3 * n), None)
    core_legs = tuple(
        tuple(l for l in (bonds[k], out_legs[k], in_legs[k], bonds[k + 1]) if l is not None)
        for k in range(n)
    )
    sizes = (
        *zip(out_legs, out_shape),
        *zip(in_legs, in_shape),
        *zip(bonds[1:-1], bond_dims),
    )
    return NetworkSpec(core_legs, out_legs, in_legs, tuple(sizes))


class MPOLinear(TensorNetworkLinear):
    """Drop-in ``nn.Linear`` whose weight is a matrix product operator.

    Parameters: ``cores[k]`` of shape ``(r_{k-1}, o_k, i_k, r_k)``; ``bias`` ``(out_features,)``.
    Build from a trained layer with :meth:`from_linear` (TT-SVD, at most ``chi`` singular values
    per bond) or construct directly for a random, variance-preserving initialisation. See
    :class:`~tensornet_llm.layers.base.TensorNetworkLinear` for the arguments.

    Example:
        >>> layer = MPOLinear.from_linear(nn.Linear(576, 1536), chi=32)
        >>> layer(torch.randn(4, 10, 576)).shape
        torch.Size([4, 10, 1536])
    """

    method = "mpo"

    @staticmethod
    def _network(out_shape, in_shape, bond_dims) -> NetworkSpec:
        return mpo_network(out_shape, in_shape, bond_dims)

    @staticmethod
    def _parameter_shapes(spec: NetworkSpec) -> tuple[tuple[int, ...], ...]:
        # Stored with the boundary bonds: (1, o_1, i_1, r_1), ..., (r_{N-1}, o_N, i_N, 1).
        shapes = [list(s) for s in spec.core_shapes]
        if len(shapes) == 1:
            return ((1, *shapes[0], 1),)
        shapes[0].insert(0, 1)
        shapes[-1].append(1)
        return tuple(tuple(s) for s in shapes)

    def _operands(self, cores: Sequence[Tensor] | None = None) -> list[Tensor]:
        ops = list(self.cores if cores is None else cores)
        ops[0] = ops[0][0]
        ops[-1] = ops[-1][..., 0]
        return ops

    @staticmethod
    def _max_bond_dims(site_dims: Sequence[int], chi: int) -> list[int]:
        return mpo_bond_dims(site_dims, chi)

    @staticmethod
    def _decompose(weight, out_shape, in_shape, chi, tol) -> tuple[list[Tensor], list[BondSpectrum]]:
        return tt_svd(weight, out_shape, in_shape, chi, tol)

    @staticmethod
    def _bond_dims_of(cores: Sequence[Tensor]) -> list[int]:
        return [int(c.shape[-1]) for c in cores[:-1]]

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in_features) -> (..., out_features)``; the low-rank layout runs as two
        ``F.linear`` calls with no other work (the commonest layer, and decode is sensitive to
        per-call overhead)."""
        table = self.dispatch_table()
        if table.rebuild.two_factors and len(table.regimes) == 1 and (
                table.regimes[0].strategy == "factors") and x.shape[-1] == self.in_features:
            return factors_linear(x, self.cores, table.rebuild, self.bias, self.in_features,
                                  self.out_features)
        return super().forward(x)
