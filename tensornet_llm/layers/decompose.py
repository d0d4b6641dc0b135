"""Decompose a dense matrix into tensor-network cores by truncated SVD (pure functions).

Conventions shared with :mod:`tensornet_llm.layers.contract`: the matrix ``W`` has shape
``(out, in)`` with ``out = prod(out_shape)``, ``in = prod(in_shape)`` and row-major multi-indices
(site 1 most significant).  Site ``k`` carries the pair of physical legs ``(o_k, i_k)`` of
combined size ``d_k = o_k * i_k``.

* :func:`tt_svd` -- matrix product operator (tensor train) by sequential truncated SVD,
  cores ``(r_{k-1}, o_k, i_k, r_k)`` with ``r_0 = r_N = 1``.
* :func:`ht_svd` -- tree tensor network (hierarchical Tucker) by truncated SVD of each node's
  matricization of the original tensor, node layout as in :mod:`tensornet_llm.layers.tree`.

Both keep at most ``chi`` singular values per bond, or fewer where a relative tolerance ``tol``
allows, and return the kept and discarded singular values of every bond. Both satisfy
``||W - W_hat||_F^2 <= sum over bonds of the discarded singular values squared``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .tree import TreeNode, binary_tree

__all__ = [
    "BondSpectrum",
    "tt_svd",
    "ht_svd",
    "mpo_bond_dims",
    "ttns_bond_dims",
    "site_major",
]


@dataclass
class BondSpectrum:
    """Singular values across one bond: those kept in the network and those truncated away.

    Attributes:
        kept: ``(r,)`` descending.
        discarded: ``(m - r,)`` descending.
    """

    kept: Tensor
    discarded: Tensor

    @property
    def rank(self) -> int:
        return int(self.kept.numel())

    @property
    def values(self) -> Tensor:
        """All singular values, kept then discarded."""
        return torch.cat([self.kept, self.discarded])

    def discarded_weight(self) -> float:
        """Sum of the discarded singular values squared (this bond's share of the error bound)."""
        return float(self.discarded.double().pow(2).sum())

    def entropy(self, normalised: bool = True) -> float:
        """Entanglement (von Neumann) entropy ``-sum p log p`` with ``p = s^2 / sum s^2``.

        With ``normalised`` the entropy is divided by its maximum ``log(m)`` for ``m`` values,
        giving a number in ``[0, 1]`` comparable across bonds of different size.
        """
        s2 = self.values.double().pow(2)
        total = s2.sum()
        if total <= 0 or s2.numel() < 2:
            return 0.0
        p = s2[s2 > 0] / total
        h = float(-(p * p.log()).sum())
        return h / math.log(s2.numel()) if normalised else h


def site_major(weight: Tensor, out_shape: Sequence[int], in_shape: Sequence[int]) -> Tensor:
    """View ``W (out, in)`` as a tensor ``(o_1, i_1, o_2, i_2, ..., o_N, i_N)``."""
    n = len(out_shape)
    t = weight.reshape(*out_shape, *in_shape)
    perm = [p for k in range(n) for p in (k, n + k)]
    return t.permute(perm)


def _error_budget(weight: Tensor, tol: float | None, n_bonds: int) -> float | None:
    """Per-bond squared error allowed so that the total relative error stays below ``tol``."""
    if tol is None or n_bonds == 0:
        return None
    return float(tol) ** 2 * float(weight.double().pow(2).sum()) / n_bonds


def _choose_rank(s: Tensor, chi: int, budget_sq: float | None) -> int:
    """Largest kept rank ``<= chi``, reduced to the smallest one whose tail fits the budget."""
    rank = min(chi, s.numel())
    if budget_sq is not None and s.numel() > 0:
        s2 = s.double().pow(2)
        # tail[k] = sum_{j >= k} s_j^2 : the error of keeping k values.
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
        fits = torch.nonzero(tail <= budget_sq).flatten()
        rank = min(rank, max(1, int(fits[0])))
    return max(rank, 1)


def _svd(mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``mat = U diag(S) V^T``. A matrix at least four times wider (taller) than it is
    tall (wide), as the first unfoldings of TT-SVD are, is reduced by QR first: LAPACK's SVD of
    the small triangular factor plus the QR is several times faster than SVD of the whole."""
    rows, cols = mat.shape
    if cols >= 4 * rows:  # mat^T = Q R, so mat = R^T Q^T and SVD(R^T) = U S W^T gives V^T = W^T Q^T
        q, r = torch.linalg.qr(mat.mT)
        u, s, wh = torch.linalg.svd(r.mT, full_matrices=False)
        return u, s, wh @ q.mT
    if rows >= 4 * cols:  # mat = Q R and SVD(R) = W S V^T gives U = Q W
        q, r = torch.linalg.qr(mat)
        w, s, vh = torch.linalg.svd(r, full_matrices=False)
        return q @ w, s, vh
    return torch.linalg.svd(mat, full_matrices=False)


def mpo_bond_dims(site_dims: Sequence[int], chi: int) -> list[int]:
    """Bond dimensions of an MPO at cap ``chi``: ``r_k = min(chi, prod d_<=k, prod d_>k)``.

    These are exactly the ranks :func:`tt_svd` keeps without ``tol``.
    """
    out = []
    for k in range(1, len(site_dims)):
        left = math.prod(site_dims[:k])
        right = math.prod(site_dims[k:])
        out.append(min(chi, left, right))
    return out


def ttns_bond_dims(site_dims: Sequence[int], chi: int) -> list[int]:
    """Bond dimension above every non-root node of :func:`binary_tree` (post-order).

    ``r_t = min(chi, n_t, n / n_t)`` with ``n_t`` the product of the node's site dimensions;
    exactly the ranks :func:`ht_svd` keeps without ``tol``.
    """
    total = math.prod(site_dims)
    tree = binary_tree(len(site_dims))
    out = []
    for node in tree[:-1]:
        n_t = math.prod(site_dims[node.start : node.stop])
        out.append(min(chi, n_t, total // n_t))
    return out


def tt_svd(
    weight: Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    chi: int,
    tol: float | None = None,
) -> tuple[list[Tensor], list[BondSpectrum]]:
    """Matrix product operator of ``weight`` by sequential truncated SVD (TT-SVD).

    Args:
        weight: ``(prod(out_shape), prod(in_shape))``; decomposed in its own dtype (pass float32
            or float64).
        chi: maximum bond dimension.
        tol: optional relative Frobenius tolerance; each of the ``N-1`` bonds may discard
            ``tol^2 ||W||^2 / (N-1)`` of squared singular values, so ``||W - W_hat|| <= tol ||W||``.

    Returns:
        ``cores`` with shapes ``(r_{k-1}, o_k, i_k, r_k)`` and one :class:`BondSpectrum` per bond.
    """
    n = len(out_shape)
    dims = [o * i for o, i in zip(out_shape, in_shape)]
    budget = _error_budget(weight, tol, n - 1)
    rest = site_major(weight, out_shape, in_shape).reshape(1, -1)
    cores: list[Tensor] = []
    spectra: list[BondSpectrum] = []
    r_prev = 1
    for k in range(n - 1):
        u, s, vh = _svd(rest.reshape(r_prev * dims[k], -1))
        r = _choose_rank(s, chi, budget)
        cores.append(u[:, :r].reshape(r_prev, out_shape[k], in_shape[k], r))
        spectra.append(BondSpectrum(s[:r].clone(), s[r:].clone()))
        rest = s[:r, None] * vh[:r]  # carry S V^T into the next site
        r_prev = r
    cores.append(rest.reshape(r_prev, out_shape[-1], in_shape[-1], 1))
    return [c.contiguous() for c in cores], spectra


def ht_svd(
    weight: Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    chi: int,
    tol: float | None = None,
) -> tuple[list[Tensor], list[BondSpectrum]]:
    """Tree tensor network of ``weight`` by hierarchical truncated SVD (HT-SVD).

    For every non-root node ``t`` the leading ``r_t`` left singular vectors ``U_t`` of the
    matricization ``W^(t)`` (rows: the sites under ``t``) are kept. Leaves store ``U_t``; an
    internal node stores ``(U_left x U_right)^T U_t`` as ``(r_left, r_right, r_t)``; the root
    stores ``(U_left x U_right)^T vec(W)`` as ``(r_left, r_right)``.  The result is the orthogonal
    projection of ``W`` onto the nested subspaces, with error bounded by the discarded weight
    summed over all bonds (Grasedyck 2010, Thm. 3.11).

    Returns:
        node tensors in the order of :func:`binary_tree` (see :mod:`tensornet_llm.layers.tree` for leg
        order) and one :class:`BondSpectrum` per non-root node (the bond to its parent).
    """
    n = len(out_shape)
    dims = [o * i for o, i in zip(out_shape, in_shape)]
    tree: tuple[TreeNode, ...] = binary_tree(n)
    full = site_major(weight, out_shape, in_shape).reshape(dims)
    if n == 1:
        return [full.reshape(out_shape[0], in_shape[0]).contiguous()], []
    budget = _error_budget(weight, tol, len(tree) - 1)
    bases: list[Tensor] = []  # U_t per node, (n_t, r_t)
    tensors: list[Tensor] = []
    spectra: list[BondSpectrum] = []
    for node in tree:
        if node.children is not None:
            left, right = node.children
            ul, ur = bases[left], bases[right]
            n_l, n_r = ul.shape[0], ur.shape[0]
        if node is tree[-1]:  # root: project W onto the children's bases
            block = full.reshape(n_l, n_r)
            tensors.append(torch.einsum("lr,la,rb->ab", block, ul, ur).contiguous())
            break
        before = math.prod(dims[: node.start])
        inside = math.prod(dims[node.start : node.stop])
        mat = full.reshape(before, inside, -1).transpose(0, 1).reshape(inside, -1)
        u, s, _ = _svd(mat)
        r = _choose_rank(s, chi, budget)
        u = u[:, :r]
        spectra.append(BondSpectrum(s[:r].clone(), s[r:].clone()))
        bases.append(u)
        if node.is_leaf:
            k = node.start
            tensors.append(u.reshape(out_shape[k], in_shape[k], r).contiguous())
        else:
            coupling = torch.einsum("lrt,la,rb->abt", u.reshape(n_l, n_r, r), ul, ur)
            tensors.append(coupling.contiguous())
    return tensors, spectra
