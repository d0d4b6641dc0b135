"""Slim attention (``tensornet_llm.compress.heads``): fewer query heads per key/value group. The
drop order prices exactly the damage it reports and each drop is the cheapest one its round
allows; keeping every head changes nothing; the attention runs its own forward with the smaller
projections; ``compactify`` builds what the budget chose, undoes it on error, and the result
saves, loads (both loaders) and generates with every cache as before."""

import importlib
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from transformers import AutoModelForCausalLM

from models import build, calibration, inputs, silence_heads
from tensornet_llm import CompactifyConfig, compactify, load_compactified, save_compactified
from tensornet_llm.compress.heads import (
    GroupedAttention, HeadChoice, build_heads, grouped_attentions, head_order, head_rungs,
)
from tensornet_llm.compress.slim import REFIT_RIDGE, refit_down


def ridged_damage(unit, gram, weighted, kept, ridge):
    """The refit's error plus its coefficients' penalty, computed directly from the refit."""
    feats = unit.features(torch.tensor(sorted(kept), dtype=torch.long))
    refit = refit_down(weighted, gram, feats, ridge=ridge)
    error = weighted.clone()
    error[:, feats] -= refit
    penalty = ((refit - weighted[:, feats]).pow(2) * gram.diagonal()[feats]).sum()
    return float((error @ gram * error).sum() + ridge * penalty)


@st.composite
def attention_problems(draw):
    groups, per_group, d = draw(st.integers(1, 3)), draw(st.integers(2, 4)), draw(st.integers(1, 3))
    n = groups * per_group * d
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    a = torch.randn(3 * n + 2, n, generator=g, dtype=torch.float64)
    gram = a.T @ a / a.shape[0]
    weighted = torch.randn(draw(st.integers(1, 5)), n, generator=g, dtype=torch.float64)
    unit = GroupedAttention("attn", "attn.q_proj", "attn.o_proj", groups * per_group, groups, d)
    return unit, gram, weighted, draw(st.sampled_from([0.0, REFIT_RIDGE]))


@settings(max_examples=30, deadline=None)
@given(attention_problems())
def test_each_drop_is_the_cheapest_its_round_allows_and_reports_the_damage(problem):
    unit, gram, weighted, ridge = problem
    dropped, damage = head_order(unit, gram, weighted, ridge)
    assert len(dropped) == unit.heads - unit.groups and len(set(dropped.tolist())) == len(dropped)
    kept = set(range(unit.heads))
    for j, head in enumerate(dropped.tolist()):
        round_start = j - j % unit.groups
        reduced = {h // unit.per_group for h in dropped[round_start:j].tolist()}
        candidates = [h for h in kept if h // unit.per_group not in reduced]
        assert head in candidates  # one head of every group per round
        # the search ranks by tr(B Sc B^T) of the ridged Gram (the plain least-squares error
        # on it), as the slim MLP's neuron search does; the damage reported is that less the
        # ridge's share of the dropped features' own moments
        ridged = gram + ridge * torch.diag(gram.diagonal())
        costs = {h: ridged_damage(unit, ridged, weighted, kept - {h}, 0.0) for h in candidates}
        assert costs[head] <= min(costs.values()) * (1 + 1e-7) + 1e-9
        kept.discard(head)
        assert float(damage[j + 1]) == pytest.approx(
            ridged_damage(unit, gram, weighted, kept, ridge), rel=1e-6, abs=1e-9)
    assert float(damage[0]) == 0.0
    # every round leaves the same number of heads in each group
    for k in range(unit.groups, len(dropped) + 1, unit.groups):
        counts = torch.bincount(dropped[:k] // unit.per_group, minlength=unit.groups)
        assert (counts == k // unit.groups).all()


def grouped_model(arch="llama", layers=2):
    """A tiny grouped-query model (4 query heads, 2 groups) whose output projection ignores the
    second head of every group, so dropping those heads costs nothing."""
    return silence_heads(build(arch, layers=layers))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2"])
def test_keeping_every_head_changes_nothing_and_fewer_heads_run_the_attention_s_own_forward(arch):
    model = build(arch)
    batch = inputs(arch)
    expected = logits(model, batch)
    names = {n for n, _ in model.named_modules()}
    units = grouped_attentions(model, names)
    assert [u.name for u in units] == [f"model.layers.{i}.self_attn" for i in range(2)]
    unit, attn = units[0], model.get_submodule(units[0].name)
    gram = torch.eye(unit.heads * unit.head_dim, dtype=torch.float64)
    (q, o), _ = build_heads(HeadChoice(unit, torch.arange(unit.heads)), attn, gram)
    assert torch.equal(q.weight, attn.q_proj.weight) and torch.equal(o.weight, attn.o_proj.weight)
    # Dropping heads 0 and 2 with an identity Gram (no refit from other heads) is the full
    # attention with those heads' o_proj columns zeroed.
    keep = torch.tensor([1, 3])
    (q, o), _ = build_heads(HeadChoice(unit, keep), attn, gram)
    zeroed = attn.o_proj.weight.detach().clone()
    for head in (0, 2):
        zeroed[:, head * unit.head_dim:(head + 1) * unit.head_dim] = 0
    with torch.no_grad():
        attn.o_proj.weight.copy_(zeroed)
    want = logits(model, batch)
    attn.q_proj, attn.o_proj, attn.num_key_value_groups = q, o, 1
    torch.testing.assert_close(logits(model, batch), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, expected)


def test_only_grouped_attention_is_offered():
    mha = build("llama")
    for layer in mha.model.layers:  # every query head its own key/value head
        layer.self_attn.num_key_value_groups = 1
    assert grouped_attentions(mha, {n for n, _ in mha.named_modules()}) == []
    neox = build("gpt_neox")  # one fused query-key-value projection
    assert grouped_attentions(neox, {n for n, _ in neox.named_modules()}) == []
    llama = build("llama")
    assert grouped_attentions(llama, {"model.layers.0.self_attn.q_proj"}) == []  # o_proj not a target

    class Rigid(type(llama.model.layers[0].self_attn)):  # runs only with the config's head count
        def forward(self, hidden_states, *args, **kwargs):
            assert self.q_proj.out_features == self.config.num_attention_heads * self.head_dim
            return super().forward(hidden_states, *args, **kwargs)

    attn = llama.model.layers[0].self_attn
    attn.__class__ = Rigid
    parts = (attn.q_proj, attn.o_proj)
    names = {n for n, _ in llama.named_modules()}
    assert [u.name for u in grouped_attentions(llama, names)] == ["model.layers.1.self_attn"]
    assert (attn.q_proj, attn.o_proj, attn.num_key_value_groups) == (*parts, 2)  # as it was


def test_the_rungs_price_what_build_heads_builds():
    model = build("llama")
    unit = grouped_attentions(model, {n for n, _ in model.named_modules()})[0]
    attn = model.get_submodule(unit.name)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, unit.heads * unit.head_dim, generator=g, dtype=torch.float64)
    gram = a.T @ a / 200
    (width, params, damage, keep), = head_rungs(unit, attn.q_proj, attn.o_proj, gram, None)
    (q, o), rows = build_heads(HeadChoice(unit, keep), attn, gram)
    assert width == 1 and params == sum(p.numel() for m in (q, o) for p in m.parameters())
    w = attn.o_proj.weight.detach().double()
    scale = 1.0 / float((w @ gram * w).sum())
    assert damage == pytest.approx(scale * ridged_damage(unit, gram, w, set(keep.tolist()),
                                                         REFIT_RIDGE), rel=1e-6)
    assert rows[1].act_error < rows[1].act_error_start  # the refit helps


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compactify_drops_the_heads_that_cost_nothing_and_the_model_saves_and_loads(arch, tmp_path):
    model = grouped_model(arch)
    batch = inputs(arch)
    expected = logits(model, batch)
    report = compactify(model, ratio=0.75, targets=["self_attn"], calibration=calibration(),
                        progress=False)
    slim = {r.name for r in report.layers if r.method == "slim"}
    assert slim == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qo"}
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.num_key_value_groups == 1 and type(attn.q_proj) is nn.Linear
        assert attn.q_proj.out_features == attn.o_proj.in_features == 2 * attn.head_dim
    # the silent heads contributed nothing: the same logits, up to the refit's float64 round trip
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    save_compactified(model, tmp_path / "m")
    written = json.loads((tmp_path / "m" / "tensornet.json").read_text())
    assert written["query_groups"] == {f"model.layers.{i}.self_attn": 1 for i in range(2)}
    now = logits(model, batch)
    for loaded in (load_compactified(tmp_path / "m"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "m")):
        assert all(layer.self_attn.num_key_value_groups == 1 for layer in loaded.model.layers)
        torch.testing.assert_close(logits(loaded, batch), now, rtol=0, atol=0)
    prompt = batch["input_ids"][:1]
    dynamic = model.generate(prompt, max_new_tokens=6, do_sample=False)
    static = model.generate(prompt, max_new_tokens=6, do_sample=False,
                            cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_slim_attention_false_offers_no_fewer_heads():
    model = grouped_model()
    report = compactify(model, ratio=0.75, targets=["self_attn"], calibration=calibration(),
                        config=CompactifyConfig(slim_attention=False), progress=False)
    assert all(r.method != "slim" for r in report.layers)
    assert all(layer.self_attn.num_key_value_groups == 2 for layer in model.model.layers)


def test_an_error_puts_every_head_back(monkeypatch):
    model = grouped_model()
    batch = inputs("llama")
    expected = logits(model, batch)
    built = []

    def second_fails(*args, **kwargs):
        if built:
            raise RuntimeError("stop")
        built.append(1)
        return build_heads(*args, **kwargs)

    module = importlib.import_module("tensornet_llm.compress.compactify")  # not the function
    monkeypatch.setattr(module, "build_heads", second_fails)
    with pytest.raises(RuntimeError, match="stop"):
        compactify(model, ratio=0.75, targets=["self_attn"], calibration=calibration(),
                   progress=False)
    assert built  # the first block's attention was slimmed, then put back
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.num_key_value_groups == 2 and attn.q_proj.out_features == 4 * attn.head_dim
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
