"""Save a compactified model to a directory and rebuild it exactly.

Directory layout::

    config.json               the base model's Hugging Face config, with a quantization_config
                              of method "tensornet" holding the structure (below), which
                              from_pretrained reads (saving.transformers_plugin)
    generation_config.json    (when the model has one)
    model.safetensors         every parameter and persistent buffer; tied tensors stored once;
                              a zero-size tensor at each replaced module's dense weight key
                              (structure.marker_keys)
                              (or shards ``model-00001-of-00009.safetensors`` ... with the
                              Hugging Face index ``model.safetensors.index.json``, as streaming
                              compression writes them)
    tensornet.json            the structure: per replaced module its method, shapes, bond dims;
                              per cross-layer member its group, index and ranks; per quantized
                              module its kind, bits and grouping; and which state-dict keys
                              alias another (tied weights, the bases a cross-layer group shares)

Loading builds the base architecture from ``config.json`` without allocating weights, swaps in
tensor-network modules of exactly the saved structure, then assigns the saved tensors, so the
reloaded model computes the same logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ArgumentError, CheckpointError, InputFileError, first_line
from ..helpers.files import MARKER, atomic_directory, check_output
from .legacy import LEGACY_KEPT_ROWS, convert_kept_rows
from .tensors import dedupe, flatten, is_torchao_tensor, realigned, torchao_to_dtype, unflatten
from .structure import (
    FORMAT_VERSION, add_quantization_config, build_structure, describe, marker_keys, replaced,
    with_markers,
)

__all__ = ["save_compactified", "load_compactified", "STRUCTURE_FILE", "WEIGHTS_FILE",
           "WEIGHTS_INDEX", "shard_name", "model_class_of", "read_weight_map"]

STRUCTURE_FILE = "tensornet.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
#: File names a save writes itself (``files=`` may not use them).
RESERVED = frozenset({STRUCTURE_FILE, WEIGHTS_FILE, WEIGHTS_INDEX, "config.json",
                      "generation_config.json", MARKER})


def shard_name(index: int, total: int) -> str:
    """The Hugging Face name of weight shard ``index`` (from 1) of ``total``."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def save_compactified(
    model: nn.Module, save_directory: str | os.PathLike, tokenizer: Any = None, *,
    overwrite: bool = False, files: Mapping[str, str | bytes] | None = None, **extra: Any
) -> Path:
    """Save ``model`` (compactified or not) so that :func:`load_compactified` rebuilds it.

    Args:
        tokenizer: optionally saved alongside (``tokenizer.save_pretrained``).
        overwrite: replace ``save_directory`` even if it is not a previous output of this
            library. Without it, an existing directory is replaced only if it is empty or was
            written by this library (a previous save, say); anything else is refused before any
            work, with :class:`~tensornet_llm.errors.OutputExistsError`.
        files: more files to write into the directory, ``{name: text or bytes}`` (a report,
            say); they are part of the same all-or-nothing write.
        extra: JSON-serialisable entries added to ``tensornet.json`` (e.g. the compactify
            settings).

    The directory is written to a temporary sibling first and renamed into place, so a failed
    or interrupted save never leaves a half-written directory, and a previous output is replaced
    only once the new one is complete. Returns the directory path.
    """
    target = Path(save_directory)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ArgumentError("model must be a Hugging Face PreTrainedModel with a config")
    adapted = next((n for n, m in model.named_modules() if hasattr(m, "merged_adapters")
                    and isinstance(getattr(m, "base_layer", None), nn.Module)), None)
    if adapted is not None:  # a checkpoint with peft's wrappers in it would not load
        raise ArgumentError(
            f"model has peft adapters ({adapted}): save them with peft's save_pretrained and the "
            "model without them (save it before get_peft_model, or after merge_and_unload())")
    files = dict(files or {})
    for name in files:
        if not isinstance(name, str) or not name or Path(name).name != name or name in RESERVED:
            raise ArgumentError(f"files: {name!r} is not a plain file name the save may use "
                                f"(reserved: {sorted(RESERVED)})")
    check_output(target, overwrite, known=(STRUCTURE_FILE,))
    state, aliases = dedupe(model.state_dict())
    description = describe(model, aliases, **extra)
    from safetensors.torch import save_file

    with atomic_directory(target, overwrite, known=(STRUCTURE_FILE,)) as tmp:
        config.save_pretrained(tmp)
        if replaced(description):
            add_quantization_config(tmp / "config.json", description)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        tensors, metadata = flatten(state)  # torchao's weights as their parts, then the
        tensors = with_markers(tensors, replaced(description))  # markers (at free keys)
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt", **metadata})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in files.items():
            path = tmp / name
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        (tmp / STRUCTURE_FILE).write_text(json.dumps(description, indent=1))
    return target


def _read_structure(directory: Path) -> dict[str, Any]:
    """``tensornet.json`` of a saved directory, checked to be what :func:`save_compactified`
    writes."""
    path = directory / STRUCTURE_FILE
    if not directory.is_dir():
        raise InputFileError(f"{directory} is not a directory")
    if not path.is_file():
        raise InputFileError(f"{directory} has no {STRUCTURE_FILE}: not saved by save_compactified")
    try:
        structure = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({first_line(exc)})") from exc
    if not isinstance(structure, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(structure).__name__}")
    if structure.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version "
                              f"{structure.get('format_version')!r} (this version reads "
                              f"{FORMAT_VERSION})")
    for key in ("modules", "quantized", "aliases"):
        value = structure.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise CheckpointError(f"{path}: {key!r} must map module names to entries")
    if not all(isinstance(v, str) for v in structure.get("aliases", {}).values()):
        raise CheckpointError(f"{path}: 'aliases' must map tensor names to tensor names")
    for key in ("modules", "quantized"):
        if not all(isinstance(v, dict) for v in structure.get(key, {}).values()):
            raise CheckpointError(f"{path}: every {key!r} entry must be a JSON object")
    return structure


def read_weight_map(index: Path) -> dict[str, str]:
    """``{tensor name: shard file name}`` of a Hugging Face safetensors index, checked."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(f, str) and Path(f).name == f for f in weight_map.values()):
            raise ValueError("shard names must be plain file names")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index ({first_line(exc)})") from exc
    return weight_map


def _read_weights(directory: Path, device: str) -> tuple[dict[str, torch.Tensor], Path]:
    """Every saved tensor (from ``model.safetensors``, or from the shards the index names) and
    the path errors should name."""
    from safetensors import safe_open

    index = directory / WEIGHTS_INDEX
    if index.is_file() and not (directory / WEIGHTS_FILE).is_file():
        files = sorted(set(read_weight_map(index).values()))
    else:
        index, files = directory / WEIGHTS_FILE, [WEIGHTS_FILE]
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name in files:
        path = directory / name
        try:
            with safe_open(path, framework="pt", device=device) as f:  # tensors and metadata
                state.update({key: f.get_tensor(key) for key in f.keys()})
                metadata.update(f.metadata() or {})
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path}: missing") from exc
        except Exception as exc:  # safetensors raises its own SafetensorError (not importable)
            raise CheckpointError(f"{path}: cannot be read ({first_line(exc)})") from exc
    return unflatten(state, metadata, index), index


def model_class_of(config, model_class: type | None = None,
                   saved_architecture: str | None = None) -> type:
    """``model_class`` if given, else the transformers class the saved structure or
    ``config.architectures`` names."""
    if model_class is not None:
        return model_class
    import transformers

    archs = [saved_architecture] if saved_architecture else []
    archs += getattr(config, "architectures", None) or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise ArgumentError(
        f"cannot tell the model class from config.architectures={archs!r}; pass model_class="
    )


def _tie(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make every aliased parameter the very parameter of its source, as when it was saved
    (``load_state_dict`` gives each its own; ``tie_weights`` only knows the model's own ties)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, source in aliases.items():
        if alias in params and source in params and params[alias] is not params[source]:
            owner, _, name = alias.rpartition(".")
            setattr(model.get_submodule(owner), name, params[source])


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
    from transformers import AutoConfig, GenerationConfig

    directory = Path(directory)
    structure = _read_structure(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: cannot be read ({first_line(exc)})"
                              ) from exc
    cls = model_class_of(config, model_class, structure.get("architecture"))
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    where = directory / STRUCTURE_FILE
    build_structure(model, structure, where)
    state, weights = _read_weights(directory, str(device) if device else "cpu")
    for key in marker_keys(replaced(structure)):
        if key in state and state[key].numel() == 0:
            del state[key]
    aliases = structure.get("aliases", {})
    missing_sources = sorted({s for s in aliases.values() if s not in state})
    if missing_sources:
        raise CheckpointError(f"{where}: aliases name tensors {missing_sources[:3]} that "
                              f"{weights.name} does not hold")
    for alias, source in aliases.items():
        state[alias] = state[source]
    if dtype is not None:  # the parameters, as from_pretrained(dtype=) casts them (not buffers)
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        state = {k: t.to(dtype) if k in params and not is_torchao_tensor(t) else t
                 for k, t in state.items()}
    for name, layout in structure.get("modules", {}).items():
        if layout.get("method") == LEGACY_KEPT_ROWS:
            try:
                convert_kept_rows(name, layout, state)
            except (KeyError, RuntimeError, ValueError) as exc:
                raise CheckpointError(f"{weights}: the tensors of {name!r} do not match {where} "
                                      f"({first_line(exc)})") from exc
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match {where} and config.json "
                              f"({first_line(exc)})") from exc
    _tie(model, aliases)
    for p in model.parameters():
        if is_torchao_tensor(p):
            p.requires_grad_(False)  # as torchao's quantize_ leaves them
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise CheckpointError(f"{weights}: parameters missing: {on_meta[:5]}")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    torchao_to_dtype(model, dtype)
    from .transformers_plugin import attach

    return attach(realigned(model)).eval()


