"""Real English text for calibration and perplexity, and turning it into token batches.

The repository bundles Jane Austen's six novels and a Wikipedia sample in ``data/`` (see its
README). Evaluation protocol (the one the reference figures in ``data/README.md`` use): skip the
first 20,000 characters (front matter), tokenize, and cut non-overlapping windows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError, InputFileError

__all__ = ["DATA_DIR", "CALIBRATION_TEXTS", "HELD_OUT_TEXT", "HEALING_TEXTS", "text_path",
           "read_text", "tokenize_text", "token_batches", "text_batches"]

DATA_DIR = Path(__file__).resolve().parents[2] / "data"

#: Default split: calibrate / heal on these, report perplexity on held-out text.
CALIBRATION_TEXTS = ("austen_emma.txt", "austen_sensesensibility.txt")
HELD_OUT_TEXT = "austen_persuasion.txt"
#: Every bundled novel but the held-out one: more distinct text for healing, which overfits
#: the two calibration novels within a few hundred steps.
HEALING_TEXTS = ("austen_emma.txt", "austen_sensesensibility.txt", "austen_mansfieldpark.txt",
                 "austen_prideprejudice.txt", "austen_northangerabbey.txt")


def text_path(name: str | os.PathLike) -> Path:
    """A file path as given, or a bundled text by name (``"austen_persuasion.txt"``)."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in (Path(os.environ.get("TENSORNET_LLM_DATA", DATA_DIR)), DATA_DIR):
        if (folder / path.name).is_file():
            return folder / path.name
    raise InputFileError(f"no text file {name!r} (looked in the working directory and {DATA_DIR})")


def read_text(name: str | os.PathLike, start_char: int = 20_000, max_chars: int | None = None) -> str:
    text = text_path(name).read_text(encoding="utf-8")
    start = start_char if len(text) > start_char else 0
    return text[start : start + max_chars if max_chars else None]


def tokenize_text(tokenizer, name: str | os.PathLike, n_tokens: int | None = None,
                  start_char: int = 20_000) -> Tensor:
    """Token ids ``(n,)`` of a text, from ``start_char``, at most ``n_tokens`` of them."""
    # ~4 characters per token; read a margin so that n_tokens are available.
    max_chars = None if n_tokens is None else n_tokens * 8
    ids = tokenizer(read_text(name, start_char, max_chars), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids if n_tokens is None else ids[:n_tokens]


def token_batches(ids: Tensor, seq_len: int, batch_size: int, bos_token_id: int | None = 0,
                  ) -> Iterator[Tensor]:
    """Non-overlapping windows of ``seq_len`` tokens (``bos`` prepended), ``(batch, seq_len+1)``."""
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].reshape(n, seq_len)
    if bos_token_id is not None:
        windows = torch.cat([windows.new_full((n, 1), bos_token_id), windows], dim=1)
    for i in range(0, n, batch_size):
        yield windows[i : i + batch_size]


def text_batches(tokenizer, texts: str | os.PathLike | Sequence[str | os.PathLike],
                 n_tokens: int | None = None, seq_len: int = 256, batch_size: int = 4,
                 bos_token_id: int | None = 0) -> list[Tensor]:
    """Training or calibration batches ``(batch, seq_len + 1)`` from one text or several.

    ``n_tokens`` in all (``None``: every token), an equal share from each text; the texts are
    joined in order and cut into windows as :func:`token_batches` does.
    """
    names = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
    if not names:
        raise ArgumentError("texts must name at least one text")
    share = None if n_tokens is None else n_tokens // len(names)
    ids = torch.cat([tokenize_text(tokenizer, name, share) for name in names])
    return list(token_batches(ids, seq_len, batch_size, bos_token_id))
