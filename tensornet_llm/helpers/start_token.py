"""The token a window of plain text starts with, taken from the model's tokenizer and config.

Every calibration, healing and check window and every perplexity window starts with one token
before the text, so that the first scored token has a context. Which token a model was trained
to see at the start of a document differs by family:

* tokenizers that prepend a beginning-of-sequence token themselves (LLaMA, Mistral, Gemma, OPT,
  ...) say so: that token (Gemma's ``<bos>`` is 2, its token 0 is ``<pad>``);
* the others were pretrained on documents joined by a separator and add nothing (GPT-2, Pythia,
  Qwen, SmolLM, Falcon, ...): the config's ``bos_token_id``, else the tokenizer's, else the
  vocabulary's ``<|endoftext|>``; a candidate the tokenizer's chat template uses is a chat turn
  marker, not a document start, and is passed over (SmolLM2-Instruct's ``bos_token_id`` 1 is
  ``<|im_start|>``: its documents start after ``<|endoftext|>``, token 0);
* a family with none of these uses no start token: ``None``.

An explicit ``bos_token_id`` argument (an id, or ``None`` for no start token) always wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Union

from torch import nn

from ..errors import ArgumentError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["AUTO", "StartToken", "start_token", "resolve_start_token", "is_token_id"]

#: The default of every ``bos_token_id`` argument: take the start token from the tokenizer.
AUTO = "auto"
StartToken = Union[int, None, Literal["auto"]]
#: The document separator of GPT-2's byte-level BPE and the many families that took it over.
END_OF_TEXT = "<|endoftext|>"
_PROBE = "a"


def start_token(tokenizer, model: nn.Module | PretrainedConfig | None = None) -> int | None:
    """The token id a window of plain text starts with for this tokenizer (and ``model``, or its
    config, whose ``bos_token_id`` comes before the tokenizer's), or ``None``: see the module
    docs."""
    prepended = _prepended(tokenizer)
    if prepended is not None:
        return prepended
    config = getattr(model, "config", model)
    candidates = [getattr(config, "bos_token_id", None), getattr(tokenizer, "bos_token_id", None),
                  _vocabulary_id(tokenizer, END_OF_TEXT)]
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else " ".join(
        template.values() if isinstance(template, dict) else [])
    for token_id in candidates:
        if is_token_id(token_id) and not (
                template and _token_text(tokenizer, token_id) in template):
            return token_id
    return None


def resolve_start_token(bos_token_id: StartToken, tokenizer,
                        model: nn.Module | PretrainedConfig | None = None,
                        argument: str = "bos_token_id") -> int | None:
    """``bos_token_id`` as given (an id or ``None``), or for :data:`AUTO` the
    :func:`start_token` of ``tokenizer`` (an error without one: the ids alone cannot say)."""
    if bos_token_id is None or is_token_id(bos_token_id):
        return bos_token_id
    if bos_token_id != AUTO:
        raise ArgumentError(f"{argument} must be a token id, None or {AUTO!r}, got {bos_token_id!r}")
    if tokenizer is None:
        raise ArgumentError(f"{argument}={AUTO!r} takes the start token from the tokenizer: pass "
                            f"tokenizer=, or {argument}= an id (None: no start token)")
    return start_token(tokenizer, model)


def is_token_id(value: object) -> bool:
    """Whether ``value`` can be a token id: an integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _prepended(tokenizer) -> int | None:
    """The special token the tokenizer puts before the text itself, if it puts one there."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    if len(full) > len(plain) and full[1:len(plain) + 1] == plain and \
            full[0] in set(getattr(tokenizer, "all_special_ids", [])):
        return full[0]
    return None


def _vocabulary_id(tokenizer, text: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(text)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(token_id, int) or (token_id == unknown and getattr(
            tokenizer, "unk_token", None) != text):
        return None
    return token_id


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.convert_ids_to_tokens(token_id)
    return text if isinstance(text, str) else ""
