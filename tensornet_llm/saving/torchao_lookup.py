"""An embedding lookup in torchao's int8 tables that converts only the rows it returns.

torchao's ``Int8Tensor`` (0.18) answers ``aten.embedding`` by dequantizing the whole table and
then taking the rows: for SmolLM2's 49,152 x 576 table that is 28M conversions per decoded
token, 75 ms on a 2-core CPU, more than the rest of an int8 decode step. :func:`register` puts,
in that entry of ``Int8Tensor``'s operator table (torchao's own extension point for its tensor
subclasses), the same arithmetic on the looked-up rows only: each row's int8 values, scales and
zero points are taken first and dequantized by torchao's ``dequantize_affine`` exactly as the
whole table would be, so the result is bit for bit the same (tests/test_quantize.py).

The library calls :func:`register` wherever it makes or loads int8 weights (``quantize``, its
saved folders); a process that loads a torchao checkpoint without this library keeps torchao's
own lookup.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["register"]

_registered = False


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


def register() -> None:
    """Make ``Int8Tensor`` tables look up rows as the module docs say (once per process)."""
    global _registered
    if not _registered:
        from torchao.quantization import Int8Tensor

        Int8Tensor.implements(torch.ops.aten.embedding.default)(_lookup)
        _registered = True
