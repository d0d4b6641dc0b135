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
same* :class:`SharedBases` submodule, so each shared basis is one ``nn.Linear`` (``input``,
``output``): training updates it once, ``.to()`` moves it once, and ``model.parameters()``
lists it once (as Hugging Face does for tied embeddings). A member's own core is an
``nn.Linear`` too (``mix``), and every part is *called*, so the tools that act on
``nn.Linear`` (torchao, peft) and on module calls (accelerate's offload hooks) reach them.

*Kept rows* (input side only). ``W_l = C_l V`` is unchanged by ``C_l -> C_l G^-1``,
``V -> G V`` for any invertible ``r x r`` matrix ``G``, one for the whole group. Taking ``G =
C[R]``, ``r`` rows of the stacked cores ``C = [C_1; ...; C_G]`` (``G out x r``), turns those rows
into rows of the identity, which need not be stored: the group keeps ``r (in + G out - r)``
parameters instead of ``r (in + G out)``, the saving a low-rank layer gets from
:class:`~tensornet_llm.layers.low_rank.KeptRowsLinear`, once per group.
:func:`kept_rows_gauge` chooses ``R`` by maxvol, so the other rows' coefficients stay near or
below 1. A member whose layer holds some of the rows ``R`` computes them by reading the shared
coordinates ``z = x V^T`` directly: ``y = [z[kept], z core^T][row_order]``.

State-dict keys of earlier versions (``shared.in_basis``, ``shared.out_basis``, ``core``) load
into the modules (``shared.input.weight``, ``shared.output.weight``, ``mix.weight``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from .base import dequantized
from .maxvol import index_buffer, kept_row_order, maxvol_rows, on_device

__all__ = ["SIDES", "CrossLayerLinear", "SharedBases", "kept_rows_gauge", "plain_members"]

#: Which bases a group shares: ``"input"`` (``W_l = C_l V``), ``"output"`` (``W_l = U C_l``) or
#: ``"both"`` (``W_l = U C_l V``).
SIDES = ("input", "output", "both")


class SharedBases(nn.Module):
    """The bases a group shares: ``input``, an ``nn.Linear(in, in_rank)`` whose weight is ``V``
    ``(in_rank, in)``, and/or ``output``, an ``nn.Linear(out_rank, out)`` whose weight is ``U``
    ``(out, out_rank)`` (``None`` where that side is not shared); both without bias."""

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
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.input = nn.Linear(in_features, in_rank, **kw) if in_rank is not None else None
        self.output = nn.Linear(out_rank, out_features, **kw) if out_rank is not None else None
        self._register_load_state_dict_pre_hook(_legacy_names, with_module=True)

    @property
    def in_basis(self) -> Tensor | None:
        """``V`` ``(in_rank, in)``, the input basis's weight (``None``: not shared)."""
        return None if self.input is None else self.input.weight

    @property
    def out_basis(self) -> Tensor | None:
        """``U`` ``(out, out_rank)``, the output basis's weight (``None``: not shared)."""
        return None if self.output is None else self.output.weight

    @property
    def side(self) -> str:
        if self.input is not None and self.output is not None:
            return "both"
        return "input" if self.input is not None else "output"

    @property
    def core_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of each member's core ``C_l``."""
        rows = self.output.in_features if self.output is not None else self.out_features
        cols = self.input.out_features if self.input is not None else self.in_features
        return rows, cols

    def extra_repr(self) -> str:
        return (f"side={self.side}, in_features={self.in_features}, "
                f"out_features={self.out_features}, core={self.core_shape}, "
                f"group_size={self.group_size}")


def _legacy_names(module, state_dict, prefix, *_args) -> None:
    """Earlier versions held the bases and a member's core as bare parameters: rename
    ``in_basis``, ``out_basis`` and ``core`` keys of a state dict being loaded."""
    for old, new in (("in_basis", "input.weight"), ("out_basis", "output.weight"),
                     ("core", "mix.weight")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class CrossLayerLinear(nn.Module):
    """Drop-in for the ``nn.Linear`` of member ``index`` of a cross-layer group.

    ``forward(x)``: ``x`` ``(..., in)`` -> ``(..., out)``, as ``x V^T C_l^T U^T + bias``: the
    shared ``input`` basis, the member's ``mix`` (``C_l``, an ``nn.Linear(cols, rows)``), the
    shared ``output`` basis, then the bias, each an ``nn.Linear`` call. With ``kept`` (input
    side only; module docs), some rows of ``C_l`` are rows of the identity and are not stored:
    ``kept`` ``(k,)`` says which shared coordinates they pick, ``mix`` holds the other
    ``out - k`` rows, and ``row_order`` ``(out,)`` says where each output row sits in
    ``[kept rows, mix rows]``.
    """

    def __init__(self, shared: SharedBases, index: int, bias: bool = True, *,
                 kept: Sequence[int] | Tensor | None = None,
                 row_order: Sequence[int] | Tensor | None = None, device=None,
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
        rows, cols = shared.core_shape
        order = None
        if (kept is None) != (row_order is None):
            raise ArgumentError("kept and row_order go together: give both or neither")
        if kept is not None:
            if shared.side != "input":
                raise ArgumentError(f"kept rows need a group sharing only its input basis, "
                                    f"got side={shared.side!r}")
            kept = torch.as_tensor(kept, dtype=torch.long).reshape(-1)
            order = torch.as_tensor(row_order, dtype=torch.long).reshape(-1)
            if kept.numel() > min(rows, cols) or len(set(kept.tolist())) != kept.numel() or (
                    kept.numel() and not 0 <= int(kept.min()) <= int(kept.max()) < cols):
                raise ArgumentError(f"kept must hold at most {min(rows, cols)} distinct shared "
                                    f"coordinates in [0, {cols})")
            if sorted(order.tolist()) != list(range(rows)):
                raise ArgumentError(f"row_order must be a permutation of range({rows})")
            rows -= kept.numel()
            kept, order = index_buffer(kept, device), index_buffer(order, device)
        self.register_buffer("kept", kept, persistent=False)
        self.register_buffer("row_order", order, persistent=False)
        self.mix = nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
        self.bias = (nn.Parameter(torch.zeros(shared.out_features, device=device, dtype=dtype))
                     if bias else None)
        self._register_load_state_dict_pre_hook(_legacy_names, with_module=True)

    @property
    def core(self) -> Tensor:
        """``C_l`` without its kept rows ``(rows - k, cols)``: ``mix``'s weight."""
        return self.mix.weight

    def _indices(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``kept`` and ``row_order`` on ``device`` (a model loaded from ``meta`` keeps them on
        the CPU until it is moved)."""
        return on_device(self.kept, device), on_device(self.row_order, device)

    def forward(self, x: Tensor) -> Tensor:
        shared = self.shared
        z = x if shared.input is None else shared.input(x)
        if self.kept is not None:  # z = x V^T: its kept coordinates are output rows as they are
            kept, order = self._indices(z.device)
            y = torch.cat([z.index_select(-1, kept), self.mix(z)], dim=-1).index_select(-1, order)
        else:
            y = self.mix(z)
            if shared.output is not None:
                y = shared.output(y)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def full_core(self) -> Tensor:
        """``C_l`` ``(rows, cols)`` of :attr:`SharedBases.core_shape`, its kept rows included
        (``core`` itself without kept rows)."""
        core = dequantized(self.core)
        if self.kept is None:
            return core
        kept, order = self._indices(core.device)
        eye = torch.eye(core.shape[1], dtype=core.dtype, device=core.device)
        return torch.cat([eye.index_select(0, kept), core]).index_select(0, order)

    def to_dense(self) -> Tensor:
        """This member's weight ``U C_l V`` ``(out, in)``."""
        w = self.full_core()
        for basis, left in ((self.shared.in_basis, False), (self.shared.out_basis, True)):
            if basis is not None:
                w = dequantized(basis) @ w if left else w @ dequantized(basis)
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
                "bias": self.bias is not None,
                "kept": None if self.kept is None else self.kept.tolist(),
                "row_order": None if self.row_order is None else self.row_order.tolist()}

    @classmethod
    def from_layout(cls, layout: dict[str, Any], shared: SharedBases | None = None, *,
                    device=None, dtype=None) -> CrossLayerLinear:
        """An uninitialised member of the saved layout; ``shared`` is the group's bases (built
        from the layout when ``None``, for the group's first member)."""
        if shared is None:
            shared = SharedBases(layout["in_features"], layout["out_features"],
                                 layout["in_rank"], layout["out_rank"], layout["group_size"],
                                 device=device, dtype=dtype)
        return cls(shared, layout["index"], layout["bias"], kept=layout.get("kept"),
                   row_order=layout.get("row_order"), device=device, dtype=dtype)

    def extra_repr(self) -> str:
        kept = "" if self.kept is None else f", kept={self.kept.numel()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"index={self.index}, bias={self.bias is not None}{kept}")


def kept_rows_gauge(in_basis: Tensor, cores: Sequence[Tensor],
                    ) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """The same group ``W_l = C_l V`` in the kept-rows gauge (module docs).

    Args:
        in_basis: the shared input basis ``V`` ``(r, in)``.
        cores: every member's core ``C_l`` ``(out, r)``, in member order; ``r <= G out``.

    Returns:
        ``V' = C[R] V`` ``(r, in)`` and, per member, ``(kept, row_order, core)``: the shared
        coordinates ``(k_l,)`` that are its output rows ``R_l``, where each output row sits in
        ``[R_l, other rows]`` ``(out,)``, and its other rows of ``C C[R]^-1``
        ``(out - k_l, r)`` (entries of magnitude about 1 or less). Computed in float64.

    Raises:
        RankDeficientError: (from :func:`maxvol_rows`) the stacked cores have rank below
            ``r`` (some shared direction is used by no member), so no ``r`` of their rows are
            invertible.
    """
    out_f, r = cores[0].shape
    stacked = torch.cat([c.detach().double() for c in cores])  # (G out, r)
    if r > stacked.shape[0]:
        raise ArgumentError(f"kept rows need in_rank <= {stacked.shape[0]} (group size times "
                            f"out_features), got {r}")
    rows, combined = maxvol_rows(stacked)  # combined = C C[R]^-1, the identity on rows R
    rows = rows.to(stacked.device)
    basis = stacked[rows] @ in_basis.detach().double()
    members = []
    for index in range(len(cores)):
        mine = torch.nonzero((rows >= index * out_f) & (rows < (index + 1) * out_f)).flatten()
        local = rows[mine] - index * out_f  # this member's output rows among R
        others, order = kept_row_order(local, out_f)
        block = combined[index * out_f:(index + 1) * out_f]
        members.append((mine, order, block[others]))
    return basis, members


@torch.no_grad()
def plain_members(members: Sequence[CrossLayerLinear]) -> list[CrossLayerLinear]:
    """Members of one group with no kept rows: the same maps, the shared input basis made
    orthonormal (``V' = R^T Q^T``, ``V = Q^T``, each core ``C_l R^T``), the form
    :func:`~tensornet_llm.train.quantize.quantize` rounds. New modules sharing one new
    :class:`SharedBases`, in the originals' dtype and device (members left out keep the old
    one, and compute what they did); a group with no kept rows comes back as it is."""
    if not members:
        return []
    shared = members[0].shared
    if any(m.shared is not shared for m in members):
        raise ArgumentError("plain_members takes members of one group (one SharedBases)")
    if all(m.kept is None for m in members):
        return list(members)
    basis = shared.in_basis
    q, r = torch.linalg.qr(basis.detach().double().T)  # V'^T = Q R
    new_shared = SharedBases(shared.in_features, shared.out_features, basis.shape[0], None,
                             shared.group_size, device=basis.device, dtype=basis.dtype)
    new_shared.in_basis.copy_(q.T)
    new_shared.in_basis.requires_grad_(basis.requires_grad)
    out = []
    for member in members:
        new = CrossLayerLinear(new_shared, member.index, member.bias is not None,
                               device=basis.device, dtype=member.core.dtype)
        new.core.copy_(member.full_core().double() @ r.T)
        new.core.requires_grad_(member.core.requires_grad)
        if member.bias is not None:
            new.bias.copy_(member.bias)
            new.bias.requires_grad_(member.bias.requires_grad)
        new.train(member.training)
        out.append(new)
    return out


def cross_layer_members(model: nn.Module) -> dict[str, CrossLayerLinear]:
    """Every :class:`CrossLayerLinear` of ``model`` by qualified name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CrossLayerLinear)}


def group_names(members: dict[str, CrossLayerLinear]) -> dict[str, str]:
    """Member name -> its group's name (the name of the group's first member in model order)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(m.shared), n) for n, m in members.items()}
