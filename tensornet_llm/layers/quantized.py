"""Quantized weights and the layers that hold them: int8 / int4 codes, dequantized on the fly.

* every quantized tensor is viewed as rows along a *channel* leg (a linear's output features,
  an embedding's vocabulary entries, a core's larger end bond) and stored as signed integers
  with one float16 scale per row (``group_size=None``, "per channel") or per group of
  ``group_size`` consecutive entries of a row;
* int8 codes are ``round(w / scale)`` in ``[-127, 127]`` with ``scale = absmax / 127``; int4
  codes lie in ``[-8, 7]`` with ``scale = absmax / 7`` and two codes share one byte;
* the forward pass dequantizes (``code * scale``) and computes in the float dtype the module had,
  so accuracy is that of the rounded weights, and the model runs on CPU.

Weights are therefore stored at 8 or 4 bits (plus 16 bits of scale per row or group) and
expanded on the fly; cores are small, so for tensor-network layers the expansion is cheap.
:func:`tensornet_llm.train.quantize.quantize` uses these layers for what torchao cannot take
on a CPU: int4 of everything, and int8 of tensor-network cores, cross-layer bases and GPT-2's
``Conv1D`` (every ``nn.Linear`` and ``nn.Embedding`` goes through torchao's int8).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError
from .base import DispatchCache, TensorNetworkLinear, linear_weight
from .contract import DispatchTable, tn_linear
from .layout import LAYER_CLASSES

__all__ = [
    "QuantizedWeight",
    "QuantizedLinear",
    "QuantizedEmbedding",
    "QuantizedTensorNetworkLinear",
    "QuantizedCrossLayerLinear",
    "QuantizedModule",
    "quantize_tensor",
    "dequantize_tensor",
    "round_tensor",
    "QUANTIZED_TYPES",
    "INT4_GROUP_SIZE",
]

Bits = Literal[8, 4]
#: Default group size for int4 when none is given (int8 defaults to one scale per channel).
INT4_GROUP_SIZE = 64
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _rows(t: Tensor, channel_dim: int) -> Tensor:
    """``t`` as ``(channels, rest)`` with the channel leg first."""
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


def _grouping(shape: tuple[int, ...], channel_dim: int, group_size: int | None) -> tuple[int, int, int]:
    """(entries per row, entries per group, padded row length).

    A group never exceeds the row (so short rows are not padded up to a long group), the padded
    row is a whole number of groups, and every group has an even length (int4 packs pairs).
    """
    length = math.prod(shape) // shape[channel_dim]
    group = min(group_size or length, length)
    group += group % 2
    return length, group, math.ceil(length / group) * group


def quantize_tensor(
    t: Tensor, bits: Bits, group_size: int | None = None, channel_dim: int = 0
) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of ``t`` per row (or per group of a row) along ``channel_dim``.

    Returns:
        ``codes``: int8 ``(channels, padded)`` for 8 bits, or uint8 ``(channels, padded // 2)``
        holding two 4-bit codes per byte; ``scale``: float16 ``(channels, groups)``.
    """
    if bits not in (8, 4):
        raise ArgumentError(f"bits must be 8 or 4, got {bits!r}")
    rows = _rows(t.detach().float(), channel_dim)
    length, group, padded = _grouping(tuple(t.shape), channel_dim, group_size)
    rows = F.pad(rows, (0, padded - length))
    grouped = rows.reshape(rows.shape[0], -1, group)
    qmax = 127 if bits == 8 else 7
    scale = (grouped.abs().amax(-1) / qmax).clamp_min(1e-8).to(torch.float16)
    codes = (grouped / scale.float()[..., None]).round().clamp(-qmax - (bits == 4), qmax)
    codes = codes.reshape(rows.shape).to(torch.int8)
    if bits == 4:  # two's-complement nibbles: low nibble even entry, high nibble odd entry
        nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
        codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return codes, scale


def _unpack(codes: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return codes
    low = (codes & 0xF).to(torch.int8)
    high = (codes >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).reshape(codes.shape[0], -1)
    return torch.where(both > 7, both - 16, both)


def dequantize_tensor(
    codes: Tensor, scale: Tensor, shape: tuple[int, ...], bits: Bits,
    group_size: int | None = None, channel_dim: int = 0, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_tensor` up to rounding: a tensor of ``shape`` and ``dtype``.

    ``codes`` and ``scale`` may be a subset of rows (e.g. the embedding rows of some token ids);
    ``shape`` then has that many channels.
    """
    values = _unpack(codes, bits).to(dtype)
    groups = scale.shape[-1]
    values = values.reshape(values.shape[0], groups, -1) * scale.to(dtype)[..., None]
    length = math.prod(shape) // shape[channel_dim]
    values = values.reshape(values.shape[0], -1)[:, :length]
    moved = (shape[channel_dim], *[s for d, s in enumerate(shape) if d != channel_dim % len(shape)])
    return values.reshape(moved).movedim(0, channel_dim)


def round_tensor(t: Tensor, bits: Bits, group_size: int | None = None, channel_dim: int = 0
                 ) -> Tensor:
    """``t`` as :class:`QuantizedWeight` stores it: quantized and dequantized again, in
    ``t``'s shape and dtype (the values a quantized layer computes with)."""
    channel_dim %= t.dim()
    codes, scale = quantize_tensor(t, bits, group_size, channel_dim)
    return dequantize_tensor(codes, scale, tuple(t.shape), bits, group_size, channel_dim, t.dtype)


class QuantizedWeight(nn.Module):
    """One quantized tensor: buffers ``codes`` and ``scale``; calling it dequantizes.

    Args:
        tensor: the float tensor to quantize (its shape and dtype are remembered).
        bits: 8 or 4.
        group_size: entries per scale along a row; ``None``: one scale per channel.
        channel_dim: the leg whose entries get their own scales.
    """

    def __init__(self, tensor: Tensor, bits: Bits, group_size: int | None = None,
                 channel_dim: int = 0) -> None:
        super().__init__()
        self.shape = tuple(tensor.shape)
        self.bits, self.group_size = bits, group_size
        self.channel_dim = channel_dim % tensor.dim()
        self.dtype = tensor.dtype
        codes, scale = quantize_tensor(tensor, bits, group_size, self.channel_dim)
        if tensor.is_meta:
            codes, scale = codes.to("meta"), scale.to("meta")
        self.register_buffer("codes", codes.to(tensor.device))
        self.register_buffer("scale", scale.to(tensor.device))

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "QuantizedWeight":
        """A placeholder of the structure :meth:`spec` describes (values come from a state dict)."""
        return cls(torch.empty(spec["shape"], dtype=_DTYPES[spec["dtype"]], device="meta"),
                   spec["bits"], spec["group_size"], spec["channel_dim"])

    def spec(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size,
                "channel_dim": self.channel_dim, "dtype": str(self.dtype)}

    def forward(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_tensor(self.codes, self.scale, self.shape, self.bits, self.group_size,
                                 self.channel_dim, dtype or self.dtype)

    def rows(self, index: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Dequantized channels ``index`` (any shape) -> ``(*index.shape, *other legs)``;
        only for ``channel_dim == 0``."""
        flat = index.reshape(-1)
        shape = (flat.numel(), *self.shape[1:])
        out = dequantize_tensor(self.codes[flat], self.scale[flat], shape, self.bits,
                                self.group_size, 0, dtype or self.dtype)
        return out.reshape(*index.shape, *self.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * 2

    def extra_repr(self) -> str:
        group = "channel" if self.group_size is None else f"group={self.group_size}"
        return f"shape={self.shape}, int{self.bits}, {group}, channel_dim={self.channel_dim}"


class QuantizedModule(nn.Module):
    """Common part: a ``kind`` for serialization and an optional dense bias."""

    kind: str

    def _set_bias(self, bias: Tensor | None) -> None:
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def layout(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "QuantizedModule":
        raise NotImplementedError


class QuantizedLinear(QuantizedModule):
    """``nn.Linear`` (or GPT-2 ``Conv1D``) with a quantized weight ``(out, in)``: channels are
    the output features. Input ``(..., in_features)`` -> ``(..., out_features)``."""

    kind = "linear"

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qweight = weight
        self._set_bias(bias)

    @classmethod
    def from_module(cls, module: nn.Module, bits: Bits, group_size: int | None,
                    shared: QuantizedWeight | None = None) -> "QuantizedLinear":
        weight, bias = linear_weight(module)
        return cls(shared or QuantizedWeight(weight, bits, group_size, 0), bias)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight ``(out_features, in_features)`` (not a parameter)."""
        return self.qweight()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.qweight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def layout(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": self.qweight.spec(), "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "QuantizedLinear":
        weight = QuantizedWeight.empty(layout["weight"])
        bias = torch.empty(weight.shape[0], device="meta") if layout["bias"] else None
        return cls(weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QuantizedEmbedding(QuantizedModule):
    """``nn.Embedding`` with quantized rows; only the rows looked up are dequantized.
    Input ids ``(...)`` -> ``(..., embedding_dim)``."""

    kind = "embedding"

    def __init__(self, weight: QuantizedWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.qweight = weight
        self.register_parameter("bias", None)

    @classmethod
    def from_module(cls, module: nn.Embedding, bits: Bits, group_size: int | None
                    ) -> "QuantizedEmbedding":
        return cls(QuantizedWeight(module.weight, bits, group_size, 0), module.padding_idx)

    @property
    def weight(self) -> Tensor:
        return self.qweight()

    def forward(self, ids: Tensor) -> Tensor:
        return self.qweight.rows(ids)

    def layout(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": self.qweight.spec(), "padding_idx": self.padding_idx}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "QuantizedEmbedding":
        return cls(QuantizedWeight.empty(layout["weight"]), layout["padding_idx"])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class QuantizedTensorNetworkLinear(QuantizedModule, DispatchCache):
    """A :class:`TensorNetworkLinear` whose cores are stored quantized (each core's channels
    are its larger end bond). Same contraction, same shapes as the float layer."""

    kind = "tensor_network"

    def __init__(self, structure: TensorNetworkLinear, cores: list[QuantizedWeight],
                 bias: Tensor | None) -> None:
        super().__init__()
        # The float layer's structure on the meta device: index structure and operand views,
        # no storage (a plain attribute, so it is neither a submodule nor in the state dict).
        skeleton = type(structure).from_layout(structure.layout(), device="meta")
        skeleton.strategy = structure.strategy
        self.__dict__["structure"] = skeleton
        self.in_features, self.out_features = structure.in_features, structure.out_features
        self.qcores = nn.ModuleList(cores)
        self._set_bias(bias)
        self._cached_dispatch()

    def dispatch_table(self) -> DispatchTable:
        """The float layer's dispatch table, decided for where the codes are and the dtype they
        dequantize to (see :meth:`TensorNetworkLinear.dispatch_table`)."""
        return self._cached_dispatch()

    def _decide_dispatch(self) -> DispatchTable:
        first = self.qcores[0]
        return self.structure.dispatch_table(first.codes.device, first.dtype)

    @staticmethod
    def _channel_dim(shape: tuple[int, ...]) -> int:
        return 0 if shape[0] >= shape[-1] else len(shape) - 1

    @classmethod
    def from_module(cls, module: TensorNetworkLinear, bits: Bits, group_size: int | None
                    ) -> "QuantizedTensorNetworkLinear":
        cores = [QuantizedWeight(c, bits, group_size, cls._channel_dim(tuple(c.shape)))
                 for c in module.cores]
        return cls(module, cores, module.bias)

    def cores(self, dtype: torch.dtype | None = None) -> list[Tensor]:
        return [q(dtype) for q in self.qcores]

    def to_dense(self) -> Tensor:
        """The dequantized network's weight ``(out_features, in_features)``."""
        return self.structure.dense_from(self.cores())

    weight = property(to_dense)

    def forward(self, x: Tensor) -> Tensor:
        s = self.structure
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return tn_linear(x, s.spec, s._operands(self.cores(x.dtype)), bias, s.in_features,
                         s.out_features, table=self.dispatch_table())

    def layout(self) -> dict[str, Any]:
        return {"kind": self.kind, "network": self.structure.layout(),
                "cores": [q.spec() for q in self.qcores], "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "QuantizedTensorNetworkLinear":
        structure = LAYER_CLASSES[layout["network"]["method"]].from_layout(layout["network"],
                                                                     device="meta")
        bias = torch.empty(structure.out_features, device="meta") if layout["bias"] else None
        return cls(structure, [QuantizedWeight.empty(c) for c in layout["cores"]], bias)

    def extra_repr(self) -> str:
        s = self.structure
        return (f"method={s.method}, in_features={s.in_features}, out_features={s.out_features}, "
                f"bond_dims={s.bond_dims}")


class QuantizedCrossLayerLinear(QuantizedModule):
    """A :class:`~tensornet_llm.layers.cross_layer.CrossLayerLinear` with quantized bases and
    core: ``x V^T C^T U^T + bias`` (a ``None`` basis is the identity). Members of one group hold
    the same :class:`QuantizedWeight` for each shared basis, so it is stored once.

    What earlier versions' ``quantize`` built (their folders load into it); ``quantize`` now
    quantizes a member's ``nn.Linear`` parts as any others."""

    kind = "cross_layer"

    def __init__(self, in_basis: QuantizedWeight | None, out_basis: QuantizedWeight | None,
                 core: QuantizedWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.in_basis, self.out_basis, self.qcore = in_basis, out_basis, core
        self.in_features = in_basis.shape[1] if in_basis is not None else core.shape[1]
        self.out_features = out_basis.shape[0] if out_basis is not None else core.shape[0]
        self._set_bias(bias)

    def to_dense(self) -> Tensor:
        """The dequantized weight ``(out_features, in_features)``."""
        w = self.qcore()
        if self.in_basis is not None:
            w = w @ self.in_basis()
        return w if self.out_basis is None else self.out_basis() @ w

    weight = property(to_dense)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.in_basis is not None:
            x = F.linear(x, self.in_basis(x.dtype))
        if self.out_basis is None:
            return F.linear(x, self.qcore(x.dtype), bias)
        return F.linear(F.linear(x, self.qcore(x.dtype)), self.out_basis(x.dtype), bias)

    def layout(self) -> dict[str, Any]:
        return {"kind": self.kind, "core": self.qcore.spec(), "bias": self.bias is not None,
                **{name: None if q is None else q.spec()
                   for name, q in (("in_basis", self.in_basis), ("out_basis", self.out_basis))}}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "QuantizedCrossLayerLinear":
        """Placeholders; a group's shared bases are stored once and loaded into every member
        through the checkpoint's aliases (the same tensors, not copies)."""
        bases = [None if layout[n] is None else QuantizedWeight.empty(layout[n])
                 for n in ("in_basis", "out_basis")]
        core = QuantizedWeight.empty(layout["core"])
        out = bases[1].shape[0] if bases[1] is not None else core.shape[0]
        return cls(*bases, core, torch.empty(out, device="meta") if layout["bias"] else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


QUANTIZED_TYPES: dict[str, type[QuantizedModule]] = {
    c.kind: c for c in (QuantizedLinear, QuantizedEmbedding, QuantizedTensorNetworkLinear,
                        QuantizedCrossLayerLinear)
}
