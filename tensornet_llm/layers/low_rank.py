"""The rank-``r`` layer as two ordinary ``nn.Linear``: plain factors, or kept rows.

A weight of rank ``r``, ``W = U V`` (``U (out, r)``, ``V (r, in)``), runs as two standard
linears, so every tool that handles ``nn.Linear`` (torchao, peft's LoRA and ``all-linear``,
accelerate's hooks, both ONNX exporters, ``torch.export``) handles the factors as they are.
Two storages of the same weight:

:class:`LowRankLinear`, ``r (in + out)`` parameters::

    first  = Linear(in, r, bias=False)    holds V
    second = Linear(r, out)               holds U and the bias

:class:`KeptRowsLinear`, ``r (in + out - r)`` parameters. ``W`` is fixed by ``r`` of its rows
``R`` (an interpolative decomposition): with ``U[R]`` invertible, ``W = P^T [I; Y] W[R]``, where
``Y = U[R'] U[R]^-1`` expresses every other row ``R'`` through the kept ones::

    kept   = Linear(in, r)                holds W[R] and b[R]: its outputs are output features R
    others = Linear(r, out - r)           holds Y and b[R'] - Y b[R]: the features R' from them
    order  (out,) buffer                  where each output feature sits in [kept, others]

    y = [h, others(h)][order],  h = kept(x)

At a fixed parameter count the kept-rows storage allows a higher rank (keeping 80% of a
``576 x 1536`` weight: rank 417 instead of 335). The rows are chosen by maxvol
(:func:`~tensornet_llm.layers.maxvol.maxvol_rows`), so the entries of ``Y`` stay near or below
1. Where a layer's consumer reads its features in the stacked order ``[R, R']`` (a gated MLP
whose ``down_proj`` columns were permuted to match: :func:`~tensornet_llm.share_mlp_rows`),
``order`` is ``None`` and the layer returns ``[h, others(h)]`` as it is.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, RankDeficientError
from .base import check_int, dequantized
from .maxvol import inverse, kept_row_order, maxvol_rows

__all__ = ["FactoredLinear", "LowRankLinear", "KeptRowsLinear", "balanced_factors", "zero_padded"]


def _check_sizes(in_features: int, out_features: int, rank: int) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features),
                        ("rank", rank)):
        check_int(name, value, 1)
    if rank > min(in_features, out_features):
        raise ArgumentError(f"rank must be at most min(in_features, out_features) = "
                            f"{min(in_features, out_features)}, got {rank}")


class FactoredLinear(nn.Module):
    """What the two storages share: sizes, the dense weight they represent, bookkeeping and a
    JSON layout. Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``."""

    method: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        _check_sizes(in_features, out_features, rank)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(U, V, b)`` with ``W = U V``: ``U (out, r)``, ``V (r, in)``, bias ``(out,)`` or
        ``None``, all in output order (differentiable)."""
        raise NotImplementedError

    @property
    def bias(self) -> Tensor | None:
        """The bias ``(out,)`` in output order (differentiable; for code that reads
        ``layer.bias`` of a linear, as peft's DoRA does), or ``None``."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The weight this layer computes, ``(out_features, in_features)``."""
        u, v, _ = self.factors()
        return u @ v

    @property
    def weight(self) -> Tensor:
        """The dense weight, materialised on each access (model code reads ``layer.weight``,
        e.g. T5 for its dtype); not a parameter."""
        return self.to_dense()

    @property
    def bond_dims(self) -> tuple[int, ...]:
        return (self.rank,)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (same device and dtype)."""
        u, v, b = (t.detach() if t is not None else None for t in self.factors())
        linear = nn.Linear(self.in_features, self.out_features, b is not None,
                           device=v.device, dtype=v.dtype)
        with torch.no_grad():
            linear.weight.copy_(u @ v)
            if b is not None:
                linear.bias.copy_(b)
        return linear

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_parameters(self) -> int:
        """Parameters of the equivalent ``nn.Linear`` (weight plus bias)."""
        return self.in_features * self.out_features + (
            self.out_features if self.has_bias else 0)

    @property
    def compression_ratio(self) -> float:
        """Dense weight size over this layer's weight size (biases excluded)."""
        return self.in_features * self.out_features / sum(
            m.weight.numel() for m in self.children())

    @property
    def has_bias(self) -> bool:
        return any(m.bias is not None for m in self.children())

    def layout(self) -> dict[str, Any]:
        """Everything needed to rebuild this module's structure (JSON-serialisable)."""
        return {"method": self.method, "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank, "bias": self.has_bias}

    @classmethod
    def from_layout(cls, layout: dict[str, Any], device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> "FactoredLinear":
        """An uninitialised module of the structure :meth:`layout` describes."""
        options = {k: layout[k] for k in ("ordered",) if k in layout}
        return cls(layout["in_features"], layout["out_features"], layout["rank"],
                   bias=layout["bias"], device=device, dtype=dtype, **options)

    @classmethod
    def count_parameters(cls, in_features: int, out_features: int, chi: int,
                         n_sites: int | None = 2, bias: bool = True, **_: Any) -> int:
        """Parameters of the layer at rank ``chi`` (capped at ``min(in, out)``)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}")


class LowRankLinear(FactoredLinear):
    """``W = U V`` as ``second(first(x))``: ``first = Linear(in, r, bias=False)`` holds ``V``,
    ``second = Linear(r, out)`` holds ``U`` and the bias."""

    method = "low-rank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__(in_features, out_features, rank)
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return dequantized(self.second.weight), dequantized(self.first.weight), self.second.bias

    @property
    def bias(self) -> Tensor | None:
        return self.second.bias

    @classmethod
    def from_factors(cls, u: Tensor, v: Tensor, bias: Tensor | None) -> "LowRankLinear":
        """The layer ``W = u v`` (``u (out, r)``, ``v (r, in)``) with ``bias``, in ``v``'s
        device and dtype."""
        (out_f, r), in_f = u.shape, v.shape[1]
        layer = cls(in_f, out_f, r, bias is not None, device=v.device, dtype=v.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(v)
            layer.second.weight.copy_(u)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    @classmethod
    def count_parameters(cls, in_features: int, out_features: int, chi: int,
                         n_sites: int | None = 2, bias: bool = True, **_: Any) -> int:
        r = min(chi, in_features, out_features)
        return r * (in_features + out_features) + (out_features if bias else 0)

    def padded(self, multiple: int) -> "LowRankLinear":
        """The same map with the rank rounded up to a multiple of ``multiple`` (at most
        ``min(in, out)``): zero rows in ``first``, zero columns in ``second``, which reads
        nothing from them. What int8 kernels that take whole blocks of features need."""
        rank = min(-(-self.rank // multiple) * multiple, self.in_features, self.out_features)
        layer = LowRankLinear(self.in_features, self.out_features, rank, self.bias is not None,
                              device=self.first.weight.device, dtype=self.first.weight.dtype)
        layer.first = zero_padded(self.first, rank, self.in_features)
        layer.second = zero_padded(self.second, self.out_features, rank)
        return layer.train(self.training)


class KeptRowsLinear(FactoredLinear):
    """``W = P^T [I; Y] W[R]`` as ``[h, others(h)][order]``, ``h = kept(x)`` (module docs).

    Args:
        ordered: hold the ``order`` buffer and return features in output order; ``False``
            returns them in stacked order ``[R, R']`` (for a consumer that reads them so).
    """

    method = "kept-rows"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 ordered: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, rank)
        self.kept = nn.Linear(in_features, rank, bias=bias, device=device, dtype=dtype)
        self.others = nn.Linear(rank, out_features - rank, bias=bias, device=device,
                                dtype=dtype)
        order = torch.arange(out_features, device=device) if ordered else None
        self.register_buffer("order", order)

    def forward(self, x: Tensor) -> Tensor:
        h = self.kept(x)
        out = torch.cat([h, self.others(h)], dim=-1)
        if self.order is None:
            return out
        # gather, not index_select: on the CPU it is the vectorised column gather
        return out.gather(-1, self.order.expand_as(out))

    def stacked(self) -> Tensor:
        """The output feature at each stacked position (kept rows first): ``order``'s
        inverse, or the identity where the layer returns stacked order."""
        if self.order is None:
            return torch.arange(self.out_features, device=self.kept.weight.device)
        return inverse(self.order)

    def factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        y = dequantized(self.others.weight)
        u = torch.cat([torch.eye(self.rank, dtype=y.dtype, device=y.device), y])
        return self._ordered(u), dequantized(self.kept.weight), self.bias

    @property
    def bias(self) -> Tensor | None:
        if self.kept.bias is None:
            return None
        return self._ordered(torch.cat([self.kept.bias, self.others(self.kept.bias)]))

    def _ordered(self, stacked: Tensor) -> Tensor:
        """``stacked`` ``(out, ...)``, rows in stacked order, put in output order."""
        return stacked if self.order is None else stacked.index_select(0, self.order)

    @classmethod
    def from_factors(cls, u: Tensor, v: Tensor, bias: Tensor | None,
                     stacked: Tensor | None = None, ordered: bool = True) -> "KeptRowsLinear":
        """The same map as ``W = u v + bias`` (``u (out, r)``, ``v (r, in)``) stored as kept
        rows, in ``v``'s device and dtype: exact up to float rounding (computed in float64).

        Args:
            stacked: the output features in stacked order, kept rows first (a permutation of
                ``range(out)``); by default the maxvol rows of ``u``, then the others in order.
            ordered: see the class docs.

        Raises :class:`~tensornet_llm.errors.RankDeficientError` where the kept rows of ``u``
        are not independent.
        """
        (m, r), n = u.shape, v.shape[1]
        u64, v64 = u.detach().double().cpu(), v.detach().double().cpu()
        if stacked is None:
            rows, coeff = maxvol_rows(u64)
            others, order = kept_row_order(rows, m)
        else:
            stacked = torch.as_tensor(stacked, dtype=torch.long).cpu()
            if sorted(stacked.tolist()) != list(range(m)):
                raise ArgumentError(f"stacked must be a permutation of range({m})")
            rows, others, order = stacked[:r], stacked[r:], inverse(stacked)
            if torch.linalg.matrix_rank(u64[rows]) < r:
                raise RankDeficientError(f"the first {r} rows of stacked are not independent")
            coeff = torch.linalg.solve(u64[rows], u64, left=False)  # u u[R]^-1
        layer = cls(n, m, r, bias is not None, ordered=ordered, device=v.device, dtype=v.dtype)
        y = coeff[others]
        with torch.no_grad():
            layer.kept.weight.copy_(u64[rows] @ v64)  # W[R]
            layer.others.weight.copy_(y)
            if bias is not None:
                b = bias.detach().double().cpu()
                layer.kept.bias.copy_(b[rows])
                layer.others.bias.copy_(b[others] - y @ b[rows])
            if ordered:
                layer.order.copy_(order)
        return layer

    @classmethod
    def count_parameters(cls, in_features: int, out_features: int, chi: int,
                         n_sites: int | None = 2, bias: bool = True, **_: Any) -> int:
        r = min(chi, in_features, out_features)
        return r * (in_features + out_features - r) + (out_features if bias else 0)

    def rounding_form(self) -> nn.Module:
        """The same map in the smaller of the two forms that round like a dense weight (what
        int8 / int4 quantization rounds): two balanced factors (:func:`balanced_factors`,
        ``r (in + out)`` entries), or the product as one ``nn.Linear`` (``in out`` entries, one
        matmul instead of two), the smaller where ``r`` is above ``in out / (in + out)``.
        Rounding ``Y`` itself moves each combined row by the rounding of up to ``r``
        coefficients of order 1, which the combination does not average out."""
        if self.rank * (self.in_features + self.out_features) < (
                self.in_features * self.out_features):
            return balanced_factors(self)
        ref = self.kept.weight
        return self.to_linear().train(self.training).requires_grad_(ref.requires_grad)

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "ordered": self.order is not None}

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.order is not None else ", stacked order")


@torch.no_grad()
def balanced_factors(layer: FactoredLinear) -> LowRankLinear:
    """The same weight as two balanced factors ``U = Q_U A sqrt(S)``, ``V = sqrt(S) B^T Q_V^T``
    (from the SVD of the small core; float64): the form to round, since rounding ``Y`` of a
    kept-rows layer moves each combined row by the rounding of up to ``r`` coefficients of
    order 1, which the combination does not average out, while balanced factors round like a
    dense weight. Returns a :class:`LowRankLinear` in output order."""
    u, v, bias = layer.factors()
    u, v = u.double(), v.double()
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v.T)
    a, s, bt = torch.linalg.svd(ru @ rv.T)
    root = s.sqrt()
    ref = next(layer.parameters())
    left, right = ((qu @ a) * root).to(ref), (root[:, None] * (bt @ qv.T)).to(ref)
    new = LowRankLinear.from_factors(left, right, None if bias is None else bias.to(ref))
    return new.train(layer.training).requires_grad_(ref.requires_grad)



@torch.no_grad()
def zero_padded(layer: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    """``layer`` ``(out, in)`` grown to ``(out_features, in_features)`` with zeros (weight and
    bias): the new outputs are zero, the new inputs are read by nothing. Same device, dtype,
    mode and ``requires_grad``."""
    ref = layer.weight
    new = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=ref.device,
                    dtype=ref.dtype)
    new.weight.zero_()[: layer.out_features, : layer.in_features] = ref
    if layer.bias is not None:
        new.bias.zero_()[: layer.out_features] = layer.bias
    return new.train(layer.training).requires_grad_(ref.requires_grad)
