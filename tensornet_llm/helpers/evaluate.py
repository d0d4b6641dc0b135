"""Perplexity of a causal language model on a token stream.

Protocol: the stream is cut into non-overlapping windows of ``window`` tokens; each window gets
the model's start token prepended (so every scored token has a context of at least that token:
:func:`~tensornet_llm.helpers.start_token.start_token`, or ``bos_token_id`` where given) and all
``window`` tokens are scored. Perplexity is ``exp`` of the mean negative log-likelihood over all
scored tokens. With SmolLM2, 40 windows of 512 tokens from character 20,000 of Pride and
Prejudice give 30.70 (the reference figure in ``tensornet_llm/helpers/texts/README.md``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError
from .data import DOMAINS, held_out_ids, token_batches
from .start_token import AUTO, StartToken, resolve_start_token

__all__ = ["perplexity", "mean_nll", "summed_nll", "next_token_targets", "model_size_bytes",
           "perplexity_table", "compare_to_dense"]


def next_token_targets(batch: dict[str, Tensor]) -> Tensor:
    """Labels aligned with ``logits[:, :-1]`` of a batch dict (``input_ids``, optionally
    ``attention_mask`` and ``labels``): ``-100`` where nothing is scored (padding)."""
    labels = batch.get("labels", batch["input_ids"]).clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return labels[:, 1:]


@torch.no_grad()
def summed_nll(model: nn.Module, batches: Iterable[Tensor | dict[str, Tensor]],
               device: torch.device | str | None = None,
               context: Callable[[], ContextManager] = nullcontext) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of tokens scored, over
    ready-made batches: token ids ``(batch, seq)`` or dicts as :func:`next_token_targets` reads
    them. ``context`` wraps each forward pass (e.g. an autocast); the model's mode is untouched."""
    device = device if device is not None else next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        if isinstance(batch, Tensor):
            batch = {"input_ids": batch}
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with context():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        targets = next_token_targets(batch)
        total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                       ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    return total, count


@torch.no_grad()
def mean_nll(model: nn.Module, ids: Tensor, window: int = 512, batch_size: int = 4,
             bos_token_id: StartToken = AUTO, progress: bool = False, *, tokenizer=None
             ) -> float:
    """Mean next-token negative log-likelihood (nats) over the windows of ``ids`` (1-D), each
    window after the start token: ``bos_token_id``, or by default the one ``tokenizer`` (which
    made ``ids``) and the model's config say the model was trained with."""
    if ids.dim() != 1 or ids.numel() < window:
        raise ArgumentError(f"ids must be 1-D with at least window={window} tokens, got {tuple(ids.shape)}")
    bos_token_id = resolve_start_token(bos_token_id, tokenizer, model)
    was_training = model.training
    model.eval()
    batches = list(token_batches(ids, window, batch_size, bos_token_id))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch", leave=False)
    try:
        total, count = summed_nll(model, batches)
    finally:
        model.train(was_training)
    return total / count


def perplexity(model: nn.Module, ids: Tensor, window: int = 512, batch_size: int = 4,
               bos_token_id: StartToken = AUTO, progress: bool = False, *, tokenizer=None
               ) -> float:
    """``exp(mean_nll)``: see the module docs for the protocol."""
    return math.exp(mean_nll(model, ids, window, batch_size, bos_token_id, progress,
                             tokenizer=tokenizer))


def stored_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors that hold ``t``: ``[t]``, or, for a wrapper tensor subclass (a weight
    torchao has quantized: its int8 codes, scales, ...), its inner tensors, by the protocol
    such subclasses implement for torch.compile (``__tensor_flatten__``)."""
    if type(t) in (Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    return [part for name in t.__tensor_flatten__()[0] for part in stored_tensors(getattr(t, name))]


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once; a quantized weight
    by the tensors that hold it)."""
    seen, total = set(), 0
    for t in [p for t in [*model.parameters(), *model.buffers()] for p in stored_tensors(t)]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def perplexity_table(model: nn.Module, tokenizer, n_tokens: int = 8192,
                     domains: Sequence[str] | None = None, window: int = 512,
                     progress: bool = False, bos_token_id: StartToken = AUTO
                     ) -> dict[str, float]:
    """Perplexity on the held-out part of every bundled domain (or of ``domains``):
    ``{"fiction": ..., "encyclopedia": ..., "technical": ..., "code": ...}``, ``n_tokens`` of
    each, scored as :func:`perplexity` does. Never text that calibration or healing draw from
    (see :mod:`tensornet_llm.helpers.data`)."""
    names = list(DOMAINS) if domains is None else list(domains)
    start = resolve_start_token(bos_token_id, tokenizer, model)
    return {name: perplexity(model, held_out_ids(tokenizer, name, n_tokens), window,
                             bos_token_id=start, progress=progress) for name in names}


def compare_to_dense(table: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    """Ratios to dense per domain, plus ``"geomean"`` (the geometric mean of the ratios) and
    ``"worst"`` (the largest ratio)."""
    missing = sorted(set(table) - set(dense))
    if missing or not table:
        raise ArgumentError(f"dense has no perplexity for {missing} (or the table is empty)")
    ratios = {name: table[name] / dense[name] for name in table}
    values = list(ratios.values())
    return {**ratios, "geomean": math.exp(sum(map(math.log, values)) / len(values)),
            "worst": max(values)}
