"""Every window of text starts with the token the model was trained to see first, taken from the
tokenizer and config: BOS 0 (nothing prepended), BOS 2 with pad 0 (prepended by the tokenizer),
no start token, and a chat model whose BOS is a turn marker. An explicit argument wins."""

import pytest
import torch

from models import CONVENTIONS, convention_model, convention_tokenizer
from tensornet_llm.errors import ArgumentError
from tensornet_llm.helpers.data import (calibration_mix, check_mix, healing_mix, held_out_ids,
                                        text_batches, token_batches)
from tensornet_llm.helpers.evaluate import perplexity, perplexity_table
from tensornet_llm.helpers.generated import generated_text
from tensornet_llm.helpers.start_token import start_token

NAMES = list(CONVENTIONS)


def first_tokens(batches) -> set:
    return {int(row[0]) for b in batches for row in b}


def expected(name: str):
    return CONVENTIONS[name][3]


@pytest.mark.parametrize("name", NAMES)
def test_start_token_follows_the_convention(name):
    tok = convention_tokenizer(name)
    assert start_token(tok) == start_token(tok, convention_model(name)) == expected(name)


@pytest.mark.parametrize("name", NAMES)
def test_every_data_window_starts_with_the_start_token(name, tmp_path):
    tok, model = convention_tokenizer(name), convention_model(name)
    text = tmp_path / "t.txt"
    text.write_text("some plain text to read. " * 400)
    want = expected(name)
    plain = {"calibration_mix": calibration_mix(tok, 1024, seq_len=64),
             "check_mix": check_mix(tok, 512, seq_len=64, model=model),
             "healing_mix": healing_mix(tok, 1024, seq_len=64),
             "text_batches": text_batches(tok, str(text), 1024, seq_len=64, model=model)}
    for what, batches in plain.items():
        if want is None:  # no start token: windows start with text
            assert not first_tokens(batches) & set(tok.all_special_ids), what
        else:
            assert first_tokens(batches) == {want}, what
            assert not {int(t) for b in batches for t in b[:, 1:].flatten()} & {want}, what
    # An explicit argument wins, None included.
    assert first_tokens(calibration_mix(tok, 512, seq_len=64, bos_token_id=5)) == {5}
    assert calibration_mix(tok, 512, seq_len=64, bos_token_id=None)[0].shape == (1, 64)


@pytest.mark.parametrize("name", NAMES)
def test_perplexity_windows_start_with_the_start_token(name):
    tok, model = convention_tokenizer(name), convention_model(name)
    seen = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    want = expected(name)
    perplexity_table(model, tok, n_tokens=128, window=64, domains=["fiction", "code"])
    firsts = {int(t) for ids in seen for t in ids[:, 0]}
    assert firsts == {want} if want is not None else 0 not in firsts  # 0: <eos>
    seen.clear()
    ids = held_out_ids(tok, "technical", 128)
    perplexity(model, ids, window=64, tokenizer=tok)
    windows = torch.cat(seen)
    if want is not None:
        assert windows[:, 0].tolist() == [want, want]
        windows = windows[:, 1:]
    assert torch.equal(windows.flatten(), ids)  # the text itself, whole, after it


@pytest.mark.parametrize("name", ["bos0", "bos2_pad0", "chat"])
def test_generated_windows_start_with_the_start_token(name, tmp_path):
    tok, model = convention_tokenizer(name), convention_model(name)
    windows = generated_text(model, tok, 32, seq_len=16, batch_size=2, cache_dir=False,
                             progress=False)
    assert first_tokens(windows) == {expected(name)}


def test_generated_text_without_a_start_token_needs_prompts():
    tok, model = convention_tokenizer("none"), convention_model("none")
    with pytest.raises(ArgumentError, match="prompts"):
        generated_text(model, tok, 16, seq_len=8, cache_dir=False, progress=False)
    windows = generated_text(model, tok, 16, seq_len=8, prompts=["ab"], cache_dir=False,
                             progress=False)
    assert windows[0][0, :2].tolist() == tok("ab", add_special_tokens=False)["input_ids"]


def test_ids_alone_need_the_tokenizer_or_an_explicit_start_token():
    model, ids = convention_model("bos0"), torch.arange(4, 90)
    with pytest.raises(ArgumentError, match="tokenizer="):
        perplexity(model, ids, window=16)
    with pytest.raises(TypeError):
        token_batches(ids, 16, 2)  # no default: the ids cannot say
    with pytest.raises(ArgumentError, match="bos_token_id"):
        calibration_mix(convention_tokenizer("bos0"), 256, seq_len=64, bos_token_id="first")
    assert perplexity(model, ids, window=16, bos_token_id=0) == perplexity(
        model, ids, window=16, tokenizer=convention_tokenizer("bos0"))
