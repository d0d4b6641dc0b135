"""Weight-only int8 / int4 quantization of tensor-network cores and of the layers left dense.

CompactifAI's size figures come from two steps: tensorize, then quantize what remains. This
module does the second step with plain torch tensors, so it runs (and saves) anywhere:

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TensorNetworkLinear, is_linear_like, linear_weight
from .contract import tn_linear
from .targets import check_pattern, matches

__all__ = [
    "QuantizeConfig",
    "QuantizedWeight",
    "QuantizedLinear",
    "QuantizedEmbedding",
    "QuantizedTensorNetworkLinear",
    "QuantizeReport",
    "quantize",
    "quantize_tensor",
    "dequantize_tensor",
    "QUANTIZED_TYPES",
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
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
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


class _Quantized(nn.Module):
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
    def from_layout(cls, layout: dict[str, Any]) -> "_Quantized":
        raise NotImplementedError


class QuantizedLinear(_Quantized):
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


class QuantizedEmbedding(_Quantized):
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


class QuantizedTensorNetworkLinear(_Quantized):
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
                         s.out_features, s.strategy)

    def layout(self) -> dict[str, Any]:
        return {"kind": self.kind, "network": self.structure.layout(),
                "cores": [q.spec() for q in self.qcores], "bias": self.bias is not None}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> "QuantizedTensorNetworkLinear":
        from .compactify import METHODS

        structure = METHODS[layout["network"]["method"]].from_layout(layout["network"],
                                                                     device="meta")
        bias = torch.empty(structure.out_features, device="meta") if layout["bias"] else None
        return cls(structure, [QuantizedWeight.empty(c) for c in layout["cores"]], bias)

    def extra_repr(self) -> str:
        s = self.structure
        return (f"method={s.method}, in_features={s.in_features}, out_features={s.out_features}, "
                f"bond_dims={s.bond_dims}")


QUANTIZED_TYPES: dict[str, type[_Quantized]] = {
    c.kind: c for c in (QuantizedLinear, QuantizedEmbedding, QuantizedTensorNetworkLinear)
}


@dataclass
class QuantizeConfig:
    """What :func:`quantize` converts, and how.

    Attributes:
        bits: 8 or 4.
        group_size: entries per scale; ``None`` means one scale per channel for int8 and
            groups of 64 for int4. Must be even.
        cores: quantize the cores of tensor-network layers.
        dense: quantize linear layers that are not tensor networks (the LM head, excluded or
            untargeted modules; for an uncompressed model, every linear).
        embeddings: quantize ``nn.Embedding`` tables.
        exclude: name patterns (as in :func:`tensornet_llm.compactify`) left in float.
    """

    bits: int = 8
    group_size: int | None = None
    cores: bool = True
    dense: bool = True
    embeddings: bool = True
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {self.bits!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2):
            raise ValueError(f"group_size must be None or an even integer >= 2, got {g!r}")
        for flag in ("cores", "dense", "embeddings"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(check_pattern(p, "exclude") for p in self.exclude)

    @property
    def effective_group_size(self) -> int | None:
        return self.group_size if self.group_size or self.bits == 8 else INT4_GROUP_SIZE


@dataclass
class QuantizeReport:
    """Bytes of every converted module's weights before and after."""

    bits: int
    group_size: int | None
    rows: list[tuple[str, str, int, int]] = field(default_factory=list)  # name, kind, before, after

    @property
    def bytes_before(self) -> int:
        return sum(r[2] for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r[3] for r in self.rows)

    def summary(self) -> str:
        kinds: dict[str, list[int]] = {}
        for _, kind, before, after in self.rows:
            k = kinds.setdefault(kind, [0, 0, 0])
            k[0] += 1
            k[1] += before
            k[2] += after
        group = "per channel" if self.group_size is None else f"groups of {self.group_size}"
        lines = [f"int{self.bits} ({group}): {len(self.rows)} modules, "
                 f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB"]
        lines += [f"  {kind:<15} {n:>4} modules  {b / 2**20:8.2f} MiB -> {a / 2**20:7.2f} MiB"
                  for kind, (n, b, a) in kinds.items()]
        return "\n".join(lines)


def _float_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=True)
               if p is not getattr(module, "bias", None))


def quantize(
    model: nn.Module,
    bits: int | None = None,
    *,
    group_size: int | None = None,
    cores: bool | None = None,
    dense: bool | None = None,
    embeddings: bool | None = None,
    exclude: Iterable[str] | None = None,
    config: QuantizeConfig | None = None,
) -> QuantizeReport:
    """Quantize ``model``'s weights in place (tensor-network cores, dense linears, embeddings).

    Arguments default to :class:`QuantizeConfig`'s fields (``config`` supplies others; explicit
    keywords win). Everything is validated before any module is replaced. A tied input
    embedding and LM head stay tied: both read one quantized table. Quantize after compactify
    and after healing; the quantized weights are buffers, not trainable parameters.

    Returns:
        A :class:`QuantizeReport` with the bytes of each converted module before and after.
    """
    cfg = QuantizeConfig(**{f.name: getattr(config, f.name) for f in fields(QuantizeConfig)}
                         ) if config is not None else QuantizeConfig()
    given = {"bits": bits, "group_size": group_size, "cores": cores, "dense": dense,
             "embeddings": embeddings, "exclude": tuple(exclude) if exclude is not None and
             not isinstance(exclude, str) else exclude}
    for key, value in given.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate()
    group = cfg.effective_group_size
    plan: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(matches(name, p) for p in cfg.exclude) or isinstance(module, _Quantized):
            continue
        if isinstance(module, TensorNetworkLinear):
            if cfg.cores:
                plan.append((name, module))
        elif isinstance(module, nn.Embedding):
            if cfg.embeddings:
                plan.append((name, module))
        elif is_linear_like(module) and cfg.dense:
            plan.append((name, module))
    inside_network = {n for n, m in plan if isinstance(m, TensorNetworkLinear)}
    plan = [(n, m) for n, m in plan if not any(n.startswith(p + ".") for p in inside_network)]

    # Build every replacement first (nothing in the model changes if this fails).
    by_weight: dict[int, QuantizedWeight] = {}
    replacements: list[tuple[str, nn.Module, _Quantized]] = []
    for name, module in plan:
        if isinstance(module, TensorNetworkLinear):
            new: _Quantized = QuantizedTensorNetworkLinear.from_module(module, cfg.bits, group)
        elif isinstance(module, nn.Embedding):
            shared = by_weight.get(id(module.weight))
            new = QuantizedEmbedding(shared, module.padding_idx) if shared else \
                QuantizedEmbedding.from_module(module, cfg.bits, group)
            by_weight.setdefault(id(module.weight), new.qweight)
        else:
            shared = by_weight.get(id(getattr(module, "weight", None)))
            new = QuantizedLinear.from_module(module, cfg.bits, group, shared)
            by_weight.setdefault(id(module.weight), new.qweight)
        replacements.append((name, module, new))

    report = QuantizeReport(cfg.bits, group)
    counted: set[int] = set()
    for name, module, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        weights = [q for q in new.modules() if isinstance(q, QuantizedWeight)]
        after = sum(q.nbytes for q in weights if id(q) not in counted)
        before = _float_bytes(module) if after else 0  # a tied table counts once
        counted.update(id(q) for q in weights)
        report.rows.append((name, new.kind, before, after))
    return report
