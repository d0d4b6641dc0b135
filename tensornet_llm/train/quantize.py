"""Weight-only int8 / int4 quantization of a whole model: the linears (the factors of low-rank
and kept-rows layers included), the embeddings and the cores of tensor-network layers.

CompactifAI's size figures come from two steps: tensorize, then quantize what remains.
:func:`quantize` does the second step:

* **int8** goes through torchao (``quantize_`` with ``Int8WeightOnlyConfig``) for every
  ``nn.Linear`` and ``nn.Embedding``: the weight becomes torchao's ``Int8Tensor``, the module
  stays what it was, and torch.compile, saving and loading handle it as torchao's own models.
  A tied table stays one tensor.
* The cores of MPO / TTNS layers are operands of a contraction, which torchao's tensors do not
  support (an ``Int8Tensor`` in ``einsum``: "Int8Tensor dispatch: attempting to run
  unimplemented operator/function: aten.unsqueeze"), GPT-2's ``Conv1D`` computes ``addmm`` with
  an ``(in, out)`` weight (unimplemented too), and int4 has no torchao kernel on a CPU
  (``Int4WeightOnlyConfig``: "Unsupported int4 packing format: opaque"; "Requires mslk";
  ``IntxWeightOnlyConfig(torch.int4)`` stores one byte per weight). Those are quantized by the
  layers of :mod:`tensornet_llm.layers.quantized`, written here for that reason.

Which modules are converted, and by which of the two, is
:mod:`~tensornet_llm.train.quantize_selection` (shared with quantization-aware training): a
module that subclasses ``nn.Linear`` or ``nn.Embedding`` with a forward of its own is converted
only where a probe shows its quantized form computes what that forward does
(:mod:`~tensornet_llm.train.quantize_probe`): torchao's int8, else the library's layer, else an
error naming the module.

Kept-rows layers are rounded in another form of the same map (module docs of
:meth:`~tensornet_llm.layers.low_rank.KeptRowsLinear.rounding_form`), and so are the members of
a cross-layer group with kept rows (an orthonormal shared basis,
:func:`~tensornet_llm.layers.cross_layer.plain_members`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from ..compress.slim import mlp_units
from ..compress.surgery import swap, swaps_undone_on_error
from ..helpers.evaluate import stored_tensors
from ..layers.base import TensorNetworkLinear
from ..layers.cross_layer import CrossLayerLinear, plain_members
from ..layers.low_rank import FactoredLinear, KeptRowsLinear, LowRankLinear, zero_padded
from ..layers.quantized import (
    QuantizedEmbedding, QuantizedLinear, QuantizedTensorNetworkLinear, QuantizedWeight,
)
from ..saving import attach
from ..saving.structure import resized_linears
from ..saving.tensors import int8_config
from .quantize_selection import (
    QuantizeConfig, as_quantize_config, by_torchao, in_other_form, leaves, probed,
    require_torchao,
)

__all__ = ["QuantizeReport", "low_rank_as_factors", "quantize"]

#: int8 linears in half precision run torch's fused kernel where their input features are a
#: multiple of this (:mod:`~tensornet_llm.saving.torchao_cpu`), so int8 pads low-rank ranks and
#: slim MLP widths up to it with zeros (the same map; at most 15 rows and columns more).
INT8_BLOCK = 16


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


def _kind(module: nn.Module) -> str:
    return "embedding" if isinstance(module, nn.Embedding) else \
        "tensor network" if isinstance(module, TensorNetworkLinear) else \
        "low-rank" if isinstance(module, FactoredLinear) else \
        "cross-layer" if isinstance(module, CrossLayerLinear) else "linear"


def _weight_bytes(module: nn.Module, counted: set[int]) -> int:
    """Bytes of ``module``'s weights not yet in ``counted``, which they join (a tied table, or
    the bases a cross-layer group shares, count on their first module): its float matrices
    (not the biases), torchao's parts of a quantized one, the library's codes and scales."""
    tensors = [t for p in module.parameters() if p.dim() > 1 for t in stored_tensors(p)] + [
        t for q in module.modules() if isinstance(q, QuantizedWeight) for t in (q.codes, q.scale)]
    fresh = {id(t): t for t in tensors if id(t) not in counted}
    counted.update(fresh)
    return sum(t.numel() * t.element_size() for t in fresh.values())


def _other_forms(model: nn.Module, cfg: QuantizeConfig) -> dict[str, nn.Module]:
    """``{name: form}`` for :func:`~.quantize_selection.in_other_form` (the members of one
    group get one new shared basis). Built, not swapped in."""
    found = in_other_form(model, cfg)
    forms = {n: m.rounding_form() for n, m in found if isinstance(m, KeptRowsLinear)}
    groups: dict[int, dict[str, CrossLayerLinear]] = {}
    for n, m in found:
        if isinstance(m, CrossLayerLinear):
            groups.setdefault(id(m.shared), {})[n] = m
    for members in groups.values():
        forms.update(zip(members, plain_members(list(members.values()))))
    return forms


def _int8_padding(model: nn.Module, cfg: QuantizeConfig) -> dict[str, nn.Module]:
    """int8: ``{name: module}`` giving every selected low-rank layer a rank, and every slim
    MLP a width, that is a multiple of :data:`INT8_BLOCK` (zeros: the same map). An MLP
    of the architecture's own width stays as it is, so a dense model stays an ordinary
    checkpoint."""
    if cfg.bits != 8:
        return {}
    found = dict(leaves(model, cfg))
    new: dict[str, nn.Module] = {
        n: m.padded(INT8_BLOCK) for n, m in model.named_modules() if isinstance(m, LowRankLinear)
        and m.rank % INT8_BLOCK and f"{n}.first" in found and f"{n}.second" in found}
    slim = resized_linears(model)
    for unit in mlp_units(model, [n for n in found if n in slim]):
        *inputs, down = unit.members
        width = -(-found[down].in_features // INT8_BLOCK) * INT8_BLOCK
        if width != found[down].in_features:
            new.update({n: zero_padded(found[n], width, found[n].in_features) for n in inputs})
            new[down] = zero_padded(found[down], found[down].out_features, width)
    return new


def low_rank_as_factors(model: nn.Module) -> int:
    """Replace every low-rank layer stored as kept rows
    (:class:`~tensornet_llm.layers.low_rank.KeptRowsLinear`) by its
    :meth:`~tensornet_llm.layers.low_rank.KeptRowsLinear.rounding_form`, and every cross-layer
    group stored as kept rows by the same maps with an orthonormal shared basis
    (:func:`~tensornet_llm.layers.cross_layer.plain_members`, ``in_rank^2`` more parameters per
    group): the forms :func:`quantize` rounds, so quantization-aware healing can train them.
    Returns how many modules were replaced."""
    forms = _other_forms(model, QuantizeConfig())
    for name, form in forms.items():
        swap(model, name, form)
    return len(forms)


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
    """Quantize ``model``'s weights in place (linears, low-rank factors, tensor-network cores,
    embeddings; module docs say which go through torchao).

    Arguments default to :class:`QuantizeConfig`'s fields (``config`` supplies others; explicit
    keywords win). Everything is validated before any module changes. A tied input embedding
    and LM head stay tied: both hold one quantized table. Quantize after compactify and after
    healing; the quantized weights do not train.

    Returns:
        A :class:`QuantizeReport`: the bytes of each converted layer's weights before and after
        (a compressed layer is one row, whatever form it is rounded in).
    """
    cfg = as_quantize_config(bits, config=config, group_size=group_size, cores=cores,
                             dense=dense, embeddings=embeddings, exclude=exclude)
    require_torchao(cfg)
    modules = dict(model.named_modules())  # as they are before any change
    compressed = tuple(n for n, m in modules.items()
                       if isinstance(m, (FactoredLinear, CrossLayerLinear)))
    done: list = []
    with swaps_undone_on_error(done):  # the same maps; nothing else changes if this fails
        done += [swap(model, name, form) for name, form in _other_forms(model, cfg).items()]
        done += [swap(model, name, m) for name, m in _int8_padding(model, cfg).items()]
        found = leaves(model, cfg)
        own = _own_layers(found, cfg, probed(found, cfg))
    units = dict.fromkeys(  # each leaf's row of the report: its compressed layer, or itself
        next((c for c in compressed if name == c or name.startswith(c + ".")), name)
        for name, _ in found)
    counted: set[int] = set()
    before = {unit: _weight_bytes(modules[unit], counted) for unit in units}
    for name, module in own.items():
        swap(model, name, module)
    _torchao_int8(model, [m for n, m in found if n not in own], cfg)

    report = QuantizeReport(cfg.bits, cfg.effective_group_size)
    counted.clear()
    for unit, nbytes in before.items():
        after = _weight_bytes(model.get_submodule(unit), counted)
        report.rows.append((unit, _kind(modules[unit]), nbytes, after))
    attach(model)  # so that model.save_pretrained writes what from_pretrained loads
    return report


def _own_layers(found: list[tuple[str, nn.Module]], cfg: QuantizeConfig, also: set[str]
                ) -> dict[str, nn.Module]:
    """``{name: the library's quantized layer}`` for each leaf torchao does not take (module
    docs), and for the leaves ``also`` names; leaves that share a weight (a tied table) share
    its quantized one."""
    group = cfg.effective_group_size
    own: dict[str, nn.Module] = {}
    by_weight: dict[int, QuantizedWeight] = {}
    for name, module in found:
        if by_torchao(module, cfg) and name not in also:
            continue
        if isinstance(module, TensorNetworkLinear):
            own[name] = QuantizedTensorNetworkLinear.from_module(module, cfg.bits, group)
            continue
        shared = by_weight.get(id(module.weight))
        if isinstance(module, nn.Embedding):
            own[name] = QuantizedEmbedding(shared, module.padding_idx) if shared else \
                QuantizedEmbedding.from_module(module, cfg.bits, group)
        else:
            own[name] = QuantizedLinear.from_module(module, cfg.bits, group, shared)
        by_weight.setdefault(id(module.weight), own[name].qweight)
    return own


def _torchao_int8(model: nn.Module, modules: list[nn.Module], cfg: QuantizeConfig) -> None:
    """torchao's ``quantize_`` on ``modules`` of ``model``, each once; modules that shared one
    float weight (a tied table) share the quantized one afterwards (torchao would quantize it
    twice, untied). Nothing to do (int4, or nothing selected) needs no torchao."""
    if not modules:
        return
    from torchao.quantization import quantize_

    leaders: dict[int, nn.Module] = {}
    for module in modules:
        leaders.setdefault(id(module.weight), module)
    followers = [(m, leaders[id(m.weight)]) for m in modules if leaders[id(m.weight)] is not m]
    pending = {id(m) for m in leaders.values()}

    def once(module: nn.Module, _fqn: str) -> bool:  # torchao walks a shared module per parent
        taken = id(module) in pending
        pending.discard(id(module))
        return taken

    quantize_(model, int8_config(cfg.group_size), filter_fn=once)
    for module, leader in followers:
        module.weight = leader.weight

