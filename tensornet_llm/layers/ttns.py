"""Tree tensor network layer: the sites are the leaves of a balanced binary tree.

Leaf ``k`` carries the physical legs ``(o_k, i_k)`` and one bond to its parent; internal nodes
join two child bonds to a parent bond; the root joins its two children (see
:mod:`tensornet_llm.layers.tree` for node order and leg order).  Compared with an MPO, correlations
between distant sites pass through ``O(log N)`` bonds instead of ``O(N)``.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import TensorNetworkLinear
from .contract import NetworkSpec
from .decompose import BondSpectrum, ht_svd, ttns_bond_dims
from .tree import binary_tree

__all__ = ["TTNSLinear", "ttns_network"]


def ttns_network(
    out_shape: Sequence[int], in_shape: Sequence[int], bond_dims: Sequence[int]
) -> NetworkSpec:
    """Index structure of a tree tensor network. Labels: ``1..N`` outputs, ``N+1..2N`` inputs,
    ``2N+1+t`` the bond above node ``t`` (post-order, root excluded)."""
    n = len(out_shape)
    tree = binary_tree(n)
    out_legs = tuple(range(1, n + 1))
    in_legs = tuple(range(n + 1, 2 * n + 1))
    edge = [2 * n + 1 + t for t in range(len(tree) - 1)]
    core_legs = []
    for t, node in enumerate(tree):
        up = () if t == len(tree) - 1 else (edge[t],)
        if node.children is None:
            core_legs.append((out_legs[node.start], in_legs[node.start], *up))
        else:
            left, right = node.children
            core_legs.append((edge[left], edge[right], *up))
    sizes = (*zip(out_legs, out_shape), *zip(in_legs, in_shape), *zip(edge, bond_dims))
    return NetworkSpec(tuple(core_legs), out_legs, in_legs, tuple(sizes))


class TTNSLinear(TensorNetworkLinear):
    """Drop-in ``nn.Linear`` whose weight is a binary tree tensor network (hierarchical Tucker).

    Parameters: ``cores[t]`` for every tree node in post-order -- leaves ``(o_k, i_k, r_t)``,
    internal nodes ``(r_left, r_right, r_t)``, root ``(r_left, r_right)``; ``bias``
    ``(out_features,)``. Build from a trained layer with :meth:`from_linear` (hierarchical
    truncated SVD) or construct directly for a random, variance-preserving initialisation.
    """

    method = "ttns"

    @staticmethod
    def _network(out_shape, in_shape, bond_dims) -> NetworkSpec:
        return ttns_network(out_shape, in_shape, bond_dims)

    @staticmethod
    def _max_bond_dims(site_dims: Sequence[int], chi: int) -> list[int]:
        return ttns_bond_dims(site_dims, chi)

    @staticmethod
    def _decompose(weight, out_shape, in_shape, chi, tol) -> tuple[list[Tensor], list[BondSpectrum]]:
        return ht_svd(weight, out_shape, in_shape, chi, tol)

    @staticmethod
    def _bond_dims_of(cores: Sequence[Tensor]) -> list[int]:
        # The last leg of every non-root node is the bond to its parent.
        return [int(c.shape[-1]) for c in cores[:-1]]
