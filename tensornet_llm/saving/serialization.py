"""Save a compactified model to a directory and rebuild it exactly.

Directory layout::

    config.json               the base model's Hugging Face config
    generation_config.json    (when the model has one)
    model.safetensors         every parameter and persistent buffer; tied tensors stored once
    tensornet.json            the structure: per replaced module its method, shapes, bond dims;
                              per quantized module its kind, bits and grouping; and which
                              state-dict keys alias another (tied weights)

Loading builds the base architecture from ``config.json`` without allocating weights, swaps in
tensor-network modules of exactly the saved structure, then assigns the saved tensors, so the
reloaded model computes the same logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..helpers.files import atomic_directory
from ..layers.base import TensorNetworkLinear
from ..layers.layout import METHODS
from ..layers.quantized import QUANTIZED_TYPES, QuantizedModule

__all__ = ["save_compactified", "load_compactified", "STRUCTURE_FILE", "WEIGHTS_FILE"]

STRUCTURE_FILE = "tensornet.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def tensor_network_modules(model: nn.Module) -> dict[str, TensorNetworkLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorNetworkLinear)}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier key; return them as ``alias -> source``."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for key, tensor in state.items():
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                 tuple(tensor.shape), tuple(tensor.stride()))
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            unique[key] = tensor.detach().contiguous()
    return unique, aliases


def save_compactified(
    model: nn.Module, save_directory: str | os.PathLike, tokenizer: Any = None, **extra: Any
) -> Path:
    """Save ``model`` (compactified or not) so that :func:`load_compactified` rebuilds it.

    Args:
        tokenizer: optionally saved alongside (``tokenizer.save_pretrained``).
        extra: JSON-serialisable entries added to ``tensornet.json`` (e.g. the compactify
            settings).

    The directory is written to a temporary sibling first and renamed into place, so a failed
    save never leaves a half-written directory. Returns the directory path.
    """
    target = Path(save_directory)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError("model must be a Hugging Face PreTrainedModel with a config")
    state, aliases = _dedupe(model.state_dict())
    structure = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "modules": {n: m.layout() for n, m in tensor_network_modules(model).items()},
        "quantized": {n: m.layout() for n, m in model.named_modules() if isinstance(m, QuantizedModule)},
        "aliases": aliases,
        **extra,
    }
    from safetensors.torch import save_file

    with atomic_directory(target) as tmp:
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        save_file({k: v.cpu() for k, v in state.items()}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))
    return target


def _model_class(config, model_class, saved_architecture: str | None):
    if model_class is not None:
        return model_class
    import transformers

    archs = [saved_architecture] if saved_architecture else []
    archs += getattr(config, "architectures", None) or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"cannot tell the model class from config.architectures={archs!r}; pass model_class="
    )


def load_compactified(
    directory: str | os.PathLike,
    model_class: type | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_compactified`.

    Args:
        model_class: e.g. ``AutoModelForCausalLM`` or ``LlamaForCausalLM``; by default the class
            named in ``config.architectures``.
        device, dtype: where and in which dtype to put the loaded model (default: as saved, CPU).

    Returns:
        The model in eval mode, with the saved tensor-network structure and weights.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, GenerationConfig

    directory = Path(directory)
    structure_path = directory / STRUCTURE_FILE
    if not structure_path.is_file():
        raise FileNotFoundError(f"{directory} has no {STRUCTURE_FILE}: not saved by save_compactified")
    structure = json.loads(structure_path.read_text())
    if structure.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported {STRUCTURE_FILE} format {structure.get('format_version')!r}")
    config = AutoConfig.from_pretrained(directory)
    cls = _model_class(config, model_class, structure.get("architecture"))
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    for name, layout in structure["modules"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, METHODS[layout["method"]].from_layout(layout, device="meta"))
    for name, layout in structure.get("quantized", {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QUANTIZED_TYPES[layout["kind"]].from_layout(layout))
    state = load_file(directory / WEIGHTS_FILE, device=str(device) if device else "cpu")
    for alias, source in structure.get("aliases", {}).items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    # Quantized tables are tied through the aliases alone (their weights are not parameters).
    if structure.get("aliases") and hasattr(model, "tie_weights") and not structure.get("quantized"):
        model.tie_weights()
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise RuntimeError(f"parameters missing from the checkpoint: {on_meta[:5]}")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
