"""Streaming compression: compactify a checkpoint larger than memory, one block at a time.

:func:`compactify_pretrained` builds the model on the ``meta`` device (no memory), then walks
the transformer blocks in forward order: it reads one block's tensors from the safetensors
files, replaces its targets exactly as :func:`~.compactify.compactify` would, writes the block
to its own output shard and frees it. With calibration data, the inputs each block sees come
from the already compressed blocks before it, recorded once per batch (the
:class:`~.calibrate.BlockReplay` that in-memory calibration uses too), so a finished block is
kept only until a forward pass has recorded its output. With a ``ratio``, a first streaming
pass builds every module's ladder of options (:func:`~.budget.ladder`) block by block, then the
budget is chosen over all of them (:func:`~.budget.choose`) before the compressing pass.

Peak memory is about two blocks, the modules outside the blocks that run before them (the
input embeddings, only with calibration data) and the calibration activations, not the model.
The output is a directory :func:`~tensornet_llm.saving.load_compactified` reads, with the same
tensors as ``compactify`` on the model loaded whole with the same settings.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, CheckpointError, InputFileError, first_line
from ..helpers.files import atomic_directory, check_output
from ..layers.gated_mlp import share_mlp_rows
from ..layers.layout import Layout
from ..saving.serialization import (
    STRUCTURE_FILE, WEIGHTS_FILE, WEIGHTS_INDEX, model_class_of, read_weight_map, shard_name,
)
from ..saving.structure import add_quantization_config, structure, with_markers
from .budget import choose, ladder
from .calibrate import BlockReplay, as_batches, check_token_ids, collect_covariances
from .config import CompactifyConfig, merged_config
from .plan import make_plan
from .surgery import build_layer, count_parameters, swap
from .report import CompactifyReport, LayerReport
from .targets import block_prefix, block_stacks

__all__ = ["compactify_pretrained", "CheckpointReader"]

#: Files of a model directory copied to the output as they are (tokenizer, generation config).
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
          "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
          "chat_template.json")


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint directory (``model.safetensors``, or shards
    listed in ``model.safetensors.index.json``), read one at a time in any floating dtype.

    Nothing is held open between reads: a file is mapped only while a tensor is copied out of
    it, so the pages read do not stay in this process's resident memory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        index, single = self.directory / WEIGHTS_INDEX, self.directory / WEIGHTS_FILE
        self.files: dict[str, Path] = {}
        if single.is_file():
            for key in self._keys(single, safe_open):
                self.files[key] = single
        elif index.is_file():
            weight_map = read_weight_map(index)
            for path in sorted({self.directory / f for f in weight_map.values()}):
                for key in self._keys(path, safe_open):  # every shard's header is checked now
                    self.files[key] = path
            missing = sorted(k for k in weight_map if k not in self.files)
            if missing:
                raise CheckpointError(f"{index} lists tensors its shards lack: {missing[:3]}")
        else:
            raise InputFileError(f"{self.directory} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX} "
                                 "(streaming reads safetensors checkpoints)")

    def read_rows(self, key: str, rows: list[int], dtype: torch.dtype) -> Tensor:
        """Rows ``rows`` of the 2-d tensor ``key``, ``(len(rows), columns)``, reading nothing
        else (runs of consecutive rows are read as one slice)."""
        from safetensors import safe_open

        path = self.files[key]
        parts = []
        try:
            with safe_open(str(path), framework="pt") as f:
                table = f.get_slice(key)
                start = 0
                while start < len(rows):  # rows are sorted: cut them into runs
                    stop = start + 1
                    while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                        stop += 1
                    parts.append(table[rows[start]:rows[stop - 1] + 1].to(dtype))
                    start = stop
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot be read ({first_line(exc)})") from exc
        return torch.cat(parts)

    @staticmethod
    def _keys(path: Path, safe_open) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path}: missing") from exc
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path}: cannot be read ({first_line(exc)})") from exc

    def read(self, keys: Iterable[str], dtype: torch.dtype,
             device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """``{key: tensor}`` copied into memory on ``device``, floating tensors cast to
        ``dtype``."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in names:
                        t = f.get_tensor(key)
                        t = t.to(device)
                        out[key] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot be read ({first_line(exc)})") from exc
        return out


@dataclass
class _Stream:
    """The meta model and where each of its tensors lives."""

    model: nn.Module
    reader: CheckpointReader
    dtype: torch.dtype
    device: torch.device
    #: The block prefixes in forward order, and the state-dict keys of each ("" : the rest).
    blocks: list[str]
    keys: dict[str, list[str]]
    #: ``{alias: source}`` for tied parameters (stored once, under the source key).
    aliases: dict[str, str] = field(default_factory=dict)

    #: Keys loaded only in part (the rows of the input embedding calibration reads).
    partial: set[str] = field(default_factory=set)

    def load(self, prefix: str) -> None:
        """Materialise the tensors of block ``prefix`` from the checkpoint."""
        for key, tensor in self.reader.read(self.keys[prefix], self.dtype, self.device).items():
            self._assign(key, tensor)

    def load_outside(self, batches: list[dict[str, Tensor]]) -> None:
        """Materialise what a calibration pass runs before the first block: every tensor
        outside the blocks except the output head, and of the input embedding only the rows
        the calibration ids look up. The other rows are allocated but never written or read,
        so they take no memory (the embedding of a large vocabulary is often the largest
        tensor of all)."""
        out = self.model.get_output_embeddings() if hasattr(
            self.model, "get_output_embeddings") else None
        embed = self.model.get_input_embeddings()
        head = {id(p) for p in out.parameters()} if out is not None else set()
        head -= {id(p) for p in embed.parameters()}  # tied: the embedding is needed
        keys = [k for k in self.keys[""] if id(self._tensor(k)) not in head]
        table = next((k for k in keys if self._tensor(k) is embed.weight), None)
        if table is not None and embed.weight.dim() == 2:
            keys.remove(table)
            rows = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches]))
            weight = torch.empty(embed.weight.shape, dtype=self.dtype, device=self.device)
            weight[rows] = self.reader.read_rows(table, rows.tolist(), self.dtype).to(self.device)
            self._assign(table, weight)
            self.partial.add(table)
        for key, tensor in self.reader.read(keys, self.dtype, self.device).items():
            self._assign(key, tensor)

    def free(self, prefix: str) -> None:
        self.model.get_submodule(prefix).to("meta")
        _release_memory()

    def _tensor(self, key: str) -> Tensor:
        module_name, _, name = key.rpartition(".")
        return getattr(self.model.get_submodule(module_name), name)

    def _assign(self, key: str, tensor: Tensor) -> None:
        targets = [key] + [a for a, s in self.aliases.items() if s == key]
        for k in targets:
            module_name, _, name = k.rpartition(".")
            module = self.model.get_submodule(module_name)
            if name in module._parameters:
                old = module._parameters[name]
                module._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            else:
                module._buffers[name] = tensor
        # Tied parameters stay one Parameter object: the aliases got the source's.
        if len(targets) > 1:
            first = self._tensor(key)
            for k in targets[1:]:
                module_name, _, name = k.rpartition(".")
                module = self.model.get_submodule(module_name)
                if name in module._parameters:
                    module._parameters[name] = first


def _release_memory(collect: bool = True) -> None:
    """Hand freed memory back to the system. glibc keeps freed blocks of the heap for reuse; the
    many differently sized buffers of a block's decompositions then pile up as resident memory
    (about 20 MB per SmolLM2 block) unless the heap is trimmed. ``collect``: first run the
    garbage collector (for reference cycles; a freed block's modules may hold some), which
    costs about 0.2 s, so not after every module."""
    if collect:
        gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return
    libc.malloc_trim(0)


def _open(source: Path, model_class, dtype: torch.dtype, device: torch.device) -> _Stream:
    """Check the source directory and build its model on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not source.is_dir():
        raise InputFileError(f"{source} is not a directory")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source / 'config.json'}: cannot be read ({first_line(exc)})"
                              ) from exc
    reader = CheckpointReader(source)
    if model_class is None and getattr(config, "architectures", None):
        cls = model_class_of(config)
    else:
        cls = model_class or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # as from_pretrained does; a meta model is not always tied yet
    model.eval()
    for module in model.modules():  # buffers computed at init (rotary frequencies) are real
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)
    # Tied parameters appear under several names: store and read them under the first.
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    keys = [k for k in model.state_dict() if k not in aliases]
    missing = [k for k in keys if k not in reader.files]
    if missing:
        raise CheckpointError(f"{source}: the checkpoint lacks tensors {type(model).__name__} "
                              f"needs, e.g. {missing[:3]}")
    stacks = block_stacks(model)
    by_block: dict[str, list[str]] = {"": []}
    for key in keys:
        prefix = _block_of(key, stacks)
        by_block.setdefault(prefix, []).append(key)
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}
    blocks = sorted((p for p in by_block if p), key=lambda p: rank[p])
    return _Stream(model, reader, dtype, device, blocks, by_block, aliases)


def _block_of(key: str, stacks: list[str]) -> str:
    """The block (``model.layers.3``) a state-dict key belongs to, or "" outside the blocks."""
    return block_prefix(key, stacks) or ""


def compactify_pretrained(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    chi: int | dict | None = None,
    ratio: float | None = None,
    calibration: Iterable[Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    model_class: type | None = None,
    overwrite: bool = False,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    **compactify_options: Any,
) -> CompactifyReport:
    """Compactify a Hugging Face checkpoint directory into ``out_dir`` without loading it whole.

    Args:
        source_dir: a model directory with ``config.json`` and safetensors weights (one file or
            shards with an index; float32, float16 or bfloat16).
        out_dir: where to write the compactified model (one shard per block and one per tensor
            outside the blocks), a directory :func:`~tensornet_llm.saving.load_compactified`
            reads. Checked before any work; written all or nothing.
        chi, ratio, calibration: as for :func:`~.compactify.compactify`. With ``ratio`` and
            calibration, damage is the relative output error (``gradients=False``): loss
            gradients need the whole model. The budget prices each module alone here: gated
            MLPs and attention are offered no slim layout (``slim_mlp`` and
            ``slim_attention`` do not apply).
        dtype: the dtype the blocks are compressed and written in (default float32).
        device: where each block is compressed (``"cuda"``: on the GPU, one block at a time);
            the output is written from there.
        model_class: e.g. ``AutoModelForCausalLM`` (default: from ``config.architectures``).
        overwrite: replace ``out_dir`` even if it is not a previous output of this library.
        progress: show a progress bar per pass.
        metadata: JSON-serialisable entries added to ``tensornet.json`` (the settings, say).
        compactify_options: any other field of :class:`~.compactify.CompactifyConfig`
            (``method``, ``n_sites``, ``targets``, ``exclude``, ``tol``, ``fit_steps``,
            ``low_rank``, ``shrinkage``, ``ridge``, ``call_cost``).

    Returns:
        The :class:`~.report.CompactifyReport`, as ``compactify`` returns it; it is also
        written to ``out_dir/report.json``.
    """
    start = time.perf_counter()
    source, out = Path(source_dir), Path(out_dir)
    unknown = set(compactify_options) - set(CompactifyConfig.__dataclass_fields__)
    if unknown:
        raise ArgumentError(f"compactify_pretrained() got unknown options {sorted(unknown)}")
    if compactify_options.get("match_dense"):
        raise ArgumentError("match_dense needs the dense and the compressed model at once; "
                            "streaming compression cannot offer it")
    if compactify_options.get("lm_head"):
        raise ArgumentError("streaming compresses modules inside the transformer blocks only; "
                            "lm_head does not apply")
    if compactify_options.get("cross_layer") is not None:
        raise ArgumentError("cross_layer groups span several blocks; streaming compression "
                            "holds one block at a time and cannot offer them")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    cfg = merged_config(None, chi=chi, ratio=ratio, **compactify_options)
    cfg.gradients = cfg.slim_mlp = cfg.slim_attention = False
    check_output(out, overwrite, known=(STRUCTURE_FILE,))
    batches = as_batches(calibration) if calibration is not None else None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"device {device!r} is not a torch device") from exc
    stream = _open(source, model_class, dtype, device)
    model = stream.model
    if batches is not None:
        check_token_ids(model, batches)
    notes: list[str] = []

    def budget(chosen, offered):
        return _streamed_budget(stream, cfg, batches, chosen, offered, progress, out.parent)

    plan = make_plan(model, cfg, batches, budget)
    _targets_by_block(stream, plan.chosen)  # any outside the blocks: refused before any work
    if batches is not None and cfg.ratio is not None:
        notes.append("budget damage estimated from the output error, not the loss: streaming "
                     "compression has no whole model to differentiate")
    params_before = count_parameters(model)
    rows: list[LayerReport] = []
    layouts: dict[str, dict] = {}
    with atomic_directory(out, overwrite, known=(STRUCTURE_FILE,)) as tmp:
        weight_map = _compress_blocks(stream, plan, cfg, batches, tmp, rows, layouts, progress)
        _write_rest(stream, tmp, weight_map)
        description = structure(type(model).__name__, layouts, {}, stream.aliases,
                                streamed_from=str(source), **(metadata or {}))
        stream.model.config.save_pretrained(tmp)
        add_quantization_config(tmp / "config.json", description)
        for name in COPIED:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / WEIGHTS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1))
        (tmp / STRUCTURE_FILE).write_text(json.dumps(description, indent=1))
        report = CompactifyReport(
            layers=rows, skipped=plan.skipped, model_params_before=params_before,
            model_params_after=count_parameters(model), seconds=time.perf_counter() - start,
            ratio=cfg.ratio, dense_target_params=plan.dense_target_params,
            estimate=plan.estimate, notes=plan.notes + notes,
        )
        (tmp / "report.json").write_text(report.to_json())
    return report


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def _shard_count(stream: _Stream) -> int:
    """One shard per block, then one per tensor outside the blocks (so that the largest, the
    embeddings, are in memory one at a time)."""
    return len(stream.blocks) + len(stream.keys[""])


def _write_rest(stream: _Stream, tmp: Path, weight_map: dict[str, str]) -> None:
    """The tensors outside the blocks, each to its own shard: from memory where they were
    loaded (for calibration), else read from the source one at a time."""
    total = _shard_count(stream)
    for index, key in enumerate(stream.keys[""], start=len(stream.blocks) + 1):
        tensor = stream._tensor(key)
        if tensor.is_meta or key in stream.partial:
            tensor = stream.reader.read([key], stream.dtype)[key]
        shard = shard_name(index, total)
        _save({key: tensor}, tmp / shard)
        weight_map[key] = shard
        del tensor
        _release_memory()


class _Walk:
    """Blocks in forward order, each loaded before it is worked on and freed once nothing
    needs it: at once without calibration, else after the next calibration pass has run
    (and recorded) it, since later passes replay its output."""

    def __init__(self, stream: _Stream, batches: list | None, spill_dir: Path) -> None:
        self.stream, self.calibrated = stream, batches is not None
        self.replay = BlockReplay(spill_dir) if self.calibrated else None
        self.unrecorded: list[str] = []
        if self.calibrated:
            stream.load_outside(batches)

    def __iter__(self):
        for prefix in self.stream.blocks:
            self.stream.load(prefix)
            yield prefix, self.stream.model.get_submodule(prefix)
            if self.calibrated:
                self.replay.finish(self.stream.model.get_submodule(prefix))
                self.unrecorded.append(prefix)
            else:
                self.stream.free(prefix)
        for prefix in self.unrecorded:
            self.stream.free(prefix)
        self.unrecorded = []

    def covariances(self, modules: dict[str, nn.Module], block: nn.Module, batches: list,
                    cfg: CompactifyConfig) -> dict[str, Tensor]:
        """Input covariances of ``modules`` (in ``block``); frees the blocks this pass
        recorded."""
        if not modules:
            return {}
        collector = collect_covariances(self.stream.model, batches, modules, block, self.replay)
        if not self.replay.enabled:
            raise ArgumentError("the model runs a block twice per forward pass (shared "
                                "weights), so streaming calibration cannot replay it")
        for prefix in self.unrecorded:
            self.stream.free(prefix)
        self.unrecorded = []
        return {n: cfg.regularize(collector.take(n)) for n in modules}


def _targets_by_block(stream: _Stream, chosen: list[tuple[str, nn.Module]]
                      ) -> dict[str, list[str]]:
    """``{block prefix: target names in it}``; a target outside every block is refused."""
    stacks = block_stacks(stream.model)
    names_in: dict[str, list[str]] = {}
    for name, _ in chosen:
        names_in.setdefault(_block_of(name, stacks), []).append(name)
    if "" in names_in:
        raise ArgumentError(f"streaming compresses modules inside the transformer blocks only; "
                            f"targets outside them: {names_in[''][:3]}")
    return names_in


def _streamed_budget(stream: _Stream, cfg: CompactifyConfig, batches: list | None,
                     chosen: list[tuple[str, nn.Module]], offered: dict[str, list[Layout]],
                     progress: bool, spill_parent: Path):
    """The budget pass of :func:`~.plan.make_plan`, one block at a time over the dense
    model: every module's ladder, then one choice over all of them."""
    names_in = _targets_by_block(stream, chosen)
    ladders = {}
    with _spill_directory(spill_parent) as spill:
        walk = _Walk(stream, batches, spill)
        for prefix, block in _bar(walk, len(stream.blocks), "budget pass", progress):
            modules = {n: stream.model.get_submodule(n) for n in names_in.get(prefix, [])}
            covs = walk.covariances(modules, block, batches, cfg) if batches else {}
            for name, module in modules.items():
                ladders[name] = ladder(module, offered[name], covs.pop(name, None),
                                       max_keep=cfg.max_keep)
        del walk
    allocation = choose(ladders, cfg.ratio, "weight" if batches is None else "output",
                        cfg.call_cost)
    settings = {name: None if allocation.chi[name] is None
                else (allocation.layout[name], allocation.chi[name]) for name, _ in chosen}
    return settings, allocation.estimate


def _compress_blocks(stream: _Stream, plan, cfg: CompactifyConfig, batches: list | None,
                     tmp: Path, rows: list[LayerReport], layouts: dict[str, dict],
                     progress: bool) -> dict[str, str]:
    """Replace each block's targets and write the block to its shard; the weight map."""
    names_in = _targets_by_block(stream, plan.chosen)
    total = _shard_count(stream)
    weight_map: dict[str, str] = {}
    with _spill_directory(tmp) as spill:
        walk = _Walk(stream, batches, spill)
        for index, (prefix, block) in enumerate(
                _bar(walk, len(stream.blocks), "compactify (streaming)", progress), start=1):
            _compress_block(stream, prefix, block, names_in, plan, cfg, walk, batches, rows,
                            layouts)
            tensors = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
            tensors = with_markers(tensors, names_in.get(prefix, []))  # see marker_keys
            shard = shard_name(index, total)
            _save(tensors, tmp / shard)
            weight_map.update(dict.fromkeys(tensors, shard))
        del walk
    return weight_map


def _compress_block(stream: _Stream, prefix: str, block: nn.Module,
                    names_in: dict[str, list[str]], plan, cfg: CompactifyConfig, walk: _Walk,
                    batches: list | None, rows: list[LayerReport], layouts: dict) -> None:
    """Replace the targets of one loaded block, fitted to its calibration inputs if any."""
    modules = {n: stream.model.get_submodule(n) for n in names_in.get(prefix, [])}
    covs = walk.covariances(modules, block, batches, cfg) if batches else {}
    for name, module in modules.items():
        new, row = build_layer(name, module, plan.settings[name], cfg, covs.pop(name, None))
        swap(stream.model, name, new)
        module.to("meta")  # the plan still holds the original: free its weight
        rows.append(row)
        layouts[name] = new.layout()
        _release_memory(collect=False)  # the fit's float64 buffers, before the next module's
    if cfg.share_mlp_rows and share_mlp_rows(block):
        for name in modules:  # gate/up rows and down's input order as they are now
            layouts[name] = stream.model.get_submodule(name).layout()


@contextmanager
def _spill_directory(parent: Path):
    """A scratch directory in ``parent`` for replayed block outputs, removed afterwards."""
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tensornet-replay-", dir=parent) as spill:
        yield Path(spill)


def _bar(items, total: int, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="block")
