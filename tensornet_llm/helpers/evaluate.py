"""Perplexity of a causal language model on a token stream.

Protocol: the stream is cut into non-overlapping windows of ``window`` tokens; each window gets
``bos_token_id`` prepended (so every scored token has a context of at least that token) and all
``window`` tokens are scored. Perplexity is ``exp`` of the mean negative log-likelihood over all
scored tokens. With SmolLM2, 40 windows of 512 tokens from character 20,000 of Pride and
Prejudice give 30.70 (the reference figure in ``tensornet_llm/helpers/texts/README.md``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError
from .data import DOMAINS, held_out_ids, token_batches

__all__ = ["perplexity", "mean_nll", "model_size_bytes", "perplexity_table", "compare_to_dense"]


@torch.no_grad()
def mean_nll(model: nn.Module, ids: Tensor, window: int = 512, batch_size: int = 4,
             bos_token_id: int | None = 0, progress: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats) over the windows of ``ids`` (1-D)."""
    if ids.dim() != 1 or ids.numel() < window:
        raise ArgumentError(f"ids must be 1-D with at least window={window} tokens, got {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = list(token_batches(ids, window, batch_size, bos_token_id))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch", leave=False)
    try:
        for batch in batches:
            batch = batch.to(device)
            logits = model(batch).logits[:, :-1].float()
            target = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            total += float(nll)
            count += target.numel()
    finally:
        model.train(was_training)
    return total / count


def perplexity(model: nn.Module, ids: Tensor, window: int = 512, batch_size: int = 4,
               bos_token_id: int | None = 0, progress: bool = False) -> float:
    """``exp(mean_nll)``: see the module docs for the protocol."""
    return math.exp(mean_nll(model, ids, window, batch_size, bos_token_id, progress))


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def perplexity_table(model: nn.Module, tokenizer, n_tokens: int = 8192,
                     domains: Sequence[str] | None = None, window: int = 512,
                     progress: bool = False) -> dict[str, float]:
    """Perplexity on the held-out part of every bundled domain (or of ``domains``):
    ``{"fiction": ..., "encyclopedia": ..., "technical": ..., "code": ...}``, ``n_tokens`` of
    each, scored as :func:`perplexity` does. Never text that calibration or healing draw from
    (see :mod:`tensornet_llm.helpers.data`)."""
    names = list(DOMAINS) if domains is None else list(domains)
    return {name: perplexity(model, held_out_ids(tokenizer, name, n_tokens), window,
                             progress=progress) for name in names}


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
