"""Data-free calibration and healing text: samples from the dense model itself.

:func:`generated_text` samples token windows from a model (nucleus sampling at a temperature,
from the beginning-of-text token or from short prompts) and caches them on disk, keyed by the
model's weights, the tokenizer and the settings, so a second call costs nothing. Text the model
writes follows the model's own distribution over topics and styles rather than one corpus's,
which is what a compressed model should keep; it needs no data at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import ArgumentError
from .files import atomic_directory
from .models import default_cache_dir
from .start_token import AUTO, StartToken, resolve_start_token

__all__ = ["generated_text", "model_fingerprint"]

IDS_FILE = "ids.pt"


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class, config and every parameter's bytes (sampled: a stride
    through each tensor, so it costs little even for large models)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            digest.update(name.encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def generated_text(
    model: nn.Module,
    tokenizer,
    n_tokens: int = 16384,
    *,
    seq_len: int = 512,
    prompts: Sequence[str] | None = None,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: str | os.PathLike | bool | None = None,
    progress: bool = True,
    bos_token_id: StartToken = AUTO,
) -> list[Tensor]:
    """About ``n_tokens`` of text sampled from ``model``, as ``(1, seq_len)`` token-id windows.

    Each window starts with the model's start token (``bos_token_id``, by default
    :func:`~tensornet_llm.helpers.start_token.start_token` of the tokenizer and model), then,
    with ``prompts``, one of them (in turn), then sampled tokens up to ``seq_len`` (end-of-text is
    suppressed, so every window is full). Usable wherever calibration or healing text is taken
    (``compactify(calibration=...)``, ``heal``, by windows). Deterministic for a given ``seed``;
    the global RNG state is left as it was.

    Args:
        model: the dense causal language model to sample from (any device).
        tokenizer: its tokenizer (for the prompts and the special tokens).
        n_tokens: tokens wanted; ``ceil(n_tokens / seq_len)`` windows are returned.
        prompts: short texts to start windows from, for variety; default none.
        temperature, top_p: the sampling distribution.
        batch_size: windows sampled at once.
        cache_dir: where to keep the samples (default ``$TENSORNET_LLM_CACHE/generated``);
            ``False`` neither reads nor writes a cache.
        progress: show a progress bar.
        bos_token_id: the start token (an id; ``None``: none, then ``prompts`` are needed).
    """
    for name, value, low in (("n_tokens", n_tokens, 1), ("seq_len", seq_len, 2),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ArgumentError(f"temperature must be a positive number, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ArgumentError(f"top_p must be a number in (0, 1], got {top_p!r}")
    bos = resolve_start_token(bos_token_id, tokenizer, model)
    starts = [([] if bos is None else [bos]) + tokenizer(p, add_special_tokens=False)["input_ids"]
              for p in prompts or [""]]
    if not all(starts):
        raise ArgumentError("this model has no start token (bos_token_id None): give prompts= "
                            "to sample from")
    if any(len(s) >= seq_len for s in starts):
        raise ArgumentError(f"prompts must be shorter than seq_len={seq_len} tokens")
    windows = math.ceil(n_tokens / seq_len)
    # batch_size is part of the key: a batch shares its seed and prompt, so it shapes the samples
    settings = {"windows": windows, "seq_len": seq_len, "starts": starts,
                "temperature": temperature, "top_p": top_p, "seed": seed,
                "batch_size": batch_size,
                "vocab": len(tokenizer), "model": model_fingerprint(model)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    cache = None if cache_dir is False else Path(
        cache_dir if cache_dir not in (None, True) else default_cache_dir() / "generated") / key
    if cache is not None and (cache / IDS_FILE).is_file():
        ids = torch.load(cache / IDS_FILE)
    else:
        ids = _sample(model, tokenizer, starts, windows, seq_len, temperature, top_p,
                      batch_size, seed, progress)
        if cache is not None:
            with atomic_directory(cache) as tmp:
                torch.save(ids, tmp / IDS_FILE)
                (tmp / "settings.json").write_text(json.dumps(settings, indent=1))
    return [row.unsqueeze(0) for row in ids]


@torch.no_grad()
def _sample(model: nn.Module, tokenizer, starts: list[list[int]], windows: int, seq_len: int,
            temperature: float, top_p: float, batch_size: int, seed: int,
            progress: bool) -> Tensor:
    """``(windows, seq_len)`` sampled token ids; windows of one batch share a prompt length."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(windows, seq_len, dtype=torch.long)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=windows, desc="sampling text", unit="window")
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for first in range(0, windows, batch_size):
                rows = range(first, min(first + batch_size, windows))
                start = starts[(first // batch_size) % len(starts)]
                torch.manual_seed(seed * 1_000_003 + first)
                prompt = torch.tensor([start] * len(rows), device=device)
                new = seq_len - prompt.shape[1]
                generated = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                    temperature=float(temperature), top_p=float(top_p), top_k=0,
                    max_new_tokens=new, min_new_tokens=new,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                    else tokenizer.eos_token_id)
                out[first:first + len(rows)] = generated[:, :seq_len].cpu()
                if bar is not None:
                    bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out
