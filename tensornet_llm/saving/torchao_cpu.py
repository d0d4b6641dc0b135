"""Two entries of torchao's int8 operator table, for int8 models run eagerly on a CPU.

torchao's ``Int8Tensor`` (0.18) computes both by converting the whole int8 weight to floating
point on every call, which on a CPU costs more than the float model's own step:

* **Row lookup** (``aten.embedding``). torchao dequantizes the whole table, then takes the rows:
  for SmolLM2's 49,152 x 576 table that is 28M conversions per decoded token, 75 ms on a 2-core
  CPU. :func:`_lookup` takes each looked-up row's int8 values, scales and zero points first and
  dequantizes them by torchao's ``dequantize_affine`` exactly as the whole table would be: bit
  for bit the same result.
* **Weight-only linear** (``F.linear`` / ``aten.linear``), a few rows at a time (decoding).
  torchao writes ``mm(x, W_int8^T.to(dtype)) * scale``: eagerly a fresh float copy of the
  whole weight per call, which for a large weight is fresh memory from the system every call
  (glibc hands allocations of that size back on ``free``), paid in page faults.

  - In bfloat16 or float16, :func:`_linear` calls torch's fused ``_weight_int8pack_mm`` (what
    torch.compile's CPU backend makes of torchao's pattern, and what torchchat calls on CPU):
    the same products and scales, rounded once instead of twice, so within one bfloat16
    rounding of torchao's result. Not where the input features are not a multiple of 16 or
    the int8 values not contiguous and 16-byte aligned (the kernel reads 16 features at a time
    with aligned loads: in torch 2.13 anything else crashes or returns wrong numbers; an input
    not contiguous and 32-byte aligned is copied first).
  - In float32 (where that kernel is slower than torchao's conversion), :func:`_blocked`
    converts the weight :data:`BLOCK_ELEMENTS` at a time into one cache-sized buffer and
    multiplies block by block: torchao's products and scales in float32, with no weight-sized
    allocation (equal to torchao's result up to the order of float32 sums).

  Both stay with torchao's own code beyond :data:`FUSED_ROWS` rows (a prompt, where one
  conversion serves many rows), for scales per group or per tensor, activation quantization,
  a compiled graph (Inductor fuses the conversion itself), an input that needs a gradient (the
  kernels have no derivative) and a tensor off the CPU.

Both are torchao's own extension point for its tensor subclasses. The library calls
:func:`register` wherever it makes or loads int8 weights (``quantize``, its saved folders); a
process that loads a torchao checkpoint without this library keeps torchao's own code.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["register"]

_torchao_linear = None  # torchao's own linear, which _linear falls back to
#: The most rows (batch x tokens) the fused kernel and the blocked conversion take: the fused
#: kernel's time grows with the rows, and from about 16 torchao's conversion and one matmul are
#: faster; a prompt's rows share one conversion (bench_int8_linear.md).
FUSED_ROWS = 16
#: Weight entries :func:`_blocked` converts at a time: 4 MiB of float32, so a transformer
#: block's linears of SmolLM2's size are one block each (torchao's own product, one call), and a
#: large table goes in blocks that stay in the last-level cache while their products read them.
BLOCK_ELEMENTS = 1 << 20
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_buffers = threading.local()  # each thread's float32 block buffer and its views by shape


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


def _fused(rows: Tensor, weight) -> Tensor | None:
    """``rows (n, in) @ W^T`` by torch's fused kernel, or ``None`` where it does not apply
    (module docs)."""
    if rows.shape[-1] % 16 or not weight.qdata.is_contiguous() or weight.qdata.data_ptr() % 16:
        return None
    if not rows.is_contiguous() or rows.data_ptr() % 32:
        rows = rows.clone(memory_format=torch.contiguous_format)  # fresh, aligned
    return torch.ops.aten._weight_int8pack_mm(rows, weight.qdata,
                                              weight.scale.reshape(-1).to(rows.dtype))


def _block(height: int, width: int) -> Tensor:
    """A ``(height, width)`` float32 view of this thread's block buffer (kept per shape)."""
    views = getattr(_buffers, "views", None)
    if views is None or views[0].numel() < height * width:
        with torch.inference_mode(False):  # a plain tensor: writable in and out of that mode
            views = _buffers.views = (torch.empty(max(height * width, BLOCK_ELEMENTS)), {})
    buffer, shaped = views
    block = shaped.get((height, width))
    if block is None:
        block = shaped[height, width] = buffer[: height * width].view(height, width)
    return block


def _blocked(rows: Tensor, weight) -> Tensor:
    """``rows (n, in) @ W^T`` in float32, ``(n, out)``, as torchao computes it (``mm(x,
    W_int8^T.to(float32)) * scale``), with ``W``'s int8 rows converted :data:`BLOCK_ELEMENTS` at
    a time into one reused buffer: one block is torchao's own product."""
    values, scale = weight.qdata, weight.scale.reshape(-1).to(rows.dtype)
    n_out, n_in = values.shape
    step = max(1, min(n_out, BLOCK_ELEMENTS // n_in))
    if step == n_out:
        block = _block(n_out, n_in)
        block.copy_(values)
        return torch.mm(rows, block.t()).mul_(scale)
    out = rows.new_empty(rows.shape[0], n_out)
    for start in range(0, n_out, step):
        size = min(step, n_out - start)
        block = _block(size, n_in)
        block.copy_(values[start:start + size])
        torch.mm(rows, block.t(), out=out[:, start:start + size])
    return out.mul_(scale)


def _linear(func, types, args, kwargs) -> Tensor:
    """``F.linear(x, weight, bias)`` for an ``Int8Tensor`` weight ``(out, in)`` with one
    symmetric scale per output row: ``x (..., in)`` -> ``(..., out)``."""
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    out = None
    if not (torch.compiler.is_compiling() or is_fake(x) or x.device.type != "cpu"
            or x.numel() > FUSED_ROWS * x.shape[-1]
            or (x.requires_grad and torch.is_grad_enabled())
            or list(weight.block_size) != [1, weight.shape[-1]]  # one scale per row only
            or weight.act_quant_kwargs is not None or weight.act_pre_scale is not None):
        rows = x.reshape(-1, x.shape[-1])
        if x.dtype in _LOW_PRECISION:
            out = _fused(rows, weight)
        elif x.dtype == torch.float32:
            out = _blocked(rows, weight)
    if out is None:
        return _torchao_linear(func, types, args, kwargs)
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
