"""Folders written by earlier versions: the kept-rows layer stored as two cores.

Up to version 0.x the kept-rows layer was one module (``method: "interpolative"``) with
``cores.0 = Y`` ``(1, out - r, 1, r)``, ``cores.1 = Z`` ``(r, 1, in, 1)`` (its columns stored in
``input_order`` where that was set), ``bias`` ``(out,)`` in output order, and ``row_order`` in
the structure file. :func:`kept_rows_layer` builds today's
:class:`~tensornet_llm.layers.low_rank.KeptRowsLinear` for such an entry and rewrites its tensors
into today's names, so the loaded model computes the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..layers.low_rank import KeptRowsLinear
from ..layers.maxvol import inverse

__all__ = ["LEGACY_KEPT_ROWS", "kept_rows_layer", "convert_kept_rows"]

#: The ``method`` earlier versions recorded for the kept-rows layer.
LEGACY_KEPT_ROWS = "interpolative"


def kept_rows_layer(layout: dict[str, Any]) -> KeptRowsLinear:
    """The (meta) module for a legacy kept-rows entry of the structure file."""
    return KeptRowsLinear(layout["in_features"], layout["out_features"], layout["bond_dims"][0],
                          bias=layout["bias"], device="meta")


def convert_kept_rows(name: str, layout: dict[str, Any], state: dict[str, Tensor]) -> None:
    """Replace ``name``'s legacy tensors in ``state`` by :class:`KeptRowsLinear`'s (in place)."""
    m, n, r = layout["out_features"], layout["in_features"], layout["bond_dims"][0]
    y = state.pop(f"{name}.cores.0").reshape(m - r, r)
    z = state.pop(f"{name}.cores.1").reshape(r, n)
    if layout.get("input_order") is not None:  # Z's columns were stored in input_order
        z = z.index_select(1, inverse(torch.as_tensor(layout["input_order"])))
    order = torch.as_tensor(layout["row_order"], dtype=torch.long)
    stacked = inverse(order)
    state[f"{name}.kept.weight"], state[f"{name}.others.weight"] = z, y
    state[f"{name}.order"] = order
    if layout["bias"]:
        bias = state.pop(f"{name}.bias")
        kept = bias[stacked[:r]]
        state[f"{name}.kept.bias"] = kept
        state[f"{name}.others.bias"] = (bias[stacked[r:]].double()
                                        - y.double() @ kept.double()).to(bias.dtype)
