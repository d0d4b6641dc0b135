"""Text to token batches: windows, BOS, an equal share of each of several texts."""

import pytest
import torch

from models import build, char_tokenizer
from tensornet_llm.helpers.data import (
    CHECK_SHARE, check_mix,
    DOMAINS, calibration_mix, domain_text, healing_mix, held_out_ids, read_text, text_batches,
    token_batches, tokenize_text,
)
from tensornet_llm.helpers.evaluate import compare_to_dense, perplexity_table


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
    batches = list(token_batches(ids, seq_len=3, batch_size=2, bos_token_id=0))
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


# ----- the bundled domains ------------------------------------------------------------------------

@pytest.mark.parametrize("domain", list(DOMAINS))
def test_held_out_text_never_occurs_in_fit_text(domain):
    fit = "\n".join(domain_text(domain, "fit"))
    held = "\n".join(domain_text(domain, "held_out"))
    assert len(fit) > 200_000 and len(held) > 60_000
    step = max(1, len(held) // 300)
    shared = [i for i in range(0, len(held) - 200, step) if held[i:i + 200] in fit]
    assert not shared, f"{domain}: held-out text at {shared[:3]} also in the fit text"


def test_four_domains_of_different_kinds():
    assert list(DOMAINS) == ["fiction", "encyclopedia", "technical", "code"]
    code = "\n".join(domain_text("code", "held_out"))
    assert "def " in code and "import " in code
    assert "class Path" in code  # pathlib is held out
    assert "class ArgumentParser" in "\n".join(domain_text("code", "fit"))
    with pytest.raises(ValueError, match="domains must name"):
        calibration_mix(char_tokenizer(), 512, domains=["poetry"])
    with pytest.raises(ValueError, match="split"):
        domain_text("code", "train")


def test_calibration_mix_is_deterministic_balanced_and_from_fit_text():
    tok = char_tokenizer()
    mix = calibration_mix(tok, 8 * 256, seq_len=256)
    assert len(mix) == 8 and all(w.shape == (1, 256) and w[0, 0] == 0 for w in mix)
    again = calibration_mix(tok, 8 * 256, seq_len=256)
    assert all(torch.equal(a, b) for a, b in zip(mix, again))
    texts = ["".join(tok.convert_ids_to_tokens(w[0, 1:61].tolist())) for w in mix]
    fits = {d: "\n".join(domain_text(d, "fit")) for d in DOMAINS}
    # round robin: windows 0..3 come from the four domains in order, and so do 4..7
    checked = 0
    for i, text in enumerate(texts):
        if "<unk>" not in text:  # characters outside the tiny vocabulary cannot be compared
            assert text in fits[list(DOMAINS)[i % 4]], (i, text)
            checked += 1
    assert checked >= 4
    assert len(calibration_mix(tok, 10, seq_len=64)) == 4  # at least one window per domain


def test_healing_mix_batches():
    batches = healing_mix(char_tokenizer(), 16 * 65, seq_len=64, batch_size=4)
    assert [b.shape for b in batches] == [(4, 65)] * 4


def test_the_check_text_is_the_end_of_the_fit_text_that_healing_never_reads():
    tok = char_tokenizer()
    for domain in DOMAINS:
        fit, heal_part, check = (domain_text(domain, s) for s in ("fit", "heal", "check"))
        assert len(fit) == len(heal_part) == len(check)
        for f, h, c in zip(fit, heal_part, check):
            assert h + c == f and h.endswith("\n")
            assert 0.02 * len(f) < len(c) <= CHECK_SHARE * len(f) + 1
    windows = check_mix(tok, 8 * 128, seq_len=128)
    assert len(windows) == 8 and all(w.shape == (1, 128) for w in windows)
    checks = {d: "\n".join(domain_text(d, "check")) for d in DOMAINS}
    heals = {d: "\n".join(domain_text(d, "heal")) for d in DOMAINS}
    compared = 0
    for i, w in enumerate(windows):
        text = "".join(tok.convert_ids_to_tokens(w[0, 1:61].tolist()))
        if "<unk>" not in text:
            domain = list(DOMAINS)[i % 4]
            assert text in checks[domain] and text not in heals[domain], (i, text)
            compared += 1
    assert compared >= 4


def test_perplexity_table_over_held_out_domains():
    model, tok = build("llama"), char_tokenizer()
    table = perplexity_table(model, tok, n_tokens=128, window=64)
    assert list(table) == list(DOMAINS) and all(v > 1 for v in table.values())
    ids = held_out_ids(tok, "fiction", 128)
    assert ids.shape == (128,)
    ratios = compare_to_dense({k: 2 * v for k, v in table.items()}, table)
    assert ratios["geomean"] == pytest.approx(2.0) and ratios["worst"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="dense has no perplexity"):
        compare_to_dense(table, {})


def test_generated_text_is_sampled_cached_and_leaves_the_rng(tmp_path):
    import torch

    from models import build, char_tokenizer
    from tensornet_llm.helpers.data import generated_text

    model, tok = build("llama"), char_tokenizer()
    state = torch.random.get_rng_state()
    windows = generated_text(model, tok, 100, seq_len=24, batch_size=2, cache_dir=tmp_path,
                             prompts=["It is", "The"], progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(windows) == 5 and all(w.shape == (1, 24) for w in windows)
    assert all(int(w[0, 0]) == (tok.bos_token_id or 0) for w in windows)
    first = tok("It is", add_special_tokens=False)["input_ids"]
    assert windows[0][0, 1:1 + len(first)].tolist() == first  # a window starts from its prompt
    assert len({tuple(w[0].tolist()) for w in windows}) == 5  # sampled, not greedy
    assert int(max(w.max() for w in windows)) < model.config.vocab_size
    # The cache returns the same windows without sampling again; another seed differs.
    cached = generated_text(model, tok, 100, seq_len=24, batch_size=2, cache_dir=tmp_path,
                            prompts=["It is", "The"], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(windows, cached))
    assert len(list(tmp_path.iterdir())) == 1
    other = generated_text(model, tok, 100, seq_len=24, batch_size=2, cache_dir=False, seed=1,
                           prompts=["It is", "The"], progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(windows, other))
    with torch.no_grad():  # a different model is a different cache entry
        next(model.parameters()).add_(1.0)
    generated_text(model, tok, 100, seq_len=24, batch_size=2, cache_dir=tmp_path,
                   prompts=["It is", "The"], progress=False)
    assert len(list(tmp_path.iterdir())) == 2
    # so is another batch size: a batch shares its seed and prompt, so the samples differ
    regrouped = generated_text(model, tok, 100, seq_len=24, batch_size=5, cache_dir=tmp_path,
                               prompts=["It is", "The"], progress=False)
    assert len(list(tmp_path.iterdir())) == 3
    assert all(int(w[0, 0]) == (tok.bos_token_id or 0) for w in regrouped)


def test_generated_text_refuses_bad_settings():
    from models import build, char_tokenizer
    from tensornet_llm.helpers.data import generated_text
    from tensornet_llm.errors import ArgumentError

    model, tok = build("llama"), char_tokenizer()
    for kwargs, message in [(dict(n_tokens=0), "n_tokens"), (dict(temperature=0), "temperature"),
                            (dict(top_p=1.5), "top_p"), (dict(seq_len=4, prompts=["long prompt"]),
                                                         "shorter than seq_len")]:
        with pytest.raises(ArgumentError, match=message):
            generated_text(model, tok, **{"n_tokens": 10, **kwargs}, cache_dir=False)
