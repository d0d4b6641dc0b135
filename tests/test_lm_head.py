"""The LM head as an opt-in target (``lm_head=True``): a tied head is factored and untied on
request, and the ratio budget leaves it dense (a factored copy would add parameters); an untied
head is priced by the softmax's Fisher at the logits; the result saves and loads with both
loaders; settings that cannot apply fail before the model is touched."""

import copy

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from models import LLAMA_LIKE, build, calibration, inputs
from tensornet_llm import CompactifyConfig, compactify, load_compactified, save_compactified
from tensornet_llm.compress.calibrate import output_gradients
from tensornet_llm.compress.stream import compactify_pretrained
from tensornet_llm.errors import ArgumentError
from tensornet_llm.layers.low_rank import KeptRowsLinear

X = inputs("llama")


def llama(tied: bool, seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=tied, **LLAMA_LIKE)).eval()


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(**X).logits


@pytest.mark.parametrize("save", ["save_compactified", "save_pretrained"])
def test_a_tied_head_at_full_rank_is_untied_exactly_and_loads_back(tmp_path, save):
    model = llama(tied=True)
    table = model.model.embed_tokens.weight
    assert model.lm_head.weight is table
    ref = logits(model)
    report = compactify(model, chi=32, method="low-rank", targets=["lm_head"], lm_head=True,
                        progress=False)
    assert isinstance(model.lm_head, KeptRowsLinear) and model.lm_head.rank == 32
    assert model.model.embed_tokens.weight is table  # the embedding keeps its table
    assert model.config.tie_word_embeddings is False
    assert any("lm_head no longer shares its weight with model.embed_tokens.weight" in n
               for n in report.notes)
    out = logits(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    loaders = [AutoModelForCausalLM.from_pretrained]
    if save == "save_compactified":
        save_compactified(model, tmp_path)
        loaders.append(load_compactified)
    else:
        model.save_pretrained(tmp_path)
    for loaded in (load(tmp_path) for load in loaders):
        assert isinstance(loaded.lm_head, KeptRowsLinear)
        assert loaded.lm_head.kept.weight is not loaded.model.embed_tokens.weight
        assert torch.equal(logits(loaded.eval()), out)
        assert torch.equal(loaded.model.embed_tokens.weight, table)


def test_the_ratio_budget_leaves_a_tied_head_dense_and_tied():
    model = llama(tied=True)
    report = compactify(model, ratio=0.6, lm_head=True, calibration=calibration(),
                        fit_steps=0, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is True
    reasons = dict(report.skipped)
    assert "shares its weight with model.embed_tokens.weight" in reasons["lm_head"]
    assert report.model_params_after <= report.model_params_before
    assert "lm_head" not in {row.name for row in report.layers}


def test_an_untied_head_is_priced_and_compressed_by_the_budget_where_it_costs_nothing():
    model = llama(tied=False)
    with torch.no_grad():  # a rank-4 head: kept rows of rank >= 4 reproduce it exactly
        u, s, vh = torch.linalg.svd(model.lm_head.weight)
        model.lm_head.weight.copy_((u[:, :4] * s[:4]) @ vh[:4])
    ref = logits(model)
    dense_head = model.lm_head.weight.numel()
    targets = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear))
    # the head's exact rungs save 96 * 32 - r (128 - r): enough for this ratio alone
    ratio = 1 - (dense_head - 4 * (128 - 4)) / targets + 0.005
    report = compactify(model, ratio=ratio, lm_head=True, calibration=calibration(),
                        progress=False)
    assert isinstance(model.lm_head, KeptRowsLinear) and model.lm_head.rank >= 4
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(logits(model), ref, atol=1e-4, rtol=1e-4)
    assert "lm_head" in {row.name for row in report.layers}


@pytest.mark.parametrize("full", [False, True])
def test_the_head_is_weighted_by_the_softmax_fisher_at_its_logits(full):
    model = llama(tied=False)
    batches = [{"input_ids": b} for b in calibration()]
    grads, reason = output_gradients(model, batches, {"lm_head": model.lm_head,
                                                      "q": model.model.layers[0].self_attn.q_proj},
                                     full=full)
    assert reason is None
    with torch.no_grad():
        p = torch.cat([model(**b).logits.reshape(-1, 96) for b in batches]).double().softmax(-1)
    expected = (torch.diag(p.sum(0)) - p.T @ p if full else (p * (1 - p)).sum(0)) / p.shape[0]
    torch.testing.assert_close(grads["lm_head"], expected, atol=1e-6, rtol=1e-4)
    assert grads["q"].shape == ((32, 32) if full else (32,))  # others: the empirical gradient


def test_settings_that_cannot_apply_fail_before_the_model_is_touched(tmp_path):
    model = llama(tied=False)
    before = state(model)
    with pytest.raises(ArgumentError, match="output_metric='full' weighs the LM head"):
        compactify(model, ratio=0.8, lm_head=True, calibration=calibration(), progress=False,
                   config=CompactifyConfig(output_metric="full"))
    with pytest.raises(ArgumentError, match="lm_head does not apply with cross_layer"):
        compactify(model, chi=4, lm_head=True, cross_layer=2, progress=False)
    encoder = tf.BertModel(tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=96))
    with pytest.raises(ArgumentError, match="get_output_embeddings"):
        compactify(encoder, chi=4, lm_head=True, progress=False)
    with pytest.raises(ArgumentError, match="lm_head does not apply"):
        compactify_pretrained(tmp_path, tmp_path / "out", chi=4, lm_head=True)
    tied = llama(tied=True)
    with pytest.raises(ArgumentError, match="only modules that share their weight"):
        compactify(tied, ratio=0.5, targets=["lm_head"], progress=False)
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())
    assert isinstance(tied.lm_head, torch.nn.Linear) and tied.config.tie_word_embeddings


def test_excluding_the_head_wins_over_lm_head():
    model = build("llama")
    report = compactify(copy.deepcopy(model), chi=4, lm_head=True, exclude=["lm_head"],
                        progress=False)
    assert dict(report.skipped)["lm_head"] == "excluded"
