"""Bundled text for calibration, healing and perplexity, split by domain, and token batches.

The package ships a small corpus of four domains (``tensornet_llm/helpers/texts``, see its
README for sources and licences): fiction (Jane Austen's six novels), encyclopedic text (a
Wikipedia sample), technical prose (CPython's reference documentation) and source code (modules
of the Python standard library). Every domain is split into a *fit* part, the only text
calibration and healing draw from (:func:`calibration_mix`, :func:`healing_mix`), and a
*held-out* part, the only text :func:`tensornet_llm.helpers.evaluate.perplexity_table` scores:
the split is a boundary in :data:`DOMAINS`, shared by both parts, so they cannot overlap.
The last :data:`CHECK_SHARE` of every fit text is kept out of healing (:func:`healing_mix`
never reads it) for the checks that stop healing when general quality falls
(:func:`check_mix`).

Evaluation protocol (the one the reference figures in the texts' README use): skip the first
20,000 characters of a file (front matter), tokenize, and cut non-overlapping windows.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError, InputFileError
from .generated import generated_text  # text sampled from the model itself: data-free
from .start_token import AUTO, StartToken, is_token_id, resolve_start_token

__all__ = ["DATA_DIR", "CALIBRATION_TEXTS", "HELD_OUT_TEXT", "HEALING_TEXTS", "Part", "Domain",
           "DOMAINS", "domain_text", "calibration_mix", "healing_mix", "check_mix", "CHECK_SHARE",
           "held_out_ids",
           "text_path", "read_text", "tokenize_text", "token_batches", "text_batches",
           "generated_text"]

#: The bundled texts (package data); ``$TENSORNET_LLM_DATA`` names another folder to look in.
DATA_DIR = Path(__file__).resolve().parent / "texts"
#: Characters skipped at the start of a file (a novel's front matter).
FRONT_MATTER = 20_000

#: Single-text defaults of earlier versions (all inside the fiction domain's split): calibrate or
#: heal on these, report perplexity on the held-out novel.
CALIBRATION_TEXTS = ("austen_emma.txt", "austen_sensesensibility.txt")
HELD_OUT_TEXT = "austen_persuasion.txt"
HEALING_TEXTS = ("austen_emma.txt", "austen_sensesensibility.txt", "austen_mansfieldpark.txt",
                 "austen_prideprejudice.txt", "austen_northangerabbey.txt")


@dataclass(frozen=True)
class Part:
    """A stretch of one bundled file: from ``start`` to ``stop``, each a fraction of the file's
    characters or a marker string (the stretch starts / stops where the marker first occurs)."""

    file: str
    start: float | str = 0.0
    stop: float | str = 1.0

    def text(self) -> str:
        text = _file_text(self.file)
        begin, end = _offset(text, self.start, self.file), _offset(text, self.stop, self.file)
        if begin == 0 and len(text) > 2 * FRONT_MATTER:
            begin = FRONT_MATTER
        return text[begin:end]


def _offset(text: str, where: float | str, file: str) -> int:
    if isinstance(where, str):
        found = text.find(where)
        if found < 0:
            raise InputFileError(f"{file} has no marker {where!r}: the bundled texts are damaged")
        return found
    return int(len(text) * where)


def _split(file: str, boundary: float | str) -> tuple[Part, Part]:
    """The fit and held-out parts of one file, cut at one shared boundary (so disjoint)."""
    return Part(file, 0.0, boundary), Part(file, boundary, 1.0)


@dataclass(frozen=True)
class Domain:
    """A kind of text: the parts calibration and healing may use, and the parts only
    evaluation reads."""

    name: str
    description: str
    fit: tuple[Part, ...]
    held_out: tuple[Part, ...]


_WIKI = _split("enwiki_gensim.txt", 0.5)
_DOCS = _split("python_docs.txt", "== strings ==")
_CODE = _split("python_code.txt", "# ==== pathlib ====")

#: The bundled domains, in report order.
DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("fiction", "Jane Austen's novels (held out: Persuasion)",
           tuple(Part(f) for f in HEALING_TEXTS), (Part(HELD_OUT_TEXT),)),
    Domain("encyclopedia", "a Wikipedia sample (held out: its second half)",
           (_WIKI[0],), (_WIKI[1],)),
    Domain("technical", "CPython's reference documentation (held out: topics from 'strings')",
           (_DOCS[0],), (_DOCS[1],)),
    Domain("code", "Python standard-library source (held out: pathlib, tarfile, ipaddress, "
           "zipfile, gettext, cmd, tokenize)", (_CODE[0],), (_CODE[1],)),
)}


@lru_cache(maxsize=16)
def _file_text(name: str) -> str:
    return text_path(name).read_text(encoding="utf-8")


def _domains(domains: Sequence[str] | None) -> list[Domain]:
    names = list(DOMAINS) if domains is None else list(domains)
    unknown = [n for n in names if n not in DOMAINS]
    if unknown or not names:
        raise ArgumentError(f"domains must name some of {list(DOMAINS)}, got {domains!r}")
    return [DOMAINS[n] for n in names]


SPLITS = ("fit", "held_out", "heal", "check")


def domain_text(domain: str, split: str) -> list[str]:
    """The texts of one domain's split, one per part: ``"fit"`` (what calibration reads),
    ``"held_out"`` (what perplexity is scored on), or the two pieces of the fit text,
    ``"heal"`` (what healing reads) and ``"check"`` (its last :data:`CHECK_SHARE`, from a line
    start: what checks during healing score).

    Held-out text leaves out every paragraph that shares a sentence (or line) of 50 characters
    or more with the fit text, or occurs in it whole (the CPython documentation repeats passages
    across topics, the Wikipedia sample across articles), so nothing scored was calibrated or
    healed on."""
    if split not in SPLITS:
        raise ArgumentError(f"split must be one of {SPLITS}, got {split!r}")
    _domains([domain])
    if split == "held_out":
        return list(_held_out_texts(domain))
    return list(_fit_texts(domain) if split == "fit" else _heal_check_texts(domain)[
        split == "check"])


@lru_cache(maxsize=None)
def _fit_texts(domain: str) -> tuple[str, ...]:
    return tuple(part.text() for part in DOMAINS[domain].fit)


#: The share of every fit text (its end) that healing leaves out for the checks.
CHECK_SHARE = 0.04


@lru_cache(maxsize=None)
def _heal_check_texts(domain: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every fit text cut in two at the first line start after ``1 - CHECK_SHARE`` of it."""
    heal, check = [], []
    for text in _fit_texts(domain):
        cut = text.find("\n", int(len(text) * (1 - CHECK_SHARE)))
        cut = len(text) if cut < 0 else cut + 1
        heal.append(text[:cut])
        check.append(text[cut:])
    return tuple(heal), tuple(check)


#: Sentences (or lines) this long that occur in both splits mark a passage as repeated.
_REPEAT_MIN_CHARS = 50


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?:])\s+|\n", paragraph) if len(s) >= _REPEAT_MIN_CHARS]


@lru_cache(maxsize=None)
def _held_out_texts(domain: str) -> tuple[str, ...]:
    fit = "\n\n".join(_fit_texts(domain))
    seen = {s for s in _sentences(fit)}

    def repeated(paragraph: str) -> bool:
        return any(s in seen for s in _sentences(paragraph)) or (
            len(paragraph.strip()) >= 80 and paragraph.strip() in fit)

    return tuple("\n\n".join(p for p in part.text().split("\n\n") if not repeated(p))
                 for part in DOMAINS[domain].held_out)


def _spread_windows(tokenizer, texts: list[str], count: int, length: int) -> list[Tensor]:
    """``count`` windows of ``length`` token ids, spread evenly through ``texts`` (each starting
    at a line start), so that a few windows still see the whole of a domain."""
    sizes = [len(t) for t in texts]
    total = sum(sizes)
    span = length * 8  # characters read per window (about 2-4 characters per token)
    out = []
    for j in range(count):
        where = total * (j + 0.5) / count
        k = 0
        while k < len(texts) - 1 and where >= sizes[k]:
            where -= sizes[k]
            k += 1
        text = texts[k]
        begin = min(int(where), max(len(text) - span, 0))
        line = text.find("\n", begin)
        begin = line + 1 if 0 <= line < begin + span // 4 else begin
        ids = tokenizer(text[begin:begin + span], add_special_tokens=False)["input_ids"][:length]
        if len(ids) < length:
            raise InputFileError(f"not enough text for {count} windows of {length} tokens")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def _mix(tokenizer, n_tokens: int, seq_len: int, domains: Sequence[str] | None,
         bos_token_id: StartToken, model, split: str = "fit") -> list[Tensor]:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ArgumentError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ArgumentError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    chosen = _domains(domains)
    bos_token_id = resolve_start_token(bos_token_id, tokenizer, model)
    windows = max(len(chosen), math.ceil(n_tokens / seq_len))
    body = seq_len - (bos_token_id is not None)
    per_domain = [_spread_windows(tokenizer, domain_text(d.name, split),
                                  windows // len(chosen) + (i < windows % len(chosen)), body)
                  for i, d in enumerate(chosen)]
    out = []
    for j in range(max(len(w) for w in per_domain)):  # round robin: any prefix stays balanced
        for w in per_domain:
            if j < len(w):
                ids = w[j] if bos_token_id is None else torch.cat(
                    [w[j].new_tensor([bos_token_id]), w[j]])
                out.append(ids.unsqueeze(0))
    return out


def calibration_mix(tokenizer, n_tokens: int = 16384, seq_len: int = 512,
                    domains: Sequence[str] | None = None, bos_token_id: StartToken = AUTO,
                    *, model=None) -> list[Tensor]:
    """Calibration text from the fit part of every domain, an equal share of each.

    Returns about ``n_tokens / seq_len`` (at least one per domain) token-id tensors of shape
    ``(1, seq_len)``, each the start token followed by text, spread evenly through each
    domain's fit text and interleaved domain by domain. The start token is ``bos_token_id``, by
    default the one the model was trained to see first (:func:`~tensornet_llm.helpers.
    start_token.start_token` of the tokenizer and ``model``); ``None``: text alone.
    Deterministic: the same tokenizer gives the same windows.
    """
    return _mix(tokenizer, n_tokens, seq_len, domains, bos_token_id, model)


def healing_mix(tokenizer, n_tokens: int, seq_len: int = 256, batch_size: int = 4,
                domains: Sequence[str] | None = None, bos_token_id: StartToken = AUTO,
                *, model=None) -> list[Tensor]:
    """Healing batches ``(batch_size, seq_len + 1)`` from the fit part of every domain, an equal
    share of each (domains interleaved, so every batch mixes them), less the part kept for
    :func:`check_mix`. Windows start as :func:`calibration_mix`'s do."""
    windows = _mix(tokenizer, n_tokens, seq_len + 1, domains, bos_token_id, model, split="heal")
    return [torch.cat(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]


def check_mix(tokenizer, n_tokens: int = 2048, seq_len: int = 512,
              domains: Sequence[str] | None = None, bos_token_id: StartToken = AUTO,
              *, model=None) -> list[Tensor]:
    """Windows ``(1, seq_len)`` for the checks during healing (``heal(..., check=...)``): an
    equal share of every domain's ``"check"`` split, text :func:`healing_mix` never reads and
    :func:`~tensornet_llm.helpers.evaluate.perplexity_table` never scores. Windows start as
    :func:`calibration_mix`'s do."""
    return _mix(tokenizer, n_tokens, seq_len, domains, bos_token_id, model, split="check")


def held_out_ids(tokenizer, domain: str, n_tokens: int | None = 8192) -> Tensor:
    """Token ids ``(n,)`` of one domain's held-out text (what perplexity is measured on), at
    most ``n_tokens`` of them, from the start of its held-out part."""
    ids: list[int] = []
    for text in domain_text(domain, "held_out"):
        chars = None if n_tokens is None else (n_tokens - len(ids)) * 8
        ids += tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if n_tokens is not None and len(ids) >= n_tokens:
            break
    out = torch.tensor(ids, dtype=torch.long)
    return out if n_tokens is None else out[:n_tokens]


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


def token_batches(ids: Tensor, seq_len: int, batch_size: int, bos_token_id: int | None
                  ) -> Iterator[Tensor]:
    """Non-overlapping windows of ``seq_len`` tokens, ``(batch, seq_len + 1)`` with
    ``bos_token_id`` before each (``(batch, seq_len)`` for ``None``). The ids alone cannot say
    which start token their model was trained with, so it has no default: see
    :func:`~tensornet_llm.helpers.start_token.start_token`."""
    if bos_token_id is not None and not is_token_id(bos_token_id):
        raise ArgumentError(f"bos_token_id must be a token id or None, got {bos_token_id!r}")
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].reshape(n, seq_len)
    if bos_token_id is not None:
        windows = torch.cat([windows.new_full((n, 1), bos_token_id), windows], dim=1)
    for i in range(0, n, batch_size):
        yield windows[i : i + batch_size]


def text_batches(tokenizer, texts: str | os.PathLike | Sequence[str | os.PathLike],
                 n_tokens: int | None = None, seq_len: int = 256, batch_size: int = 4,
                 bos_token_id: StartToken = AUTO, *, model=None) -> list[Tensor]:
    """Training or calibration batches ``(batch, seq_len + 1)`` from one text or several.

    ``n_tokens`` in all (``None``: every token), an equal share from each text; the texts are
    joined in order and cut into windows as :func:`token_batches` does, each starting with the
    start token (as :func:`calibration_mix`'s).
    """
    names = [texts] if isinstance(texts, (str, os.PathLike)) else list(texts)
    if not names:
        raise ArgumentError("texts must name at least one text")
    bos_token_id = resolve_start_token(bos_token_id, tokenizer, model)
    share = None if n_tokens is None else n_tokens // len(names)
    ids = torch.cat([tokenize_text(tokenizer, name, share) for name in names])
    return list(token_batches(ids, seq_len, batch_size, bos_token_id))
