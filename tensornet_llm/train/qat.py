"""Quantization-aware training: the model computes with the weights :func:`quantize` will
give it, and its gradients update the float weights (the straight-through estimate).

:func:`rounding_plan` lists every float tensor :func:`~tensornet_llm.train.quantize.quantize`
(same arguments) would round and how; :func:`rounded_weights` holds the rounded values in place
for the length of a block (``heal(..., quantize=4)`` wraps each forward and backward in it).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers.base import TensorNetworkLinear
from ..layers.cross_layer import CrossLayerLinear
from ..layers.low_rank import KeptRowsLinear
from ..layers.quantized import QuantizedTensorNetworkLinear, round_tensor
from ..saving.tensors import int8_config
from .quantize_selection import (QuantizeConfig, as_quantize_config, by_torchao, channel_dim,
                                 in_other_form, leaves, probed, require_torchao)

__all__ = ["rounding_plan", "rounded_weights"]


def _round_torchao(p: Tensor, cfg: QuantizeConfig) -> Tensor:
    """``p`` (an ``(out, in)`` weight or an embedding table) as torchao's int8 stores it."""
    from torchao.quantization import Int8Tensor

    return Int8Tensor.from_hp(p.detach(), int8_config(cfg.group_size).granularity
                              ).dequantize().to(p.dtype)


def rounding_plan(model: nn.Module, bits: "int | QuantizeConfig | None" = None,
                  **options: Any) -> list[tuple[nn.Parameter, Callable[[Tensor], Tensor]]]:
    """``(parameter, rounding)`` of every float tensor :func:`quantize` (same arguments) would
    round, each once (a tied table, a group's shared basis): ``rounding(parameter)`` is the
    value the quantized model computes with. A layer that ``quantize`` rounds in another form
    (kept rows) is refused: its parameters cannot take that form."""
    cfg = as_quantize_config(bits, **options)
    require_torchao(cfg)
    for name, module in in_other_form(model, cfg):
        if isinstance(module, CrossLayerLinear) and module.kept is None:
            continue  # named by its group's member with kept rows
        form = "two balanced factors or one linear" if isinstance(module, KeptRowsLinear) \
            else "members with an orthonormal shared basis"
        raise ArgumentError(f"{name} is stored with kept rows, which quantize() rounds as {form}, "
                            "a form its own parameters cannot take; call "
                            "low_rank_as_factors(model) first (the same maps in that form)")
    group = cfg.effective_group_size
    plan: dict[int, tuple[nn.Parameter, Callable[[Tensor], Tensor]]] = {}
    found = leaves(model, cfg)
    own = probed(found, cfg)  # torchao cannot run these: quantize gives them its own layers
    for name, module in found:
        if by_torchao(module, cfg) and name not in own:
            legs = [(module.weight, partial(_round_torchao, cfg=cfg))]
        else:
            tensors = [(c, QuantizedTensorNetworkLinear._channel_dim(tuple(c.shape)))
                       for c in module.cores] if isinstance(module, TensorNetworkLinear) \
                else [(module.weight, channel_dim(module))]
            legs = [(t, partial(round_tensor, bits=cfg.bits, group_size=group, channel_dim=d))
                    for t, d in tensors]
        for t, rounding in legs:
            plan.setdefault(id(t), (t, rounding))
    return list(plan.values())


@contextmanager
def rounded_weights(model: nn.Module, bits: "int | QuantizeConfig | None" = None,
                    **options: Any) -> Iterator[None]:
    """Within the block, every weight that :func:`quantize` (same arguments) would round holds
    its rounded value, so ``model`` computes what the quantized model will; the float values
    come back on exit. Gradients computed inside are taken at the rounded weights and, applied
    to the float ones after the block, make the straight-through estimate of
    quantization-aware training (``heal(..., quantize=4)``)."""
    saved = []
    try:
        with torch.no_grad():
            for p, rounding in rounding_plan(model, bits, **options):
                saved.append((p, p.detach().clone()))
                p.copy_(rounding(p))
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
