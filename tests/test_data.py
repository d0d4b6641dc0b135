"""Text to token batches: windows, BOS, an equal share of each of several texts."""

import pytest
import torch

from models import char_tokenizer
from tensornet_llm.helpers.data import read_text, text_batches, token_batches, tokenize_text


@pytest.fixture
def texts(tmp_path):
    paths = []
    for letter in "abc":
        path = tmp_path / f"{letter}.txt"
        path.write_text(letter * 500)  # short: read from the start (no front matter to skip)
        paths.append(path)
    return paths


def test_token_batches_cut_windows_with_bos():
    ids = torch.arange(2, 12)
    batches = list(token_batches(ids, seq_len=3, batch_size=2))
    assert [b.shape for b in batches] == [(2, 4), (1, 4)]  # 3 windows, the 10th token dropped
    assert batches[0].tolist() == [[0, 2, 3, 4], [0, 5, 6, 7]]
    assert list(token_batches(ids, 3, 2, bos_token_id=None))[1].tolist() == [[8, 9, 10]]


def test_text_batches_take_an_equal_share_of_each_text(texts):
    tok = char_tokenizer()
    letters = {tok.convert_tokens_to_ids(c): c for c in "abc"}
    batches = text_batches(tok, texts, n_tokens=60, seq_len=10, batch_size=4)
    windows = torch.cat(batches)
    assert windows.shape == (6, 11) and (windows[:, 0] == 0).all()
    body = [letters[i] for i in windows[:, 1:].flatten().tolist()]
    assert "".join(body) == "a" * 20 + "b" * 20 + "c" * 20  # joined in order, 20 tokens each


def test_one_text_and_every_token(texts):
    tok = char_tokenizer()
    ids = tokenize_text(tok, texts[0])
    assert ids.numel() == len(read_text(texts[0])) == 500
    assert torch.equal(torch.cat(text_batches(tok, texts[0], seq_len=100))[:, 1:].flatten(), ids)
    with pytest.raises(ValueError, match="at least one text"):
        text_batches(tok, [])
