"""Two entries of torchao's int8 operator table, for int8 models run eagerly on a CPU.

torchao's ``Int8Tensor`` (0.18) computes both by converting the whole int8 weight to floating
point on every call, which on a CPU costs more than the float model's own step:

* **Row lookup** (``aten.embedding``). torchao dequantizes the whole table, then takes the rows:
  for SmolLM2's 49,152 x 576 table that is 28M conversions per decoded token, 75 ms on a 2-core
  CPU. :func:`_lookup` takes each looked-up row's int8 values, scales and zero points first and
  dequantizes them by torchao's ``dequantize_affine`` exactly as the whole table would be: bit
  for bit the same result.
* **Weight-only linear** (``F.linear`` / ``aten.linear``) in bfloat16 or float16, a few rows at
  a time (decoding). torchao writes ``mm(x, W_int8^T.to(dtype)) * scale``, the pattern
  torch.compile's CPU backend turns into torch's fused ``aten._weight_int8pack_mm``; eagerly
  it is a fresh float copy of the weight per call. :func:`_linear` calls
  ``_weight_int8pack_mm`` itself (what torchchat does on CPU): the same products and scales,
  rounded once instead of twice, so within one bfloat16 rounding of torchao's result. It stays
  with torchao's own code where that kernel does not apply or is slower: more than
  :data:`FUSED_ROWS` rows (a prompt); a float32 input (its float32 kernel is slower than
  torchao's conversion at SmolLM2's shapes); input features not a multiple of 16, or int8
  values not contiguous and 16-byte aligned (the kernel reads 16 features at a time with
  aligned loads: in torch 2.13 anything else crashes or returns wrong numbers; an input not
  contiguous and 32-byte aligned is copied first); scales per group or per tensor; activation
  quantization; a compiled graph (Inductor makes the same call); an input that needs a
  gradient (the kernel has no derivative); a tensor off the CPU.

Both are torchao's own extension point for its tensor subclasses. The library calls
:func:`register` wherever it makes or loads int8 weights (``quantize``, its saved folders); a
process that loads a torchao checkpoint without this library keeps torchao's own code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["register"]

_torchao_linear = None  # torchao's own linear, which _linear falls back to
#: The most rows (batch x tokens) the fused kernel takes: its time grows with the rows, and
#: from about 16 torchao's conversion and one matmul are faster (bench_int8_linear.md).
FUSED_ROWS = 16
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _lookup(func, types, args, kwargs) -> Tensor:
    """``aten.embedding(weight, indices, ...)`` for an ``Int8Tensor`` weight ``(rows, dim)``:
    output ``(*indices.shape, dim)``. The other arguments (padding index, scaling by frequency,
    sparse) concern only the gradient, which a quantized table has none of."""
    from torchao.quantization.quant_primitives import dequantize_affine

    weight, indices = args[0], args[1]
    if weight.block_size[0] != 1:  # scales shared across rows (per tensor): torchao's own way
        return func(weight.dequantize(), indices, *args[2:], **kwargs)
    rows = indices.reshape(-1)
    zero_point = None if weight.zero_point is None else weight.zero_point[rows]
    out = dequantize_affine(weight.qdata[rows], weight.block_size, weight.scale[rows],
                            zero_point, torch.int8, output_dtype=weight.dtype)
    return out.reshape(*indices.shape, weight.shape[-1])


def _linear(func, types, args, kwargs) -> Tensor:
    """``F.linear(x, weight, bias)`` for an ``Int8Tensor`` weight ``(out, in)`` with one
    symmetric scale per output row: ``x (..., in)`` -> ``(..., out)``."""
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if (torch.compiler.is_compiling() or is_fake(x) or x.dtype not in _LOW_PRECISION
            or x.shape[-1] % 16 or x.numel() > FUSED_ROWS * x.shape[-1] or x.device.type != "cpu"
            or (x.requires_grad and torch.is_grad_enabled())
            or list(weight.block_size) != [1, weight.shape[-1]]  # one scale per row only
            or weight.act_quant_kwargs is not None or weight.act_pre_scale is not None
            or not weight.qdata.is_contiguous() or weight.qdata.data_ptr() % 16):
        return _torchao_linear(func, types, args, kwargs)
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous() or rows.data_ptr() % 32:
        rows = rows.clone(memory_format=torch.contiguous_format)  # fresh, aligned
    out = torch.ops.aten._weight_int8pack_mm(rows, weight.qdata,
                                             weight.scale.reshape(-1).to(x.dtype))
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def register() -> None:
    """Put :func:`_lookup` and :func:`_linear` into ``Int8Tensor``'s operator table (once per
    process)."""
    global _torchao_linear
    if _torchao_linear is None:
        from torchao.quantization import Int8Tensor

        _torchao_linear = Int8Tensor._TORCH_FN_TABLE[Int8Tensor][F.linear]
        Int8Tensor.implements(torch.ops.aten.embedding.default)(_lookup)
        Int8Tensor.implements([torch.ops.aten.linear.default])(_linear)
        Int8Tensor.implements_torch_function(F.linear)(_linear)
