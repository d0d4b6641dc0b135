"""Cross-layer networks: one tensor network for a group of same-role layers in consecutive blocks.

The weights ``W_l`` ``(out, in)`` of a group of ``G`` layers (say ``q_proj`` of blocks 8-11) are
one tensor ``W[l, o, i]`` with a *layer leg* ``l``. It is cut as a three-node tree::

    W_l[o, i] = sum_{a, b} U[o, a] C_l[a, b] V[b, i]

    V  (in_rank, in)     the input basis, shared by the group   (the node of the input leg)
    U  (out, out_rank)   the output basis, shared by the group  (the node of the output leg)
    C_l                  the core of layer l                    (the node that holds the layer leg)

Either basis may be absent (the identity): with the input basis alone this is Basis Sharing
(Wang et al., arXiv 2410.03765), ``W_l = C_l V``; with the output basis alone ``W_l = U C_l``;
with both, a Tucker-2 decomposition of the stacked weights. At full ranks (``in_rank = in`` and
``out_rank = out``, or the ranks of the stacked weights) every layer is reproduced exactly.

Each block keeps its own drop-in :class:`CrossLayerLinear`; all members of a group hold *the
same* :class:`SharedBases` submodule, so the shared tensors are one ``nn.Parameter`` each:
training updates them once, ``.to()`` moves them once, and ``model.parameters()`` lists them
once (as Hugging Face does for tied embeddings).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError

__all__ = ["SIDES", "CrossLayerLinear", "SharedBases"]

#: Which bases a group shares: ``"input"`` (``W_l = C_l V``), ``"output"`` (``W_l = U C_l``) or
#: ``"both"`` (``W_l = U C_l V``).
SIDES = ("input", "output", "both")


class SharedBases(nn.Module):
    """The tensors a group shares: ``in_basis`` ``(in_rank, in)`` and/or ``out_basis``
    ``(out, out_rank)`` (``None`` where that side is not shared)."""

    def __init__(self, in_features: int, out_features: int, in_rank: int | None,
                 out_rank: int | None, group_size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        if in_rank is None and out_rank is None:
            raise ArgumentError("a cross-layer group shares at least one basis (in_rank or "
                                "out_rank)")
        for name, value, top in (("in_rank", in_rank, in_features),
                                 ("out_rank", out_rank, out_features)):
            if value is not None and not (isinstance(value, int) and 1 <= value <= top):
                raise ArgumentError(f"{name} must be an integer in [1, {top}], got {value!r}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ArgumentError(f"group_size must be an integer >= 1, got {group_size!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.in_basis = (nn.Parameter(torch.empty(in_rank, in_features, **kw))
                         if in_rank is not None else None)
        self.out_basis = (nn.Parameter(torch.empty(out_features, out_rank, **kw))
                          if out_rank is not None else None)

    @property
    def side(self) -> str:
        if self.in_basis is not None and self.out_basis is not None:
            return "both"
        return "input" if self.in_basis is not None else "output"

    @property
    def core_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of each member's core ``C_l``."""
        rows = self.out_basis.shape[1] if self.out_basis is not None else self.out_features
        cols = self.in_basis.shape[0] if self.in_basis is not None else self.in_features
        return rows, cols

    def extra_repr(self) -> str:
        return (f"side={self.side}, in_features={self.in_features}, "
                f"out_features={self.out_features}, core={self.core_shape}, "
                f"group_size={self.group_size}")


class CrossLayerLinear(nn.Module):
    """Drop-in for the ``nn.Linear`` of member ``index`` of a cross-layer group.

    ``forward(x)``: ``x`` ``(..., in)`` -> ``(..., out)``, as ``x V^T C_l^T U^T + bias``: one
    matmul per node, no einsum.
    """

    def __init__(self, shared: SharedBases, index: int, bias: bool = True, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        if not isinstance(shared, SharedBases):
            raise ArgumentError(f"shared must be a SharedBases, got {type(shared).__name__}")
        if not (isinstance(index, int) and 0 <= index < shared.group_size):
            raise ArgumentError(f"index must be in [0, {shared.group_size}), got {index!r}")
        if dtype is None or device is None:
            ref = shared.in_basis if shared.in_basis is not None else shared.out_basis
            device, dtype = device or ref.device, dtype or ref.dtype
        self.shared = shared
        self.index = index
        self.in_features, self.out_features = shared.in_features, shared.out_features
        self.core = nn.Parameter(torch.empty(*shared.core_shape, device=device, dtype=dtype))
        self.bias = (nn.Parameter(torch.zeros(shared.out_features, device=device, dtype=dtype))
                     if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        shared = self.shared
        if shared.in_basis is not None:
            x = F.linear(x, shared.in_basis)
        if shared.out_basis is None:
            return F.linear(x, self.core, self.bias)
        return F.linear(F.linear(x, self.core), shared.out_basis, self.bias)

    def to_dense(self) -> Tensor:
        """This member's weight ``U C_l V`` ``(out, in)``."""
        w = self.core
        if self.shared.in_basis is not None:
            w = w @ self.shared.in_basis
        if self.shared.out_basis is not None:
            w = self.shared.out_basis @ w
        return w

    @property
    def weight(self) -> Tensor:
        """The dense weight ``(out, in)``, rebuilt on every access (for code that reads it)."""
        return self.to_dense()

    @property
    def own_parameters(self) -> int:
        """Parameters of this member alone (core and bias), without the shared bases."""
        return self.core.numel() + (self.bias.numel() if self.bias is not None else 0)

    @property
    def shared_parameters(self) -> int:
        """Parameters of the group's shared bases (held once for the whole group)."""
        return sum(p.numel() for p in self.shared.parameters())

    def layout(self, group: str) -> dict[str, Any]:
        """What :func:`from_layout` needs; ``group`` names the group (its first member)."""
        rows, cols = self.shared.core_shape
        return {"kind": "cross-layer", "group": group, "index": self.index,
                "group_size": self.shared.group_size, "side": self.shared.side,
                "in_features": self.in_features, "out_features": self.out_features,
                "in_rank": cols if self.shared.in_basis is not None else None,
                "out_rank": rows if self.shared.out_basis is not None else None,
                "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any], shared: SharedBases | None = None, *,
                    device=None, dtype=None) -> CrossLayerLinear:
        """An uninitialised member of the saved layout; ``shared`` is the group's bases (built
        from the layout when ``None``, for the group's first member)."""
        if shared is None:
            shared = SharedBases(layout["in_features"], layout["out_features"],
                                 layout["in_rank"], layout["out_rank"], layout["group_size"],
                                 device=device, dtype=dtype)
        return cls(shared, layout["index"], layout["bias"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"index={self.index}, bias={self.bias is not None}")


def cross_layer_members(model: nn.Module) -> dict[str, CrossLayerLinear]:
    """Every :class:`CrossLayerLinear` of ``model`` by qualified name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CrossLayerLinear)}


def group_names(members: dict[str, CrossLayerLinear]) -> dict[str, str]:
    """Member name -> its group's name (the name of the group's first member in model order)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(m.shared), n) for n, m in members.items()}
