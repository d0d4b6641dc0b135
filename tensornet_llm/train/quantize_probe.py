"""Whether a quantized form of a module computes what the module computes.

:func:`~tensornet_llm.train.quantize.quantize` converts ``nn.Linear`` and ``nn.Embedding``
modules. Where a model subclasses them with a forward of its own, the quantized form may not
run it, or not compute it: Falcon's ``FalconLinear`` computes ``x @ weight.T``, which torchao's
``Int8Tensor`` does not implement; Gemma's scaled embedding multiplies the rows it looks up by
``sqrt(hidden_size)``, which the library's own int4 table (a plain lookup) would drop. Such a
module is probed on its first :data:`PROBE_ROWS` output rows (or table rows): the quantized
form's output against the module's own forward with the dequantized weight put in
(``torch.func.functional_call``). A form is used only where the two agree to float rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import first_line
from ..layers.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight

__all__ = ["PROBE_ROWS", "has_own_forward", "torchao_mismatch", "own_mismatch"]

#: Output rows (or table rows) a probe quantizes and compares.
PROBE_ROWS = 16


def has_own_forward(module: nn.Module) -> bool:
    """An ``nn.Linear`` or ``nn.Embedding`` subclass whose forward is not the base class's."""
    return (isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward) or (
        isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward)


def _sliced(module: nn.Module) -> dict[str, Tensor]:
    """The first rows of ``module``'s weight (and bias, for a linear)."""
    rows = {"weight": module.weight.detach()[:PROBE_ROWS]}
    if isinstance(module, nn.Linear) and module.bias is not None:
        rows["bias"] = module.bias.detach()[:PROBE_ROWS]
    return rows


def _probe(module: nn.Module, rows: int) -> Tensor:
    """Token ids ``(1, rows)`` for an embedding, else inputs ``(1, 3, in_features)``."""
    weight = module.weight
    if isinstance(module, nn.Embedding):
        return torch.arange(rows, device=weight.device)[None]
    g = torch.Generator(device=weight.device).manual_seed(0)
    return torch.randn(1, 3, weight.shape[1], generator=g, device=weight.device,
                       dtype=weight.dtype)


@torch.no_grad()
def _mismatch(module: nn.Module, run: Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, Tensor]],
              unprobed: str | None) -> str | None:
    """Why ``run(x, rows)`` (the form's output on ``x`` and its dequantized weight rows) is not
    the module's own output with those rows put in, or ``None``: relative error at most 1e-4
    in float32, 3e-2 in half precision (one rounding of the products). A module whose forward
    does not take the probe at all (OPT's positions embedding reads an attention mask) gives
    ``unprobed``."""
    rows = _sliced(module)
    x = _probe(module, rows["weight"].shape[0])
    try:
        functional_call(module, rows, (x,))
    except Exception as exc:  # the forward wants other inputs than a lookup or a product
        return None if unprobed is None else f"{unprobed}: {first_line(exc)}"
    try:
        out, dequantized = run(x, rows)
    except Exception as exc:  # whatever the form cannot run is named in the error
        return first_line(exc)
    ref = functional_call(module, {**rows, "weight": dequantized.to(rows["weight"].dtype)}, (x,))
    if out.shape != ref.shape:
        return f"output of shape {tuple(out.shape)} instead of {tuple(ref.shape)}"
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    tol = 1e-4 if module.weight.dtype == torch.float32 else 3e-2
    return None if err <= tol else f"its output is off by {err:.0%}"


def torchao_mismatch(module: nn.Module, config) -> str | None:
    """Why ``module``'s forward does not run right on its weight quantized by torchao's
    ``config`` (the module kept, its weight a torchao tensor), or ``None``; also ``None`` for
    a forward the probe cannot call: it stays the module's own, and torchao's tensor either
    computes each operation on the dequantized weight or raises."""
    from torchao.quantization import quantize_

    def run(x: Tensor, rows: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        w = rows["weight"]
        holder = nn.Embedding(*w.shape) if isinstance(module, nn.Embedding) else nn.Linear(
            w.shape[1], w.shape[0], bias=False)
        holder.weight = nn.Parameter(w.clone(), requires_grad=False)
        quantize_(holder, config, filter_fn=lambda m, _fqn: m is holder)
        return functional_call(module, {**rows, "weight": holder.weight}, (x,)), (
            holder.weight.dequantize())

    return _mismatch(module, run, None)


def own_mismatch(module: nn.Module, bits: int, group_size: int | None) -> str | None:
    """Why the library's quantized layer that would replace ``module``
    (:class:`~tensornet_llm.layers.quantized.QuantizedLinear` or ``QuantizedEmbedding``, a
    plain product or lookup) does not compute what ``module`` computes, or ``None``."""
    def run(x: Tensor, rows: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        weight = QuantizedWeight(rows["weight"], bits, group_size, 0)
        form = QuantizedEmbedding(weight) if isinstance(module, nn.Embedding) else (
            QuantizedLinear(weight, rows.get("bias")))
        return form(x), form.weight

    return _mismatch(module, run, "it does not take token ids or inputs alone, so the "
                     "library's layer cannot stand in for it")
