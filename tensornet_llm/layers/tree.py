"""The binary tree over sites used by :class:`~tensornet_llm.TTNSLinear`.

Sites ``0..N-1`` are the leaves, in order.  Every internal node splits its contiguous range of
sites into a left half (the larger half when the count is odd) and a right half.  Nodes are listed
in post-order (children before parents), so the root is last.  Each non-root node ``t`` owns the
bond (edge) that joins it to its parent; that bond's dimension is written ``r_t``.

Tensor legs, by node kind:

* leaf for site ``k``:  ``(o_k, i_k, r_t)``   (``(o_k, i_k)`` if the leaf is the root, N = 1)
* internal node:        ``(r_left, r_right, r_t)``
* root (N >= 2):        ``(r_left, r_right)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..errors import ArgumentError

__all__ = ["TreeNode", "binary_tree"]


@dataclass(frozen=True)
class TreeNode:
    """One node of the site tree: its contiguous sites ``[start, stop)`` and its children."""

    start: int
    stop: int
    children: tuple[int, int] | None  # indices into the node list; None for a leaf

    @property
    def is_leaf(self) -> bool:
        return self.children is None

    @property
    def sites(self) -> range:
        return range(self.start, self.stop)


@lru_cache(maxsize=64)
def binary_tree(n_sites: int) -> tuple[TreeNode, ...]:
    """Balanced binary tree over ``n_sites`` leaves, nodes in post-order (root last)."""
    if n_sites < 1:
        raise ArgumentError(f"n_sites must be >= 1, got {n_sites}")
    nodes: list[TreeNode] = []

    def build(start: int, stop: int) -> int:
        if stop - start == 1:
            nodes.append(TreeNode(start, stop, None))
        else:
            mid = start + math.ceil((stop - start) / 2)
            left = build(start, mid)
            right = build(mid, stop)
            nodes.append(TreeNode(start, stop, (left, right)))
        return len(nodes) - 1

    build(0, n_sites)
    return tuple(nodes)
