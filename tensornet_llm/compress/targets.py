"""Which modules of a model ``compactify`` replaces.

Default targets are the linear projections inside the model's stack of repeated blocks
(attention and MLP of every transformer layer): ``nn.Linear`` (or a subclass) or GPT-2's
``Conv1D``, found inside an ``nn.ModuleList`` of blocks. Token embeddings, the LM head,
classification heads and poolers live outside the block stack and are never default targets;
``lm_head=True`` adds the output embedding (the LM head) to any selection.

Patterns, used for ``targets``, ``exclude`` and per-module overrides:

* ``"re:<regex>"`` -- the regex must match the whole qualified name (``re.fullmatch``);
* anything else -- matches whole dotted components anywhere in the name: ``"q_proj"`` matches
  ``model.layers.3.self_attn.q_proj``; ``"layers.0"`` (or ``"layers.0."``) matches every module
  under block 0 but not ``layers.10``.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, TypeVar, Union

from torch import Tensor, nn

from ..errors import ArgumentError
from ..layers.base import is_linear_like, is_plain
from ..layers.layout import COMPRESSED

__all__ = [
    "Filter", "matches", "resolve_override", "find_targets", "fused_expert_tensors", "block_stacks",
    "block_prefix", "output_embedding", "shared_weights",
]

#: ``filter(module, qualified_name) -> bool``, as torchao's ``filter_fn``.
Filter = Callable[[nn.Module, str], bool]
Targets = Union[None, str, Iterable[str], Filter]
T = TypeVar("T")

DEFAULT_KEY = "_default"


def matches(name: str, pattern: str) -> bool:
    """Does a module's qualified ``name`` match ``pattern`` (see the module docs)?"""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    core = pattern.strip(".")
    return bool(core) and f".{core}." in f".{name}."


def check_pattern(pattern: object, argument: str) -> str:
    if not isinstance(pattern, str) or not pattern.strip("."):
        raise ArgumentError(f"{argument} patterns must be non-empty strings, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ArgumentError(f"{argument} has an invalid regex {pattern!r}: {exc}") from None
    return pattern


def resolve_override(value: T | Mapping[str, T], name: str, argument: str) -> T:
    """The setting for module ``name``: ``value`` itself, or the first matching pattern of a
    ``{pattern: value, "_default": value}`` mapping (insertion order)."""
    if not isinstance(value, Mapping):
        return value
    for pattern, setting in value.items():
        if pattern != DEFAULT_KEY and matches(name, pattern):
            return setting
    if DEFAULT_KEY in value:
        return value[DEFAULT_KEY]
    raise ArgumentError(
        f"{argument} has no pattern matching module {name!r} and no {DEFAULT_KEY!r} entry; "
        f"patterns: {[p for p in value if p != DEFAULT_KEY]}"
    )


def block_stacks(model: nn.Module) -> list[str]:
    """Qualified names of ModuleLists that hold repeated blocks (the transformer layers)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name
    ]


def block_prefix(name: str, stacks: list[str]) -> str | None:
    """The block a module lives in (``"model.layers.3"`` for ``"model.layers.3.mlp.up_proj"``),
    given the model's :func:`block_stacks`; ``None`` outside every block."""
    for stack in sorted(stacks, key=len, reverse=True):
        if name.startswith(stack + "."):
            index = name[len(stack) + 1 :].split(".", 1)[0]
            return f"{stack}.{index}"
    return None


def output_embedding(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (``get_output_embeddings()``, the LM head), or ``None``."""
    fn = getattr(model, "get_output_embeddings", None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def shared_weights(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """``{target name: parameter name}`` for the targets whose weight is also a parameter of a
    module that is not a target (an LM head tied to the input embedding): replacing such a
    target leaves that table in place."""
    target_ids = {id(m) for _, m in chosen}
    owners: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in target_ids:
            continue
        for param_name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), f"{module_name}.{param_name}" if module_name else param_name)
    shared = {}
    for name, module in chosen:
        weight = getattr(module, "weight", None)
        if weight is not None and id(weight) in owners:
            shared[name] = owners[id(weight)]
    return shared


def _head_ids(model: nn.Module) -> set[int]:
    fn = getattr(model, "get_input_embeddings", None)
    try:
        embedding = fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    return {id(m) for m in (output_embedding(model), embedding) if m is not None}


def find_targets(
    model: nn.Module,
    targets: Targets = None,
    exclude: Iterable[str] | None = None,
    min_features: int = 16,
    lm_head: bool = False,
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """Modules to tensorize, and ``(name, reason)`` for linear-like modules left alone.

    Args:
        targets: ``None`` (default rule), a pattern or list of patterns, or a filter on
            ``(module, qualified_name)``. User targets must be linear-like modules.
        exclude: patterns removed from the targets.
        min_features: the default rule skips layers with fewer input or output features
            (routers, gates with one output), where a network cannot save anything.
        lm_head: also the output embedding (unless excluded); an error if the model has no
            linear one.
    """
    exclude = [check_pattern(p, "exclude") for p in (exclude or [])]
    if isinstance(targets, str):
        targets = [targets]
    if targets is not None and not callable(targets):
        targets = [check_pattern(p, "targets") for p in targets]
        if not targets:
            raise ArgumentError("targets must name at least one pattern, or be None for the default")
    stacks = block_stacks(model)
    heads = _head_ids(model)
    chosen: list[tuple[str, nn.Module]] = []
    skipped: list[tuple[str, str]] = []
    inside = None  # the compressed layer whose parts come next (depth first): not targets
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or (inside is not None and name.startswith(inside)):
            continue
        if isinstance(module, COMPRESSED):
            inside = name + "."
            continue
        if targets is None:
            if not is_linear_like(module):
                continue
            if id(module) in heads:
                continue
            if not any(name.startswith(s + ".") for s in stacks):
                continue
            out_f, in_f = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
            if min(in_f, out_f) < min_features:
                skipped.append((name, f"{in_f}->{out_f} is below min_features={min_features}"))
                continue
        else:
            picked = targets(module, name) if callable(targets) else any(
                matches(name, p) for p in targets
            )
            if not picked:
                continue
            if not is_linear_like(module):
                if callable(targets):
                    raise ArgumentError(
                        f"targets selected {name!r} ({type(module).__name__}); only nn.Linear "
                        "and transformers' Conv1D can be tensorized"
                    )
                continue  # a pattern naming a parent block selects the linears inside it
        if any(matches(name, p) for p in exclude):
            skipped.append((name, "excluded"))
            continue
        chosen.append((name, module))
    if lm_head:
        head = output_embedding(model)
        if head is None or not is_linear_like(head):
            raise ArgumentError(
                f"lm_head=True, but {type(model).__name__}.get_output_embeddings() returns "
                f"{type(head).__name__ if head is not None else None}, not an nn.Linear")
        name = next(n for n, m in model.named_modules() if m is head)
        if any(matches(name, p) for p in exclude):
            skipped.append((name, "excluded"))
        elif not any(m is head for _, m in chosen):
            chosen.append((name, head))
    for name, module in chosen:
        _check_float(name, module.weight)
    return chosen, skipped


def _check_float(name: str, weight: Tensor) -> None:
    """Refuse a quantized weight (torchao's tensor subclasses, bitsandbytes' ``Int8Params`` /
    ``Params4bit``, integers): its SVD would fail deep inside, or fit the rounding."""
    if not is_plain(weight) or not weight.is_floating_point():
        raise ArgumentError(
            f"{name} holds quantized weights ({type(weight).__name__}, {weight.dtype}); "
            "compactify compresses floating-point weights: load the model unquantized, "
            "compress it, then quantize (tensornet_llm.quantize)")


def fused_expert_tensors(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """3-D (or higher) weight parameters, such as fused MoE experts, which are not tensorized."""
    return [
        (name, tuple(p.shape)) for name, p in model.named_parameters() if p.dim() >= 3
    ]
