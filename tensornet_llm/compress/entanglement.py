"""Entanglement profile: how much correlation each bond of each layer has to carry.

Cut a layer's weight, seen as a tensor over its sites, across one bond of a tensor network;
the singular values ``s`` across that cut are its entanglement spectrum and
``H = -sum p log p`` with ``p = s^2 / sum s^2`` its entanglement entropy. Normalised by the
largest possible value ``log(m)`` it lies in [0, 1]: near 0 the bond needs few values (the
layer compresses well there), near 1 all values matter equally. The tree-tensor-network view
of LLM layers uses this to say which layers tolerate a small chi.

Dense targets are decomposed exactly (every singular value kept); layers that are already
:class:`~tensornet_llm.layers.base.TensorNetworkLinear` report the spectrum of the operator they
compute now (:meth:`~tensornet_llm.layers.base.TensorNetworkLinear.measure_spectra`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..errors import ArgumentError
from ..layers.base import TensorNetworkLinear, is_linear_like
from ..layers.layout import COMPRESSED, METHODS, Layout
from ..layers.low_rank import FactoredLinear
from .sensitivity import module_position
from .targets import Targets, find_targets

__all__ = ["EntanglementRow", "entanglement_profile", "layer_entropy"]


@dataclass
class EntanglementRow:
    """One bond of one layer."""

    name: str
    block: str | None
    module_type: str
    method: str
    bond: int  # index of the bond (MPO: left to right; TTNS: tree nodes in post-order)
    rank: int  # number of non-negligible singular values across the cut
    entropy: float  # normalised entanglement entropy in [0, 1]
    entropy_nats: float  # the same, not normalised


@torch.no_grad()
def entanglement_profile(
    model: nn.Module,
    method: str = "mpo",
    n_sites: int = 3,
    *,
    targets: Targets = None,
    exclude: Iterable[str] | None = None,
    progress: bool = False,
) -> list[EntanglementRow]:
    """One row per bond of every targeted layer (dense targets and tensor-network layers).

    Args:
        method, n_sites: the network the dense layers are cut as (tensor-network layers use
            their own structure).
        targets, exclude: which dense modules, as for :func:`~tensornet_llm.compactify`.
    """
    if method not in METHODS:
        raise ArgumentError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 2:
        raise ArgumentError(f"n_sites must be an integer >= 2 (one bond at least), got {n_sites!r}")
    layers: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in model.named_modules() if isinstance(m, COMPRESSED)
    ]
    chosen, _ = find_targets(model, targets, exclude)
    layers += [(n, m) for n, m in chosen if is_linear_like(m)]
    rank = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    layers.sort(key=lambda item: rank.get(item[0], len(rank)))
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="entanglement", unit="layer")
    rows = []
    cls = METHODS[method]
    for name, module in layers:
        if isinstance(module, TensorNetworkLinear):
            spectra, kind = module.measure_spectra(), module.method
        elif isinstance(module, FactoredLinear):  # one bond: the singular values of W
            with torch.no_grad():
                exact = Layout.low_rank(module.in_features, module.out_features, False
                                        ).factor_form().decompose(module.to_dense(), None,
                                                                  module.rank)
            spectra, kind = exact.spectra, module.method
        else:
            # Full chi: every singular value across every cut is kept.
            exact = cls.from_linear(module, chi=1 << 30, n_sites=n_sites)
            spectra, kind = exact.spectra or [], method
        block, module_type = module_position(model, name)
        for b, spectrum in enumerate(spectra):
            values = spectrum.values
            # "Non-negligible": above the round-off level of the dtype the SVD ran in.
            cutoff = float(values.max()) * torch.finfo(values.dtype).eps * 100 if values.numel() else 0
            significant = int((values > cutoff).sum())
            rows.append(EntanglementRow(
                name=name, block=block, module_type=module_type, method=kind, bond=b,
                rank=significant, entropy=spectrum.entropy(True),
                entropy_nats=spectrum.entropy(False),
            ))
    return rows


def layer_entropy(rows: list[EntanglementRow]) -> dict[str, float]:
    """Mean normalised entropy over the bonds of each layer, ``{name: entropy}``."""
    sums: dict[str, list[float]] = {}
    for r in rows:
        sums.setdefault(r.name, []).append(r.entropy)
    return {n: sum(v) / len(v) for n, v in sums.items()}
