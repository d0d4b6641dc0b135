"""Low-rank layers that read the same input, run as one input-side matmul.

The query, key and value projections of an attention block read one tensor, as do the gate and
up projections of a gated MLP. When they are low-rank (``W_k = U_k V_k``, ``V_k`` of shape
``(r_k, in)``), their input sides can run as one matmul with the stacked
``V = [V_1; V_2; ...]`` of shape ``(r_1 + r_2 + ..., in)``: one call instead of several, and one
larger matvec at decode instead of several thin ones. Each layer then finishes with its own
``U_k`` on its slice of the result.

A :class:`SiblingGroup` owns the stacked ``V``; the members' own ``V`` parameters become views
into it, so the weights are stored once, stay where ``state_dict``, optimisers and in-place
edits expect them, and any edit is seen by the fused product. The first member (in the order
the model calls them) computes the product for all and keeps it with its input; the others take
their slice when they are called with that very tensor; the last one drops it. Any other call
(another input, a member called alone, gradients on, inside ``torch.compile``) runs the member's
own two matmuls, so fusion changes speed only, never results beyond float rounding.

Fusion is a property of the live model: a copy (``copy.deepcopy``, pickling) runs unfused, and
after ``.to()`` or new cores the group re-stacks itself at the next call.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import Tensor, nn

from .contract import linear_mv

__all__ = ["SiblingGroup", "is_fusable", "can_stack"]


def is_fusable(module: nn.Module) -> bool:
    """Whether ``module`` can join a :class:`SiblingGroup`: a float low-rank layer
    (:attr:`MPOLinear.is_low_rank <tensornet_llm.layers.mpo.MPOLinear.is_low_rank>`) whose
    input side reads its input in order (no ``input_order``)."""
    return (bool(getattr(module, "is_low_rank", False)) and hasattr(module, "cores")
            and getattr(module, "input_order", None) is None)


def can_stack(members: Sequence[nn.Module]) -> bool:
    """Whether ``members`` can run as one stacked matmul now: all :func:`is_fusable`, with one
    ``in_features``, and input sides on one device in one dtype."""
    return all(map(is_fusable, members)) and len(
        {(m.in_features, m.cores[1].device, m.cores[1].dtype) for m in members}) == 1


def _unfused() -> None:
    return None


class SiblingGroup:
    """Low-rank layers that read the same input tensor, in the order the model calls them.

    Args:
        members: two or more low-rank layers (:func:`is_fusable`) with the same
            ``in_features``, device and dtype.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        members = list(members)
        if len(members) < 2 or not all(map(is_fusable, members)):
            raise ValueError("a sibling group needs two or more low-rank layers")
        if len({m.in_features for m in members}) != 1:
            raise ValueError("siblings must read inputs of one size (in_features differ)")
        self._members = [weakref.ref(m) for m in members]
        self._x: Tensor | None = None
        self._z: Tensor | None = None
        self._stack()
        for index, member in enumerate(members):
            member._siblings, member._sibling_index = self, index

    # Copies of a model run unfused (the members of a copy are other modules).
    def __reduce__(self):
        return (_unfused, ())

    def __deepcopy__(self, memo) -> None:
        return None

    @property
    def ranks(self) -> list[int]:
        """Each member's rank ``r_k`` (its rows of the stacked ``V``)."""
        return list(self._ranks)

    def members(self) -> list[nn.Module]:
        """The member layers still alive, in call order."""
        return [m for m in (ref() for ref in self._members) if m is not None]

    def _rights(self, members: Sequence[nn.Module]) -> list[Tensor]:
        return [m.cores[1] for m in members]  # (r_k, 1, in, 1): the input side V_k

    def _stack(self) -> bool:
        """Stack the members' ``V`` into one tensor and make each a view into it; False (and
        nothing stacked) when a member is gone or they no longer share a device and dtype."""
        members = self.members()
        self._stacked = None
        if len(members) != len(self._members):
            return False
        if not can_stack(members):
            return False
        rights = self._rights(members)
        n_in = members[0].in_features
        self._ranks = [int(v.shape[0]) for v in rights]
        self._offsets = [sum(self._ranks[:k]) for k in range(len(rights))]
        # Ordinary tensors even when first called under inference_mode: the members' parameters
        # become views into this one and must still train afterwards.
        with torch.inference_mode(False), torch.no_grad():
            stacked = torch.cat([v.detach().reshape(r, n_in) for v, r in zip(rights, self._ranks)])
        for v, start, r in zip(rights, self._offsets, self._ranks):
            v.data = stacked[start:start + r].view(v.shape)
        self._stacked = stacked
        self._pointers = [v.data_ptr() for v in rights]
        return True

    def _current(self) -> bool:
        """Whether every member's ``V`` is still its view into the stacked tensor."""
        if self._stacked is None:
            return False
        for ref, pointer in zip(self._members, self._pointers):
            member = ref()
            if member is None or member.cores[1].data_ptr() != pointer:
                return False
        return True

    def input_side(self, index: int, x: Tensor) -> Tensor | None:
        """``x V_index^T`` ``(..., r_index)`` from the shared product, or ``None`` when member
        ``index`` must run alone (see the module docs)."""
        if index == 0:
            if not self._current() and not self._stack():
                self._x = self._z = None
                return None
            self._x, self._z = x, linear_mv(x, self._stacked)
        elif x is not self._x or self._z is None:
            return None
        z = self._z.narrow(-1, self._offsets[index], self._ranks[index])
        if index == len(self._members) - 1:
            self._x = self._z = None
        return z

    def dissolve(self) -> None:
        """Give every member its own ``V`` again (copied out of the stacked tensor) and leave
        the group."""
        for member in self.members():
            if getattr(member, "_siblings", None) is self:
                v = member.cores[1]
                if self._stacked is not None and v.data_ptr() in self._pointers:
                    v.data = v.data.clone()
                member._siblings = None
        self._stacked = self._x = self._z = None
