"""MoDeGPT's rule for MLPs, the published anchor beside the library's slim MLPs.

MoDeGPT (Lin et al., arXiv 2408.09632) compresses a gated MLP (its "type I" module) by a
Nystrom approximation: it keeps the ``k`` intermediate neurons with the largest ridge leverage
scores of the correlation ``C`` of ``down_proj``'s input on calibration text,

    s_i = [C (C + lambda I)^-1]_ii,

keeps their rows of ``gate_proj`` and ``up_proj``, and refits ``down_proj`` by least squares,
``W C[:, S] C[S, S]^-1``. What this anchor takes from it, and what it does not:

* the neuron rule and the refit above, with ``lambda`` the mean diagonal of ``C`` (the paper
  leaves it a setting);
* the same width ``k`` in every block (the paper's global allocation by layer importance is
  not reproduced) and attention left dense (its type II / III attention compressions are not
  reproduced), ``k`` chosen so that the model keeps the same share of the targets' parameters
  as ``compactify(ratio=keep)``;
* ``C`` from the dense model's activations, one pass over the calibration text.

So the row it gives compares the neuron choice and the uniform widths with the library's budget
at the same parameters, and with ``compactify(..., exclude=["self_attn"])`` (attention dense
too) most directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tensornet_llm.compress.fit import CovarianceCollector
from tensornet_llm.compress.slim import mlp_units, refit_down, slim_layers
from tensornet_llm.compress.targets import find_targets

from harness import target_parameters


@dataclass
class AnchorReport:
    """What ``harness.held_out_row`` reads of a compression: the kept share and the choices."""

    kept_fraction: float
    width: int

    def choices(self) -> dict[str, int]:
        return {"width": self.width}


def ridge_leverage(gram: Tensor, ridge: float) -> Tensor:
    """``diag(C (C + ridge I)^-1)`` of a symmetric ``(m, m)`` ``gram``: ``(m,)``, float64."""
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    values = values.clamp_min(0)
    return (vectors.square() * (values / (values + ridge))).sum(dim=1)


def uniform_width(model: nn.Module, keep: float) -> tuple[list[str], int]:
    """The gated MLPs among the default targets, and the width ``k`` (a multiple of 8) at which
    slimming all of them, attention dense, keeps ``keep`` of the targets' parameters."""
    total = target_parameters(model)
    units = [u for u in mlp_units(model, [n for n, _ in find_targets(model)[0]]) if u.gate]
    mlps = [model.get_submodule(u.name) for u in units]
    mlp_total = sum(p.numel() for mlp in mlps
                    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                    for p in layer.parameters())
    per_neuron = sum(mlp.gate_proj.in_features + mlp.up_proj.in_features
                     + mlp.down_proj.out_features + (mlp.gate_proj.bias is not None)
                     + (mlp.up_proj.bias is not None) for mlp in mlps)
    fixed = sum(mlp.down_proj.out_features for mlp in mlps if mlp.down_proj.bias is not None)
    width = int((keep * total - (total - mlp_total) - fixed) / per_neuron) // 8 * 8
    if width <= 0:
        raise SystemExit(f"keep {keep:.0%}: attention alone holds more than that")
    return [u.name for u in units], width


@torch.no_grad()
def modegpt_mlps(model: nn.Module, calibration: list[Tensor], keep: float) -> AnchorReport:
    """Slim every gated MLP of ``model`` in place by MoDeGPT's rule (module docs) at the width
    that keeps ``keep`` of the targets' parameters."""
    total = target_parameters(model)
    names, width = uniform_width(model, keep)
    # C: the second moment of each down_proj's input over every calibration token (float64)
    with CovarianceCollector({n: model.get_submodule(n).down_proj for n in names}) as grams:
        for ids in calibration:
            model(input_ids=ids)
    for name in names:
        mlp = model.get_submodule(name)
        gram = grams.take(name)
        scores = ridge_leverage(gram, float(gram.diagonal().mean()))
        kept = scores.topk(width).indices.sort().values
        down_weight = refit_down(mlp.down_proj.weight, gram, kept, ridge=0.0)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = slim_layers(
            mlp.gate_proj, mlp.up_proj, mlp.down_proj, kept, down_weight)
    return AnchorReport(kept_fraction=target_parameters(model) / total, width=width)
