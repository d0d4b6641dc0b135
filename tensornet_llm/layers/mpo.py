"""Matrix product operator layer (CompactifAI, arXiv:2401.14109).

The weight ``W[(o_1..o_N), (i_1..i_N)]`` is a chain of cores::

    W = sum_{a_1..a_{N-1}} G_1[1, o_1, i_1, a_1] G_2[a_1, o_2, i_2, a_2] ... G_N[a_{N-1}, o_N, i_N, 1]

Core ``k`` has legs ``(r_{k-1}, o_k, i_k, r_k)``: left bond, output leg, input leg, right bond,
with ``r_0 = r_N = 1`` and ``r_k <= chi``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError
from .base import TensorNetworkLinear
from .contract import NetworkSpec, factor_pair, factors_linear, linear_mv
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
    #: The :class:`~tensornet_llm.layers.siblings.SiblingGroup` this layer's input side runs in
    #: (set by :func:`tensornet_llm.fuse_siblings`), and its place in the group's call order.
    _siblings = None
    _sibling_index = 0

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
            cores = tuple(self.cores._parameters.values())  # iterating the list, minus its overhead
            if (not torch.compiler.is_compiling() and self._siblings is not None
                    and not torch.is_grad_enabled()):
                z = self._siblings.input_side(self._sibling_index, x)  # x V^T, shared
                if z is not None:
                    a, _ = factor_pair(cores, table.rebuild, self.in_features, self.out_features)
                    return linear_mv(z, a, self.bias)
            return factors_linear(x, cores, table.rebuild, self.bias, self.in_features,
                                  self.out_features)
        return super().forward(x)

    # ----- the low-rank layout: W = U V --------------------------------------------------------
    @property
    def is_low_rank(self) -> bool:
        """Whether this is the low-rank layout (two sites, the whole output leg on the first and
        the whole input leg on the second): ``W = U V`` with ``U = cores[0] (out, r)`` and
        ``V = cores[1] (r, in)``."""
        return (self.n_sites == 2 and self.in_shape[0] == 1 and self.out_shape[1] == 1
                and self.padded_in == self.in_features and self.padded_out == self.out_features)

    def _require_low_rank(self, what: str) -> None:
        if not self.is_low_rank:
            raise ArgumentError(f"{what} needs the low-rank layout (W = U V), not "
                                f"in_shape={self.in_shape}, out_shape={self.out_shape}")

    @torch.no_grad()
    def append_factors_(self, left: Tensor, right: Tensor) -> None:
        """``W <- W + left @ right`` exactly, by growing the rank: ``U <- [U, left]``,
        ``V <- [V; right]`` (``left (out, k)``, ``right (k, in)``). The cores become new
        parameters (an optimizer holding the old ones must be rebuilt)."""
        self._require_low_rank("append_factors_")
        out_f, in_f = self.out_features, self.in_features
        k = left.shape[-1]
        if left.shape != (out_f, k) or right.shape != (k, in_f):
            raise ArgumentError(f"factors must be (out={out_f}, k) and (k, in={in_f}), got "
                                f"{tuple(left.shape)} and {tuple(right.shape)}")
        u, v = self.cores
        self._set_cores([
            torch.cat([u, left.to(u).reshape(1, out_f, 1, k)], dim=-1),
            torch.cat([v, right.to(v).reshape(k, 1, in_f, 1)], dim=0),
        ])

    @torch.no_grad()
    def scale_rows_(self, gain: Tensor) -> None:
        """``W <- diag(gain) W`` exactly (``gain (out,)``): the rows of ``U``."""
        self._require_low_rank("scale_rows_")
        self.cores[0].mul_(gain.to(self.cores[0]).view(1, -1, 1, 1))

    @torch.no_grad()
    def truncate_bond_(self, rank: int) -> None:
        """Keep the first ``rank`` terms of ``W = U V`` (undoes :meth:`append_factors_`)."""
        self._require_low_rank("truncate_bond_")
        if not 1 <= rank <= self.bond_dims[0]:
            raise ArgumentError(f"rank must be in [1, {self.bond_dims[0]}], got {rank}")
        u, v = self.cores
        self._set_cores([u[..., :rank].clone(), v[:rank].clone()])
