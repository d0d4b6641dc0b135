"""The low-rank layout stored as kept rows: ``W = P^T [I; Y] Z`` (an interpolative decomposition).

A rank-``r`` weight ``W = U V`` (``out x r`` times ``r x in``) is fixed by ``r`` of its rows: pick
rows ``R`` with ``U[R]`` invertible, then ``W = (U U[R]^-1) (U[R] V)``, whose left factor is the
identity on the rows ``R``. So the layer stores

* ``Z = W[R]`` ``(r, in)``: the kept rows (``cores[1]``, shaped ``(r, 1, in, 1)`` like ``V``),
* ``Y = U[R'] U[R]^-1`` ``(out - r, r)``: every other row ``R'`` as a combination of the kept
  ones (``cores[0]``, shaped ``(1, out - r, 1, r)``),
* ``row_order``: where each output row sits in ``[R, R']`` (from the layout, not a parameter),
* ``input_order`` (usually ``None``): the order in which ``Z`` stores its columns, where the
  layer's input arrives permuted (:func:`tensornet_llm.share_mlp_rows`),

``r (in + out - r)`` parameters instead of ``r (in + out)``, for the same weight. Every rank
below ``min(in, out)`` is then smaller than the dense layer, and at a fixed parameter count the
rank is higher: keeping 80% of a ``576 x 1536`` weight allows rank 417 instead of 335. The
forward pass costs the same number of multiply-adds as parameters:
``y = [x Z^T, x Z^T Y^T][row_order]``.

The rows are chosen by *maxvol* (Goreinov, Tyrtyshnikov and Zamarashkin, 2010): ``U[R]`` has
nearly maximal volume, so the entries of ``Y`` stay near or below 1 in magnitude (1.1 once
the swaps converge) and the conversion from ``U, V`` is well conditioned (it is exact up to
float rounding).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError, RankDeficientError
from .base import linear_weight
from .contract import is_one_token
from .mpo import MPOLinear

__all__ = ["InterpolativeLinear", "maxvol_rows"]

#: Source of :attr:`InterpolativeLinear.order_stamp`: unique across layers, so a stamp recorded
#: for one layer never matches another, nor the same layer after its orders changed.
_STAMPS = itertools.count()


def maxvol_rows(u: Tensor, tol: float = 0.1, max_swaps: int | None = None) -> tuple[Tensor, Tensor]:
    """Rows ``R`` of ``u`` ``(m, r)``, ``m >= r``, whose ``r x r`` block has (locally) maximal
    volume, and ``B = u u[R]^-1`` ``(m, r)`` (identity on the rows ``R``, every entry at most
    ``1 + tol`` in magnitude unless ``max_swaps``, default ``r``, ran out first). Starts from
    LU with partial pivoting, then swaps rows while an entry of ``B`` exceeds ``1 + tol`` (each
    swap grows ``|det u[R]|`` by that entry). Raises :class:`RankDeficientError` when ``u`` has
    rank below ``r`` (no ``r`` of its rows are invertible)."""
    m, r = u.shape
    if m < r:
        raise ArgumentError(f"maxvol needs at least as many rows as columns, got {tuple(u.shape)}")
    u = u.double()
    lu, pivots, _ = torch.linalg.lu_factor_ex(u)
    rank_error = f"maxvol needs full column rank {r}, got a matrix of less"
    if bool((lu.diagonal()[:r] == 0).any()):
        raise RankDeficientError(rank_error)
    order = torch.arange(m)
    for k, p in enumerate((pivots - 1).tolist()):  # LAPACK's row interchanges, in sequence
        order[[k, p]] = order[[p, k]]
    rows = order[:r].clone()
    b = torch.linalg.solve(u[rows], u, left=False)  # u u[R]^-1
    for _ in range(max_swaps if max_swaps is not None else r):
        flat = int(b.abs().argmax())
        i, j = divmod(flat, r)
        if abs(float(b[i, j])) <= 1 + tol:
            break
        rows[j] = i
        swap_update_(b, i, j)
    # u[R] singular in floating point: B is not finite, or is no identity on R and the swaps
    # picked a row twice
    if not bool(torch.isfinite(b).all()) or rows.unique().numel() != r:
        raise RankDeficientError(rank_error)
    return rows, b


def swap_update_(b: Tensor, i: int, j: int) -> None:
    """Update ``b = u u[R]^-1`` ``(m, r)`` in place for kept rows ``R`` whose ``j``-th becomes
    row ``i`` of ``u`` (``R[j] = i``, set by the caller): a rank-one update. Before it,
    ``b[i, j]`` is the factor by which that swap scales ``|det u[R]|``."""
    bj, bi = b[:, j].clone(), b[i].clone()
    pivot = bi[j].clone()
    bi[j] -= 1
    b -= torch.outer(bj, bi / pivot)


def _permutation(values: Sequence[int] | Tensor, n: int, argument: str, device) -> Tensor:
    """``values`` as an index buffer (:func:`index_buffer`), checked to permute ``range(n)``."""
    order = torch.as_tensor(values, dtype=torch.long)
    if sorted(order.tolist()) != list(range(n)):
        raise ArgumentError(f"{argument} must be a permutation of range({n})")
    return index_buffer(order, device)


def _inverse(permutation: Tensor) -> Tensor:
    """``q`` with ``q[permutation[i]] = i`` (row order <-> stacked rows)."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel(), device=permutation.device)
    return inverse


def kept_row_order(rows: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """For kept rows ``rows`` among ``m``: the other rows in ascending order, and ``row_order``
    ``(m,)``, where each of the ``m`` rows sits in ``[rows, others]``."""
    rest = torch.ones(m, dtype=torch.bool, device=rows.device)
    rest[rows] = False
    others = rest.nonzero().squeeze(1)
    return others, _inverse(torch.cat([rows, others]))


def index_buffer(values: Sequence[int] | Tensor, device) -> Tensor:
    """A long index tensor on ``device`` (on the CPU while building on ``meta``, so that the
    indices a layout holds survive loading; :func:`on_device` moves them where they are used)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.as_tensor(values, dtype=torch.long).to("cpu" if device.type == "meta" else device)


def on_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, without a call when it is there already (an index buffer that a
    model built on ``meta``, or a quantized skeleton, keeps on the CPU)."""
    return t if t.device == device else t.to(device)


def _slow_column_gather(x: Tensor) -> bool:
    """Whether ``x``'s matmul outputs are in a 2-byte dtype (bfloat16, float16, also under
    autocast) on the CPU, where ``index_select`` along columns has no vectorised kernel and runs
    far slower than for float32, enough to outweigh a layer's matmuls at bfloat16 speed."""
    if x.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu")
    return (torch.get_autocast_dtype("cpu") if autocast else x.dtype).itemsize == 2


def _one_token(x: Tensor, z: Tensor, y: Tensor, order: Tensor | None, bias: Tensor | None,
               zx: Tensor | None = None) -> Tensor:
    """One token (batch-1 decode, :func:`~tensornet_llm.layers.contract.is_one_token`):
    ``[Z x, Y Z x][order] + b`` as two matrix-vector products, one concatenation of a row and
    one gather (differentiable). ``x`` ``(..., in)`` holds one token; ``z`` ``(r, in)``, ``y``
    ``(out - r, r)``, ``order`` ``(out,)`` or ``None`` for the stacked order (no gather);
    ``zx``: ``Z x`` when already known. -> ``(..., out)``"""
    zx = torch.mv(z, x.reshape(z.shape[1])) if zx is None else zx.reshape(z.shape[0])
    out = torch.cat([zx, torch.mv(y, zx)])
    if order is not None:
        out = out.index_select(0, order)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out.shape[0])


def unordered_outputs(x: Tensor, z: Tensor, y: Tensor, zx: Tensor | None = None) -> Tensor:
    """``[x Z^T | x Z^T Y^T]`` ``(tokens, out)``: the outputs in kept-rows order, without
    autograd. From two tokens up both matmuls write straight into one buffer (BLAS takes the
    column blocks as strided outputs); one token is two matrix-vector products and a
    concatenation. ``zx``: ``x Z^T`` when already known."""
    r, in_f = z.shape
    tokens = x.shape[:-1].numel()
    if tokens == 1:  # two matrix-vector products (with out=, mv runs slower on the CPU)
        return _one_token(x, z, y, None, None, zx).view(1, -1)
    buffer = x.new_empty(tokens, r + y.shape[0])
    head = buffer[:, :r]
    if zx is None:
        torch.mm(x.reshape(-1, in_f), z.t(), out=head)
    else:
        head.copy_(zx.reshape(-1, r))
    torch.mm(head, y.t(), out=buffer[:, r:])
    return buffer


def _buffered(x: Tensor, z: Tensor, y: Tensor, order: Tensor, bias: Tensor | None,
              zx: Tensor | None = None) -> Tensor:
    """The forward without autograd: :func:`unordered_outputs`, then the only copy, the gather
    of the output features. ``zx``: ``x Z^T`` when already known."""
    lead = x.shape[:-1]
    buffer = unordered_outputs(x, z, y, zx)
    # torch.gather, not index_select: on the CPU it is the faster column gather in float32
    # too, and index_select has no vectorised kernel for 2-byte dtypes
    out = torch.gather(buffer, 1, order.expand(buffer.shape[0], -1))
    if bias is not None:
        out.add_(bias)
    return out.view(*lead, order.shape[0])


def _left_factor(y: Tensor, order: Tensor) -> Tensor:
    """``U = P^T [I; Y]`` ``(out, r)`` from ``Y`` ``(out - r, r)`` and ``order`` ``(out,)``."""
    eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
    return torch.cat([eye, y]).index_select(0, order)


def _through_left_factor(x: Tensor, z: Tensor, y: Tensor, order: Tensor, bias: Tensor | None,
                         zx: Tensor | None = None) -> Tensor | None:
    """``(x Z^T) U^T + b`` where that is the faster form: at least ``r`` tokens in a 2-byte
    dtype on the CPU (also under autocast), where gathering the ``(tokens, out)`` output's
    columns would cost more than the matmuls, so ``U``'s rows are gathered instead (``out x r``,
    contiguous) and multiplied once (differentiable). ``None`` elsewhere. ``zx``: ``x Z^T``
    when already known."""
    if not (_slow_column_gather(x) and x.numel() >= z.numel()):
        return None
    return F.linear(F.linear(x, z) if zx is None else zx, _left_factor(y, order), bias)


def _many_tokens(x: Tensor, z: Tensor, y: Tensor, order: Tensor, bias: Tensor | None,
                 zx: Tensor | None = None) -> Tensor:
    """The forward without autograd from two tokens up, in ``z``'s dtype:
    :func:`_through_left_factor` where it applies, else :func:`_buffered`. ``zx``: ``x Z^T``
    when already known."""
    out = _through_left_factor(x, z, y, order, bias, zx)
    return _buffered(x, z, y, order, bias, zx) if out is None else out


#: From this many tokens up (prefill), a compiled kept-rows layer without autograd on the CPU
#: calls :func:`_many_tokens_op`; below it (decode, also at batch 8) the operator's Python
#: dispatch, tens of microseconds, costs more than it saves. A constant, so a dynamic length
#: gets at most one more graph (below and from it), not one per layer's rank.
TRACED_OP_TOKENS = 32


@torch.library.custom_op("tensornet_llm::kept_rows_many_tokens", mutates_args=())
def _many_tokens_op(x: Tensor, z: Tensor, y: Tensor, order: Tensor,
                    bias: Tensor | None) -> Tensor:
    """:func:`_many_tokens` as one operator that traced code calls as it is: inductor would
    otherwise generate its own loop for the gather of the output's columns, which on the CPU
    runs far slower than ``torch.gather`` (prefill under ``torch.compile``)."""
    return _many_tokens(x, z, y, order, bias)


@_many_tokens_op.register_fake
def _(x: Tensor, z: Tensor, y: Tensor, order: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], order.shape[0])


class InterpolativeLinear(MPOLinear):
    """The low-rank layout ``W = U V`` stored as kept rows and their combinations (module docs):
    ``r (in + out - r)`` parameters at rank ``r``. Build it from a low-rank
    :class:`~tensornet_llm.layers.mpo.MPOLinear` with :meth:`from_factors` (exact) or from a
    weight with :meth:`from_weight` (truncated SVD, then the same conversion).

    Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``.
    """

    method = "interpolative"

    def __init__(self, in_features: int, out_features: int, chi: int, n_sites: int | None = 2,
                 bias: bool = True, *, in_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None, bond_dims: Sequence[int] | None = None,
                 row_order: Sequence[int] | Tensor | None = None,
                 input_order: Sequence[int] | Tensor | None = None, strategy: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 ) -> None:
        in_shape = (1, in_features) if in_shape is None else tuple(in_shape)
        out_shape = (out_features, 1) if out_shape is None else tuple(out_shape)
        if n_sites != 2 or tuple(in_shape) != (1, in_features) or tuple(out_shape) != (out_features, 1):
            raise ArgumentError("InterpolativeLinear is the low-rank layout: n_sites=2, "
                                f"in_shape=(1, {in_features}), out_shape=({out_features}, 1)")
        super().__init__(in_features, out_features, chi, 2, bias, in_shape=in_shape,
                         out_shape=out_shape, bond_dims=bond_dims, strategy=strategy,
                         device=device, dtype=dtype)
        if row_order is None:  # the first r rows kept, in order
            row_order = torch.arange(out_features)
        self.register_buffer("row_order", _permutation(row_order, out_features, "row_order",
                                                       self.cores[1].device), persistent=False)
        if input_order is not None:
            input_order = _permutation(input_order, in_features, "input_order", self.cores[1].device)
        self.register_buffer("input_order", input_order, persistent=False)
        self.order_stamp = next(_STAMPS)

    @staticmethod
    def _parameter_shapes(spec) -> tuple[tuple[int, ...], ...]:
        (out_f, _, rank), (_, _, in_f) = spec.core_shapes  # (o, 1, r) and (r, 1, i)
        return (1, out_f - rank, 1, rank), (rank, 1, in_f, 1)

    @property
    def rank(self) -> int:
        return int(self.cores[1].shape[0])

    def factors(self, cores: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(U, V)`` with ``W = U V``: ``U = P^T [I; Y]`` ``(out, r)``, ``V = Z`` ``(r, in)``
        (its columns put back in input order where :attr:`input_order` permutes them)."""
        y, z = self.cores if cores is None else cores
        r = z.shape[0]
        v = z.reshape(r, -1)
        if self.input_order is not None:
            v = v.index_select(1, _inverse(self.input_order).to(v.device))
        return _left_factor(y.reshape(-1, r), self._order(y.device)), v

    def _order(self, device: torch.device) -> Tensor:
        """``row_order`` on ``device`` (a quantized layer's skeleton keeps it on the CPU)."""
        return on_device(self.row_order, device)

    def _operands(self, cores: Sequence[Tensor] | None = None) -> list[Tensor]:
        u, v = self.factors(cores)
        return [u.unsqueeze(1), v.unsqueeze(1)]  # (o, 1, r) and (r, 1, i), as the MPO's

    @property
    def is_low_rank(self) -> bool:  # W = U V, but U is not stored (see factors())
        return True

    def forward(self, x: Tensor) -> Tensor:
        """``y = [x Z^T, x Z^T Y^T][row_order] + b``: two thin matmuls and one gather (one
        token, eager: two matrix-vector products; in a 2-byte dtype on the CPU from ``r``
        tokens up, ``y = (x Z^T) U^T + b`` instead). Traced: the differentiable form, except
        for prefill (:data:`TRACED_OP_TOKENS` tokens and more) without autograd on the CPU,
        where the eager kernels run as one operator (``tensornet_llm::kept_rows_many_tokens``):
        two graphs at most for every length above one. Where :attr:`input_order` permutes the
        stored columns, ``x``'s features are gathered into that order first."""
        if self._one_token_path(x):
            return self._forward_one_token(x, gather=True)
        if x.shape[-1] != self.in_features:
            raise ArgumentError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if self.input_order is not None:
            x = x.index_select(-1, on_device(self.input_order, x.device))
        return self.forward_stored_order(x)

    def forward_stored_order(self, x: Tensor) -> Tensor:
        """:meth:`forward` for an input ``(..., in_features)`` whose features are already in
        :attr:`input_order` (``x[..., k]`` is input feature ``input_order[k]``): no gather
        of the input. The same as :meth:`forward` where there is no input order."""
        if self._one_token_path(x):
            return self._forward_one_token(x, gather=False)
        y_core, z_core = self.cores._parameters.values()
        r = z_core.shape[0]
        y, z = y_core.view(-1, r), z_core.view(r, self.in_features)
        autocast = torch.is_autocast_enabled(x.device.type)
        if torch.compiler.is_compiling():
            if (x.device.type == "cpu" and not torch.is_grad_enabled() and not autocast
                    and x.dtype == z.dtype and x.numel() >= TRACED_OP_TOKENS * self.in_features):
                return _many_tokens_op(x, z, y, self._order(x.device), self.bias)
            return self._combine(F.linear(x, z), y)
        zx = None
        inference = not torch.is_grad_enabled()
        if inference and self._siblings is not None and self.input_order is None:
            zx = self._siblings.input_side(self._sibling_index, x)  # x Z^T, shared
        if is_one_token(x):
            return _one_token(x, z, y, self._order(x.device), self.bias, zx)
        order = self._order(x.device)
        if inference and x.dtype == z.dtype and not autocast:
            return _many_tokens(x, z, y, order, self.bias, zx)
        out = _through_left_factor(x, z, y, order, self.bias, zx)  # with autograd or autocast
        return self._combine(F.linear(x, z) if zx is None else zx, y) if out is None else out

    def _one_token_path(self, x: Tensor) -> bool:
        """Whether ``x`` runs through :meth:`_forward_one_token`: one token ``(..., in)`` in
        eager code outside autocast, and no sibling group to share ``x Z^T`` with. (Traced code
        asks nothing of ``x``'s size here, so this adds no guard on it.)"""
        return (not torch.compiler.is_compiling() and self._siblings is None
                and x.numel() == self.in_features == x.shape[-1]
                and not torch.is_autocast_enabled(x.device.type))

    def _forward_one_token(self, x: Tensor, gather: bool, ordered: bool = True) -> Tensor:
        """One token (batch-1 decode) with as little per-call work as the arithmetic allows:
        at this size the layer's time is its fixed cost per call, not its bytes. Two
        matrix-vector products, one concatenation and one gather (differentiable); ``x``'s
        features gathered into :attr:`input_order` first where ``gather`` and it is set.
        ``x`` ``(..., in)`` holding one token -> ``(..., out)``; in stacked order (no gather
        of the outputs, no bias: the caller adds it) where not ``ordered``."""
        y_core, z_core = self._modules["cores"]._parameters.values()
        r = z_core.shape[0]
        if gather and self._buffers["input_order"] is not None:
            x = x.index_select(-1, on_device(self._buffers["input_order"], x.device))
        if not ordered:
            return _one_token(x, z_core.view(r, self.in_features), y_core.view(-1, r), None, None)
        return _one_token(x, z_core.view(r, self.in_features), y_core.view(-1, r),
                          on_device(self._buffers["row_order"], x.device),
                          self._parameters["bias"])

    def _combine(self, z: Tensor, y: Tensor) -> Tensor:
        """``[z, z Y^T][row_order] + b`` for ``z = x Z^T`` ``(..., r)`` and ``Y`` ``(out - r, r)``
        (differentiable, traceable)."""
        out = torch.cat([z, F.linear(z, y)], dim=-1).index_select(-1, self._order(z.device))
        return out if self.bias is None else out + self.bias.to(out.dtype)  # autocast: as nn.Linear

    # ----- conversion --------------------------------------------------------------------------
    @classmethod
    def from_factors(cls, layer: MPOLinear) -> "InterpolativeLinear":
        """The same weight as the low-rank ``layer`` (``W = U V``), stored as kept rows: exact up
        to float rounding (the conversion runs in float64). Bias, dtype, device and
        ``requires_grad`` are kept."""
        if not (isinstance(layer, MPOLinear) and layer.is_low_rank) or isinstance(layer, cls):
            raise ArgumentError(f"layer must be a low-rank MPOLinear (W = U V), got {type(layer).__name__}")
        u, v = (c.detach() for c in layer.cores)
        m, n, r = layer.out_features, layer.in_features, u.shape[-1]
        u64, v64 = u.reshape(m, r).double(), v.reshape(r, n).double()
        rows, b = maxvol_rows(u64)
        others, order = kept_row_order(rows, m)
        new = torch.nn.utils.skip_init(
            cls, n, m, layer.chi, 2, bias=layer.bias is not None, bond_dims=[r],
            row_order=order, strategy=layer.strategy, device=u.device, dtype=u.dtype)
        new.row_order = order.to(u.device)  # skip_init left the buffer uninitialised
        with torch.no_grad():
            new.cores[0].copy_(b[others].reshape(1, m - r, 1, r))
            new.cores[1].copy_((u64[rows] @ v64).reshape(r, 1, n, 1))  # W[R]
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        for p, q in zip(new.cores, layer.cores):
            p.requires_grad_(q.requires_grad)
        if layer.bias is not None:
            new.bias.requires_grad_(layer.bias.requires_grad)
        new.spectra = layer.spectra
        new.train(layer.training)
        return new

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None, chi: int, n_sites: int | None = 2,
                    *, in_shape: Sequence[int] | None = None,
                    out_shape: Sequence[int] | None = None, tol: float | None = None,
                    strategy: str = "auto") -> "InterpolativeLinear":
        """Truncated SVD of ``weight`` ``(out, in)`` at rank ``chi``, stored as kept rows."""
        out_f, in_f = weight.shape
        factors = MPOLinear.from_weight(weight, bias, chi, 2, in_shape=(1, in_f),
                                        out_shape=(out_f, 1), tol=tol, strategy=strategy)
        return cls.from_factors(factors)

    @classmethod
    def from_linear(cls, linear, chi: int, n_sites: int | None = 2, **kwargs: Any
                    ) -> "InterpolativeLinear":
        weight, bias = linear_weight(linear)
        return cls.from_weight(weight, bias, chi, n_sites, **kwargs)

    def layout(self) -> dict[str, Any]:
        inputs = {} if self.input_order is None else {"input_order": self.input_order.tolist()}
        return {**super().layout(), "row_order": self.row_order.tolist(), **inputs}

    @classmethod
    def from_layout(cls, layout: dict[str, Any], device=None, dtype=None) -> "InterpolativeLinear":
        return cls(layout["in_features"], layout["out_features"], layout["chi"], 2,
                   bias=layout["bias"], bond_dims=layout["bond_dims"],
                   row_order=layout["row_order"], input_order=layout.get("input_order"),
                   device=device, dtype=dtype)

    @torch.no_grad()
    def to_factors(self) -> MPOLinear:
        """The same weight as two balanced factors, ``U = Q_U A sqrt(S)``, ``V = sqrt(S) B^T
        Q_V^T`` from the SVD of the small core (a low-rank :class:`MPOLinear`, ``r^2`` more
        parameters). Quantize this form: rounding ``Y`` moves every combined row by the
        rounding of up to ``r`` coefficients of order 1, which the combination does not
        average out, while balanced factors round like a dense weight."""
        u, v = (t.detach().double() for t in self.factors())
        qu, ru = torch.linalg.qr(u)
        qv, rv = torch.linalg.qr(v.T)
        a, s, bt = torch.linalg.svd(ru @ rv.T)
        root = s.sqrt()
        left, right = (qu @ a) * root, root[:, None] * (bt @ qv.T)
        m, n, r = self.out_features, self.in_features, self.rank
        layer = torch.nn.utils.skip_init(
            MPOLinear, n, m, self.chi, 2, bias=self.bias is not None, in_shape=(1, n),
            out_shape=(m, 1), bond_dims=[r], strategy=self.strategy,
            device=self.cores[1].device, dtype=self.cores[1].dtype)
        layer.cores[0].copy_(left.reshape(1, m, 1, r))
        layer.cores[1].copy_(right.reshape(r, 1, n, 1))
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        for p in (*layer.cores, *([layer.bias] if self.bias is not None else [])):
            p.requires_grad_(self.cores[1].requires_grad)
        layer.train(self.training)
        return layer

    # ----- exact edits (peft merges) ------------------------------------------------------------
    def _stacked_rows(self) -> Tensor:
        """Output row of each stacked position: the kept rows ``R``, then the others."""
        return _inverse(self.row_order.cpu())

    def _store(self, y: Tensor, z: Tensor, rows: Tensor) -> None:
        """New cores ``Y (out - r, r)``, ``Z (r, in)`` (any float dtype) for stacked ``rows``."""
        m, n, r = self.out_features, self.in_features, z.shape[0]
        like = self.cores[1]
        self._set_cores([y.reshape(1, m - r, 1, r).to(like), z.reshape(r, 1, n, 1).to(like)])
        self.row_order = _inverse(rows).to(self.row_order.device)
        self.order_stamp = next(_STAMPS)

    @torch.no_grad()
    def append_factors_(self, left: Tensor, right: Tensor) -> None:
        """``W <- W + left @ right`` exactly (``left (out, k)``, ``right (k, in)``): the rank
        grows to ``r + k``. The kept rows stay kept and ``k`` more join them, chosen by maxvol
        among the rows where ``left`` is not explained by the kept rows' coefficients, so the
        new coefficients stay bounded. Computed in float64; the cores become new parameters."""
        m, n, r = self.out_features, self.in_features, self.rank
        k = left.shape[-1]
        if left.shape != (m, k) or right.shape != (k, n):
            raise ArgumentError(f"factors must be (out={m}, k) and (k, in={n}), got "
                                f"{tuple(left.shape)} and {tuple(right.shape)}")
        if r + k > m:
            raise ArgumentError(f"rank {r} + {k} would exceed out_features={m}: an "
                                "InterpolativeLinear keeps at most all its rows")
        rows = self._stacked_rows()
        kept, others = rows[:r], rows[r:]
        y = self.cores[0].detach().reshape(m - r, r).double()
        z = self.cores[1].detach().reshape(r, n).double()
        lk, lo = left.detach().double().cpu()[kept], left.detach().double().cpu()[others]
        y, z, a = y.cpu(), z.cpu(), right.detach().double().cpu()
        if self.input_order is not None:  # Z's columns are stored in input order
            a = a[:, self.input_order.cpu()]
        # Row o of W + L A is (Y[o] + D[o] S^-1 Y_S-part ...): with D = L_O - Y L_R, the part of
        # L the kept rows' coefficients do not explain, the joining rows S are D's maxvol rows
        # and every remaining row's coefficients are [Y - D S^-1 Y_S, D S^-1].
        d = lo - y @ lk
        joining, coeff = maxvol_rows(d)  # coeff = D D[S]^-1
        rest = torch.ones(m - r, dtype=torch.bool)
        rest[joining] = False
        new_y = torch.cat([y[rest] - coeff[rest] @ y[joining], coeff[rest]], dim=1)
        new_z = torch.cat([z + lk @ a, y[joining] @ z + lo[joining] @ a])
        self._store(new_y, new_z, torch.cat([kept, others[joining], others[rest]]))

    @torch.no_grad()
    def scale_rows_(self, gain: Tensor) -> None:
        """``W <- diag(gain) W`` exactly (``gain (out,)``, no zeros): kept rows scale with their
        gain, and coefficients as ``Y <- diag(g_O) Y diag(g_R)^-1``."""
        rows = self._stacked_rows().to(gain.device)
        r = self.rank
        g_kept, g_other = gain[rows[:r]], gain[rows[r:]]
        y, z = self.cores
        y.mul_((g_other[:, None] / g_kept[None, :]).to(y).reshape(y.shape))
        z.mul_(g_kept.to(z).view(r, 1, 1, 1))

    @torch.no_grad()
    def arrange_rows_(self, stacked: Tensor) -> None:
        """Keep other rows, the same weight: the first ``rank`` of ``stacked`` ``(out,)`` (a
        permutation of the output rows) become the kept rows and the rest follow in that order,
        so that :attr:`row_order` becomes ``stacked``'s inverse. Exact up to float rounding
        (computed in float64); the coefficients are as large as those rows make them (every
        row set of a well-chosen order keeps them small, see
        :func:`~tensornet_llm.layers.shared_rows.shared_row_order`). Raises
        :class:`RankDeficientError` when the chosen kept rows are not independent; the layer is
        then unchanged."""
        m, r = self.out_features, self.rank
        stacked = torch.as_tensor(stacked, dtype=torch.long).cpu()
        if sorted(stacked.tolist()) != list(range(m)):
            raise ArgumentError(f"stacked must be a permutation of range({m})")
        u = self.factors()[0].detach().double().cpu()
        z = self.cores[1].detach().reshape(r, -1).double().cpu()  # stored column order
        kept = stacked[:r]
        if torch.linalg.matrix_rank(u[kept]) < r:
            raise RankDeficientError(f"the first {r} rows of stacked are not independent")
        coeff = torch.linalg.solve(u[kept], u, left=False)  # u u[R]^-1, identity on R
        self._store(coeff[stacked[r:]], u[kept] @ z, stacked)  # W = u Z_old, so W[R] = u[R] Z_old

    @torch.no_grad()
    def permute_inputs_(self, input_order: Tensor | None) -> None:
        """Store ``Z``'s columns in ``input_order`` (a permutation of the input features, or
        ``None`` for their own order): the same weight, but :meth:`forward_stored_order` then
        takes inputs in that order. :meth:`forward` gathers its input into it (one gather
        more), so this pays where the caller produces its input in that order anyway (a gated
        MLP whose gate and up layers share a row order: :func:`tensornet_llm.share_mlp_rows`)."""
        n, r = self.in_features, self.rank
        new = None if input_order is None else _permutation(input_order, n, "input_order", "cpu")
        z = self.cores[1].detach().reshape(r, n)
        if self.input_order is not None:  # back to the features' own order
            z = z.index_select(1, _inverse(self.input_order.cpu()).to(z.device))
        if new is not None:
            z = z.index_select(1, new.to(z.device))
        self._set_cores([self.cores[0].detach(), z.reshape(r, 1, n, 1)])
        self.input_order = None if new is None else new.to(self.row_order.device)
        self.order_stamp = next(_STAMPS)

    def state(self) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of ``(Y, Z, row_order)``, for :meth:`restore_`."""
        return (self.cores[0].detach().clone(), self.cores[1].detach().clone(),
                self.row_order.clone())

    @torch.no_grad()
    def restore_(self, state: tuple[Tensor, Tensor, Tensor]) -> None:
        """Go back to a :meth:`state` (undoes :meth:`append_factors_` and :meth:`scale_rows_`
        bit for bit)."""
        y, z, order = state
        self._store(y.reshape(-1, z.shape[0]), z.reshape(z.shape[0], -1), _inverse(order.cpu()))

    def truncate_bond_(self, rank: int) -> None:
        raise ArgumentError("an InterpolativeLinear has no 'first rank terms' to keep: undo "
                            "append_factors_ with restore_(state) taken before it")

    def extra_repr(self) -> str:
        permuted = "" if self.input_order is None else ", inputs permuted"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}{permuted}")
