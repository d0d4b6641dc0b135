"""A state dict as safetensors files hold it: tensors that share memory once (:func:`dedupe`),
and weights quantized by torchao (its tensor subclasses, such as ``Int8Tensor``) in torchao's
own format (:func:`flatten`, :func:`unflatten`): each such tensor is written as its plain parts
(``<module>._weight_qdata``, ``<module>._weight_scale``, ...) and the file's metadata says how
they go together (``torchao.prototype.safetensors``, the format transformers' torchao quantizer
also reads). A state without torchao tensors passes through unchanged, and torchao is imported
only when one is there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, first_line
from ..helpers.evaluate import stored_tensors
from . import torchao_cpu

__all__ = ["is_torchao_tensor", "storage_key", "dedupe", "flatten", "unflatten", "quantized_names",
           "part_names", "read_metadata", "int8_config", "torchao_to_dtype", "realigned", "ALIGNMENT"]

#: Bytes at a multiple of which torch's CPU allocator starts a fresh tensor's data.
ALIGNMENT = 64

#: The parts torchao's quantized tensors are written as (``_<param>_<part>``).
PARTS = ("qdata", "scale", "zero_point", "scale_and_zero", "per_tensor_scale", "act_pre_scale")


def is_torchao_tensor(t: Any) -> bool:
    """Whether ``t`` is one of torchao's tensor subclasses (a weight it has quantized)."""
    return isinstance(t, Tensor) and type(t).__module__.startswith("torchao.")


def storage_key(t: Tensor) -> tuple:
    """What identifies the memory behind ``t``: two keys are equal when the tensors are one
    (a tied table), also for torchao's tensors, which have no storage of their own."""
    if is_torchao_tensor(t):
        part = stored_tensors(t)[0]
        return (type(t).__name__, part.device, part.untyped_storage().data_ptr(),
                tuple(t.shape))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()))


def dedupe(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``state`` without the tensors that are an earlier key's tensor, and those as
    ``{alias: source}``."""
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    unique, aliases = {}, {}
    for key, tensor in state.items():
        ident = storage_key(tensor)
        if ident in seen:
            aliases[key] = seen[ident]
        elif is_torchao_tensor(tensor):
            seen[ident] = key
            unique[key] = tensor.detach()
        else:
            seen[ident] = key
            storage = ident[:2]
            # Other views of one storage are written as copies (safetensors refuses shared memory).
            unique[key] = tensor.detach().contiguous() if storage not in storages else (
                tensor.detach().clone())
            storages.add(storage)
    return unique, aliases


def int8_config(group_size: int | None = None):
    """torchao's int8 weight-only config: one scale per output row, or per group of
    ``group_size`` entries of a row. What ``quantize(model, 8)`` applies and what a saved int8
    checkpoint declares. ``set_inductor_config=False``: the caller's ``torch.compile`` settings
    stay as they are. Int8 tables look up only their rows, and half-precision int8 linears
    run torch's fused kernel, from then on (:mod:`~tensornet_llm.saving.torchao_cpu`)."""
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization.granularity import PerGroup, PerRow

    torchao_cpu.register()
    return Int8WeightOnlyConfig(granularity=PerGroup(group_size) if group_size else PerRow(),
                                set_inductor_config=False)


def torchao_to_dtype(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give torchao's tensors in ``model`` the dtype they dequantize to and compute in, which
    ``model.to(dtype)`` leaves as it was (their integers and scales stay as they are; a tied
    table stays one tensor; ``None``: each keeps its own), and copy parts a checkpoint left at
    an unaligned address into fresh memory (the fused int8 kernel reads aligned blocks:
    :mod:`~tensornet_llm.saving.torchao_cpu`). Returns ``model``."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not is_torchao_tensor(p):
                continue
            cls = type(p)  # torchao's tensors name their parts and attributes
            names = (*cls.tensor_data_names, *cls.tensor_attribute_names)
            unaligned = any(getattr(p, n).data_ptr() % 64 for n in cls.tensor_data_names)
            if (dtype is None or p.dtype == dtype) and not unaligned:
                continue
            if id(p) not in new:
                parts = [(dtype or p.dtype) if n == "dtype" else getattr(p, n) for n in names]
                parts = [t.clone() if isinstance(t, Tensor) and t.data_ptr() % 64 else t
                         for t in parts]
                optional = {n: getattr(p, n) for n in (
                    *getattr(cls, "optional_tensor_data_names", ()),
                    *getattr(cls, "optional_tensor_attribute_names", ()))}
                new[id(p)] = nn.Parameter(cls(*parts, **optional), requires_grad=False)
            setattr(module, name, new[id(p)])
    return model


def flatten(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` to write with ``safetensors.torch.save_file``: ``state`` itself
    and no metadata when it holds no torchao tensor."""
    if not any(is_torchao_tensor(t) for t in state.values()):
        return dict(state), {}
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    return flatten_tensor_state_dict(dict(state))


def unflatten(state: Mapping[str, Tensor], metadata: Mapping[str, str] | None, where: Any
              ) -> dict[str, Tensor]:
    """The inverse of :func:`flatten`, for the tensors and metadata read from ``where``."""
    if not metadata or "tensor_names" not in metadata:
        return dict(state)
    try:
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        tensors, leftover = unflatten_tensor_state_dict(dict(state), dict(metadata))
        torchao_cpu.register()
    except ImportError as exc:
        raise CheckpointError(f"{where} holds weights quantized by torchao, which is not "
                              "installed: pip install 'tensornet-llm[torchao]'") from exc
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: its torchao metadata does not match its tensors "
                              f"({first_line(exc)})") from exc
    return {**leftover, **tensors}


def quantized_names(metadata: Mapping[str, str] | None) -> set[str]:
    """The parameter names (``weight``, ...) that ``metadata`` (of :func:`flatten`) records as
    torchao tensors."""
    names = set()
    for key in json.loads((metadata or {}).get("tensor_names", "[]")):
        if json.loads(metadata[key]).get("_type") != torch.Tensor.__name__:
            names.add(key.rpartition(".")[2])
    return names


def part_names(param: str) -> list[str]:
    """The state-dict suffixes torchao's tensor at ``param`` may be written as."""
    return [f"_{param}_{part}" for part in PARTS]


def read_metadata(files: Iterable[str | Path]) -> dict[str, str]:
    """The metadata of the safetensors ``files`` together (``{}`` for other files)."""
    from safetensors import safe_open

    metadata: dict[str, str] = {}
    for path in files:
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                metadata.update(f.metadata() or {})
    return metadata


@torch.no_grad()
def realigned(model: nn.Module) -> nn.Module:
    """``model`` with every plain CPU parameter and buffer whose data does not start at a
    multiple of :data:`ALIGNMENT` bytes moved to fresh memory (a copy: the same values, the same
    tensor objects, so ties stay). Tensors read from a safetensors file sit at the file's
    offsets, and for some shapes BLAS (MKL) rounds differently at another alignment: a loaded
    model's logits then differ from the saved model's in the last bits (seen: 7.7e-7 on a
    compressed T5, 3e-8 on an MPO layer). Fresh tensors compute as the saved model did."""
    for t in [*model.parameters(), *model.buffers()]:
        if (type(t) in (Tensor, nn.Parameter) and t.device.type == "cpu" and t.numel()
                and t.data_ptr() % ALIGNMENT):
            t.data = t.data.clone()
    return model
