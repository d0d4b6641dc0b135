"""Calibration passes: run real inputs through a model to collect each layer's activations.

:func:`calibrated_order` groups target modules by transformer block so that ``compactify`` can
process blocks in order, and :func:`collect_covariances` runs the calibration batches through
the model *up to and including* one block (the forward pass is cut right after it), collecting
the input covariance of that block's targets. Since earlier blocks are already compressed at
that point, each block is fitted to the activations the compressed model really produces (as
SVD-LLM does), so errors do not compound unseen. Recomputing the earlier blocks for every block
would cost ``O(L^2)`` block forwards: a :class:`BlockReplay` records each finished block's output
once per batch and returns it to later passes, so each block runs about twice.
"""

from __future__ import annotations

import inspect
import os
import warnings
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, EstimateFallbackWarning
from ..helpers.progress import Tick
from .fit import CovarianceCollector, SharedInputConflict
from .targets import block_prefix, block_stacks, output_embedding

__all__ = [
    "BlockReplay", "as_batches", "calibrated_order", "check_token_ids", "collect_covariances", "collect_output_gradients",
    "collect_paired_covariances", "model_inputs", "output_gradients",
]


class _StopForward(Exception):
    pass


class _ReplayConflict(Exception):
    """A finished block ran twice in one forward pass (shared weights): its output is not one
    function of the batch, so it cannot be replayed."""


class BlockReplay:
    """Replay the outputs of finished blocks instead of recomputing them.

    ``compactify`` calibrates blocks in forward order, each on the activations the already
    compressed blocks before it produce. Once a block is :meth:`finish`-ed (all its modules in
    their final state), the next forward pass over batch ``j`` runs it and records its output;
    every later pass over batch ``j`` gets the recording back without running it. Its inputs
    cannot change any more, since only blocks after it are still being replaced. Memory: one
    output (``batch x seq x hidden``) per finished block and calibration batch.

    With ``spill_dir``, recordings that only pass through (a block's output whose successor is
    replayed too, so nothing reads it) are moved to files there and memory-mapped back: their
    pages are read only if something does read them, and memory holds about two recordings, not
    one per block. Streaming compression uses this.
    """

    def __init__(self, spill_dir: str | os.PathLike | None = None) -> None:
        self.enabled = True
        self._outputs: dict[int, tuple[nn.Module, dict[int, Any]]] = {}
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._spilled: set[int] = set()

    def finish(self, block: nn.Module) -> None:
        """From the next forward pass on, record and replay ``block``'s output."""
        self._outputs.setdefault(id(block), (block, {}))
        if self._spill_dir is not None:
            # The block finished two before this one has its recording complete, and its
            # successor's too: from now on nothing needs to read it.
            keys = list(self._outputs)
            if len(keys) >= 3 and keys[-3] not in self._spilled:
                self._spill(keys[-3])

    def _spill(self, key: int) -> None:
        recorded = self._outputs[key][1]
        for index, value in list(recorded.items()):
            path = self._spill_dir / f"replay-{key}-{index}.pt"
            torch.save(value, path)
            recorded[index] = torch.load(path, mmap=True, weights_only=False)
        self._spilled.add(key)

    def disable(self) -> None:
        self.enabled = False
        self._outputs.clear()

    @contextmanager
    def batch(self, index: int) -> Iterator[None]:
        """Within this context, one forward pass over calibration batch ``index`` replays."""
        calls: dict[int, int] = {}
        missing = object()
        saved = []

        def replaying(key: int, forward: Callable, recorded: dict[int, Any]) -> Callable:
            def run(*args: Any, **kwargs: Any) -> Any:
                calls[key] = calls.get(key, 0) + 1
                if calls[key] > 1:
                    raise _ReplayConflict
                if index not in recorded:
                    recorded[index] = forward(*args, **kwargs)
                return recorded[index]

            return run

        try:
            for key, (block, recorded) in self._outputs.items():
                # An instance attribute shadows the class's forward (accelerate's hooks use one
                # too: keep and restore whatever is there).
                saved.append((block, block.__dict__.get("forward", missing)))
                block.forward = replaying(key, block.forward, recorded)
            yield
        finally:
            for block, previous in saved:
                if previous is missing:
                    del block.forward
                else:
                    block.forward = previous


def as_batches(calibration: Iterable[Any], min_tokens: int = 1,
               argument: str = "calibration") -> list[dict[str, Tensor]]:
    """Materialise calibration data: token-id tensors ``(batch, seq)`` or ``(seq,)``, or dicts
    of model inputs (a DataLoader of either works). Every sequence must hold at least
    ``min_tokens`` tokens (next-token training needs 2); ``argument`` names the data in errors."""
    batches = []
    for index, item in enumerate(calibration):
        if isinstance(item, Tensor):
            ids = item if item.dim() == 2 else item.reshape(1, -1)
            batch = {"input_ids": ids.long()}
        elif isinstance(item, Mapping) and "input_ids" in item:
            batch = dict(item)
            ids = batch["input_ids"]
        else:
            raise ArgumentError(
                f"{argument} must yield token-id tensors or dicts with 'input_ids', got "
                f"{type(item).__name__}"
            )
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ArgumentError(f"{argument}: item {index} is not a (batch, seq) tensor of token ids")
        if ids.numel() == 0 or ids.shape[1] < min_tokens:
            raise ArgumentError(f"{argument}: item {index} has {ids.shape[1]} tokens per sequence "
                                f"(shape {tuple(ids.shape)}); at least {min_tokens} needed")
        batches.append(batch)
    if not batches:
        raise ArgumentError(f"{argument} is empty")
    return batches


def check_token_ids(model: nn.Module, batches: list[dict[str, Tensor]],
                    argument: str = "calibration") -> None:
    """Refuse token ids the model's input embedding has no row for (text tokenized for another
    model, say), before any work; otherwise the first forward pass fails deep inside."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    if not isinstance(rows, int):
        return
    for index, batch in enumerate(batches):
        ids = batch["input_ids"]
        if ids.numel() and (int(ids.max()) >= rows or int(ids.min()) < 0):
            raise ArgumentError(
                f"{argument}: item {index} holds token ids in [{int(ids.min())}, {int(ids.max())}]"
                f", but the model's vocabulary has {rows} rows (tokenized for another model?)")


def calibrated_order(
    model: nn.Module, names: list[str]
) -> list[tuple[nn.Module | None, list[str]]]:
    """``[(block, target names in it)]`` in forward order of the blocks; targets outside any
    block come last with ``block=None`` (their covariances need a full forward pass)."""
    stacks = block_stacks(model)
    order: dict[str | None, list[str]] = {}
    for name in names:
        order.setdefault(block_prefix(name, stacks), []).append(name)
    blocks = [p for p in order if p is not None]
    # ModuleList order is forward order; stacks in module registration order (encoder first).
    rank = {n: i for i, (n, _) in enumerate(model.named_modules())}
    blocks.sort(key=lambda p: rank[p])
    out: list[tuple[nn.Module | None, list[str]]] = [
        (model.get_submodule(p), order[p]) for p in blocks
    ]
    if None in order:
        out.append((None, order[None]))
    return out


def model_inputs(model: nn.Module, batch: dict[str, Tensor], device: torch.device) -> dict:
    """A calibration batch moved to ``device``; encoder-decoders get the ids as decoder input."""
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    config = getattr(model, "config", None)
    if "decoder_input_ids" not in inputs and getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"]
    # Calibration passes never decode further: no key/value cache.
    if getattr(config, "use_cache", False) and "use_cache" not in inputs and (
        "use_cache" in inspect.signature(model.forward).parameters
    ):
        inputs["use_cache"] = False
    return inputs


@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    modules: dict[str, nn.Module],
    stop_after: nn.Module | None = None,
    replay: BlockReplay | None = None,
    tick: Tick | None = None,
) -> CovarianceCollector:
    """Input covariances of ``modules`` over all batches; the forward stops after ``stop_after``.

    With ``replay``, finished blocks return their recorded outputs instead of running (a model
    that runs a block twice per pass turns replay off and is collected without it). ``tick`` is
    called after every batch (a progress bar's)."""
    for share in (True, False):  # sharing one sum between modules of one input saves memory
        try:
            if replay is not None and replay.enabled:
                try:
                    return _collect_covariances(model, batches, modules, stop_after, replay,
                                                share, tick)
                except _ReplayConflict:
                    replay.disable()
            return _collect_covariances(model, batches, modules, stop_after, None, share, tick)
        except SharedInputConflict:
            continue
    raise AssertionError("unreachable: a collection without sharing has no conflict")


def _collect_covariances(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    modules: dict[str, nn.Module],
    stop_after: nn.Module | None,
    replay: BlockReplay | None,
    share: bool = False,
    tick: Tick | None = None,
) -> CovarianceCollector:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def stop(*_: Any) -> None:
        raise _StopForward

    handle = stop_after.register_forward_hook(stop) if stop_after is not None else None
    try:
        with CovarianceCollector(modules, share) as collector:
            for index, batch in enumerate(batches):
                try:
                    if replay is None:
                        model(**model_inputs(model, batch, device))
                    else:
                        with replay.batch(index):
                            model(**model_inputs(model, batch, device))
                except _StopForward:
                    pass
                if tick is not None:
                    tick()
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    missing = [n for n in modules if collector.tokens(n) == 0]
    if missing:
        raise ArgumentError(f"no calibration activations reached {missing[:3]}")
    return collector


@torch.no_grad()
def collect_paired_covariances(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    modules: dict[str, nn.Module],
    stop_after: nn.Module | None,
    reference: Callable[[], AbstractContextManager],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Input statistics of ``modules`` in the model as it is and in a reference version of it.

    ``reference()`` is a context manager under which ``model`` computes the reference (the
    dense original, say); ``modules`` must run in both. Batch by batch, the reference inputs
    ``X_r`` and the model's own inputs ``X`` of each module are paired token by token, and
    returned are ``{name: X^T X / n}`` and ``{name: X_r^T X / n}``, float64 ``(in, in)``; only
    one batch's activations are held at a time. The forward stops after ``stop_after``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    own: dict[str, Tensor] = {}
    cross: dict[str, Tensor] = {}
    counts = dict.fromkeys(modules, 0)
    recorded: dict[str, list[Tensor]] = {n: [] for n in modules}

    def flat(args: tuple) -> Tensor:
        x = args[0].detach()
        return x.reshape(-1, x.shape[-1]).to(torch.float64)

    def record(name: str):
        return lambda module, args: recorded[name].append(flat(args))

    def pair(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = flat(args)
            if not recorded[name] or recorded[name][0].shape != x.shape:
                raise RuntimeError(
                    f"module {name!r} saw different inputs in the reference and the model"
                )
            x_ref = recorded[name].pop(0)
            own[name] = own[name] + x.T @ x if name in own else x.T @ x
            cross[name] = cross[name] + x_ref.T @ x if name in cross else x_ref.T @ x
            counts[name] += x.shape[0]

        return hook

    def stop(*_: Any) -> None:
        raise _StopForward

    def run(batch: dict[str, Tensor], hook) -> None:
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        if stop_after is not None:
            handles.append(stop_after.register_forward_hook(stop))
        try:
            model(**model_inputs(model, batch, device))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    try:
        for batch in batches:
            with reference():
                run(batch, record)
            run(batch, pair)
    finally:
        model.train(was_training)
    missing = [n for n in modules if counts[n] == 0]
    if missing:
        raise ArgumentError(f"no calibration activations reached {missing[:3]}")
    return ({n: own[n] / counts[n] for n in modules}, {n: cross[n] / counts[n] for n in modules})


def collect_output_gradients(
    model: nn.Module, batches: list[dict[str, Tensor]], modules: dict[str, nn.Module]
) -> dict[str, Tensor] | None:
    """``E[g_o^2]`` per output feature of each module, ``g = d(sum of token losses) / d y``.

    One forward and backward pass per batch with the language-modelling loss (``labels`` =
    the input ids). With the input covariance ``C`` this gives the diagonal Gauss-Newton
    (empirical Fisher) estimate of how much a weight error ``E`` raises the mean token loss:
    ``0.5 * sum_o E[g_o^2] (E C E^T)_oo``. Returns ``None``, with a
    :class:`~tensornet_llm.errors.EstimateFallbackWarning` saying why, when the model computes no
    loss from ``labels`` (see :func:`output_gradients`); parameters and their gradients are left
    untouched.
    """
    grads, reason = output_gradients(model, batches, modules)
    if reason is not None:
        warnings.warn(reason, EstimateFallbackWarning, stacklevel=2)
    return grads


def output_gradients(
    model: nn.Module, batches: list[dict[str, Tensor]], modules: dict[str, nn.Module],
    full: bool = False, tick: Tick | None = None,
) -> tuple[dict[str, Tensor] | None, str | None]:
    """:func:`collect_output_gradients` without the warning: ``(gradients, None)``, or
    ``(None, reason)`` when the model has no language-modelling loss to differentiate.
    ``full``: the whole second moment ``E[g g^T]`` ``(out, out)`` per module (float64,
    accumulated from float32 products per batch) instead of its diagonal ``(out,)``. ``tick``
    is called after every batch.

    The output embedding (the LM head, whose outputs are the logits ``z``) gets the softmax's
    Fisher instead, ``E_y~p[(p - y)^2] = p (1 - p)`` per vocabulary entry (``full``:
    ``diag(p) - p p^T``), computed from the logits: the empirical ``(p - y)^2`` it equals in
    expectation is ``p^2`` for every token the calibration text never shows next, about
    ``p`` times too small, which would price a factored head's errors on rare tokens (they
    take probability from the right one) as nearly free.

    That is the case when ``model.forward`` takes no ``labels``, returns no ``loss``, or rejects
    the ids as labels (``TypeError`` / ``ValueError`` from the forward pass, as a classification
    head does); the reason names which, with the error's message. Any other exception is a real
    failure and propagates.
    """
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_labels = "labels" in accepted or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()
    )
    if not takes_labels:
        return None, f"{type(model).__name__}.forward takes no labels, so there is no loss"
    device = next(model.parameters()).device
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, sq: Tensor, tokens: int) -> None:
        sums[name] = sums[name] + sq if name in sums else sq
        counts[name] = counts.get(name, 0) + tokens

    head = output_embedding(model)

    def hook(name: str):
        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not isinstance(output, Tensor):
                return
            if module is head:  # the logits: the softmax's Fisher, from p alone
                with torch.no_grad():
                    p = output.detach().reshape(-1, output.shape[-1]).float().softmax(-1)
                    sq = (torch.diag_embed(p.sum(0)) - p.T @ p).double() if full else (
                        p * (1 - p)).double().sum(0)
                add(name, sq, p.shape[0])
                return
            if not output.requires_grad:
                return

            def grad_hook(grad: Tensor) -> None:
                g = grad.detach().reshape(-1, grad.shape[-1])
                if full:
                    g = g.float()
                    add(name, (g.T @ g).double(), g.shape[0])
                else:
                    add(name, g.double().pow(2).sum(0), g.shape[0])

            output.register_hook(grad_hook)

        return forward_hook

    # Gradients flow back to the input embeddings only: every activation downstream of them
    # needs one, no weight does (no weight gradients are accumulated).
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    leaf = getattr(embed, "weight", None)
    if not isinstance(leaf, Tensor):
        return None, f"{type(model).__name__} has no input embedding weight to differentiate to"
    saved = (leaf.requires_grad, leaf.grad)
    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        leaf.requires_grad_(True)
        for batch in batches:
            inputs = model_inputs(model, batch, device)
            try:
                with torch.enable_grad():
                    out = model(**inputs, labels=inputs["input_ids"])
            except (TypeError, ValueError) as exc:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                return None, (f"{type(model).__name__} rejected labels=input_ids "
                              f"({type(exc).__name__}: {message})")
            loss = getattr(out, "loss", None)
            if loss is None:
                return None, f"{type(model).__name__} returned no loss for labels=input_ids"
            # Sum over tokens, so each token's gradient is its own loss's gradient.
            torch.autograd.grad(loss * inputs["input_ids"].numel(), [leaf])
            if tick is not None:
                tick()
    finally:
        for h in handles:
            h.remove()
        leaf.requires_grad_(saved[0])
        leaf.grad = saved[1]
        model.train(was_training)
    unreached = [n for n in modules if n not in sums]
    if unreached:
        return None, f"no loss gradient reached {unreached[:3]}"
    return {n: sums[n] / counts[n] for n in modules}, None
