"""Slim attention (``tensornet_llm.compress.heads``): fewer query heads per key/value group, or
fewer key/value heads with their query heads. The block downdates price exactly the damage they
report; every rung keeps an equal number of query heads in each group it keeps, and the first
group dropped is the cheapest; keeping every head changes nothing; the attention runs its own
forward with the smaller projections, and a smaller KV cache; ``compactify`` builds what the
budget chose, undoes it on error, and the result saves, loads (both loaders) and generates with
every cache as before."""

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
    GroupedAttention, HeadChoice, _Drops, build_heads, drop_rungs, grouped_attentions, head_rungs,
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
    groups, per_group, d = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    n = groups * per_group * d
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    a = torch.randn(3 * n + 2, n, generator=g, dtype=torch.float64)
    gram = a.T @ a / a.shape[0]
    weighted = torch.randn(draw(st.integers(1, 5)), n, generator=g, dtype=torch.float64)
    kv = ("attn.k_proj", "attn.v_proj") if draw(st.booleans()) else (None, None)
    unit = GroupedAttention("attn", "attn.q_proj", "attn.o_proj", groups * per_group, groups, d,
                            *kv)
    return unit, gram, weighted, draw(st.sampled_from([0.0, REFIT_RIDGE]))


@settings(max_examples=30, deadline=None)
@given(attention_problems(), st.randoms(use_true_random=False))
def test_the_block_downdates_track_the_damage_of_what_is_kept(problem, rng):
    unit, gram, weighted, ridge = problem
    drops = _Drops(unit, gram, weighted, ridge)  # every head kept
    kept = set(range(unit.heads))
    while len(kept) > 1:
        block = rng.sample(sorted(kept), rng.randint(1, len(kept) - 1))
        ridged = gram + ridge * torch.diag(gram.diagonal())
        before = ridged_damage(unit, ridged, weighted, kept, 0.0)
        rise = drops.rise(block)
        drops.drop(block)
        kept -= set(block)
        assert drops.heads == sorted(kept)
        assert before + rise == pytest.approx(ridged_damage(unit, ridged, weighted, kept, 0.0),
                                              rel=1e-6, abs=1e-9)
        assert drops.damage == pytest.approx(ridged_damage(unit, gram, weighted, kept, ridge),
                                             rel=1e-6, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(attention_problems())
def test_every_rung_keeps_whole_groups_and_reports_its_damage(problem):
    unit, gram, weighted, ridge = problem
    rungs = drop_rungs(unit, gram, weighted, ridge)
    shapes = []
    for keep, damage in rungs:
        groups = torch.unique(keep // unit.per_group)
        counts = torch.bincount(keep // unit.per_group, minlength=unit.groups)[groups]
        assert (counts == counts[0]).all() and len(keep) < unit.heads
        shapes.append((len(groups), int(counts[0])))
        # the refit's error plus its coefficients' penalty, less the ridge's share of the
        # dropped features' own moments (which the search ranks by: the ridged Gram's error)
        assert damage == pytest.approx(ridged_damage(unit, gram, weighted, set(keep.tolist()),
                                                     ridge), rel=1e-6, abs=1e-9)
    groups_kept = range(1, unit.groups + 1) if unit.drops_groups else [unit.groups]
    assert sorted(shapes) == sorted((j, w) for j in groups_kept for w in range(1, unit.per_group + 1)
                                    if (j, w) != (unit.groups, unit.per_group))
    fewer = [keep for keep, _ in rungs if len(torch.unique(keep // unit.per_group)) < unit.groups]
    if fewer:  # fewer groups keep a subset of the groups more keep; the first is the cheapest
        ridged = gram + ridge * torch.diag(gram.diagonal())
        first = max(fewer, key=len)
        costs = [ridged_damage(unit, ridged, weighted, set(range(unit.heads)) - set(
            range(g * unit.per_group, (g + 1) * unit.per_group)), 0.0) for g in range(unit.groups)]
        assert ridged_damage(unit, ridged, weighted, set(first.tolist()), 0.0) <= \
            min(costs) * (1 + 1e-7) + 1e-9
        nested = [set((k // unit.per_group).tolist()) for k in fewer]
        assert all(a <= b or b <= a for a in nested for b in nested)


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
    assert unit.drops_groups and unit.members == tuple(
        f"{unit.name}.{p}_proj" for p in "qkvo")
    gram = torch.eye(unit.heads * unit.head_dim, dtype=torch.float64)
    every = HeadChoice(unit, torch.arange(unit.heads))
    assert every.members == (unit.q, unit.o)
    (q, o), _ = build_heads(every, attn, gram)
    assert torch.equal(q.weight, attn.q_proj.weight) and torch.equal(o.weight, attn.o_proj.weight)
    original = {p: getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    # Dropping heads with an identity Gram (no refit from other heads) is the full attention
    # with those heads' o_proj columns zeroed: heads 0 and 2 (one of each group), or group 0
    # (heads 0 and 1, with its key/value head).
    for keep, width in ((torch.tensor([1, 3]), 1), (torch.tensor([2, 3]), 2)):
        choice = HeadChoice(unit, keep)
        layers, _ = build_heads(choice, attn, gram)
        zeroed = original["o_proj"].weight.detach().clone()
        for head in set(range(unit.heads)) - set(keep.tolist()):
            zeroed[:, head * unit.head_dim:(head + 1) * unit.head_dim] = 0
        attn.o_proj = nn.Linear(zeroed.shape[1], zeroed.shape[0], bias=False)
        with torch.no_grad():
            attn.o_proj.weight.copy_(zeroed)
            if original["o_proj"].bias is not None:
                attn.o_proj.bias = original["o_proj"].bias
        want = logits(model, batch)
        for name, layer in zip(choice.members, layers):
            setattr(attn, name.rpartition(".")[2], layer)
        attn.num_key_value_groups = width
        torch.testing.assert_close(logits(model, batch), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want, expected)
        assert attn.k_proj.out_features == (unit.groups if width == 1 else 1) * unit.head_dim
        for name, layer in original.items():
            setattr(attn, name, layer)
        attn.num_key_value_groups = unit.per_group


def test_which_attention_is_offered():
    mha = multi_head("llama")  # every query head its own key/value head
    names = {n for n, _ in mha.named_modules()}
    units = grouped_attentions(mha, names)
    assert len(units) == 2 and all(u.drops_groups and u.per_group == 1 for u in units)
    # without its key/value projections, multi-head attention has nothing to drop
    assert grouped_attentions(mha, {n for n in names if not n.endswith(("k_proj", "v_proj"))}) == []
    skewed = build("llama")
    for layer in skewed.model.layers:  # a head count that does not match the projections
        layer.self_attn.num_key_value_groups = 1
    assert grouped_attentions(skewed, {n for n, _ in skewed.named_modules()}) == []
    neox = build("gpt_neox")  # one fused query-key-value projection
    assert grouped_attentions(neox, {n for n, _ in neox.named_modules()}) == []
    llama = build("llama")
    assert grouped_attentions(llama, {"model.layers.0.self_attn.q_proj"}) == []  # o_proj not a target
    grouped = grouped_attentions(llama, {"model.layers.0.self_attn.q_proj",
                                         "model.layers.0.self_attn.o_proj"})
    assert [(u.name, u.drops_groups) for u in grouped] == [("model.layers.0.self_attn", False)]

    class Rigid(type(llama.model.layers[0].self_attn)):  # runs only with the config's head count
        def forward(self, hidden_states, *args, **kwargs):
            assert self.q_proj.out_features == self.config.num_attention_heads * self.head_dim
            return super().forward(hidden_states, *args, **kwargs)

    attn = llama.model.layers[0].self_attn
    attn.__class__ = Rigid
    parts = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    names = {n for n, _ in llama.named_modules()}
    assert [u.name for u in grouped_attentions(llama, names)] == ["model.layers.1.self_attn"]
    assert (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
            attn.num_key_value_groups) == (*parts, 2)  # as it was


def test_the_rungs_price_what_build_heads_builds():
    model = build("llama")
    unit = grouped_attentions(model, {n for n, _ in model.named_modules()})[0]
    attn = model.get_submodule(unit.name)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, unit.heads * unit.head_dim, generator=g, dtype=torch.float64)
    gram = a.T @ a / 200
    layers = {n: model.get_submodule(n) for n in unit.members}
    rungs = head_rungs(unit, layers, gram, None)
    w = attn.o_proj.weight.detach().double()
    scale = 1.0 / float((w @ gram * w).sum())
    # 4 query heads in 2 groups: one head per group, one group, one head of one group
    assert sorted(len(keep) for _, _, keep in rungs) == [1, 2, 2]
    for params, damage, keep in rungs:
        choice = HeadChoice(unit, keep)
        new, rows = build_heads(choice, attn, gram)
        kept = {n: m for n, m in zip(choice.members, new)}
        assert params == sum(p.numel() for n in unit.members
                             for p in kept.get(n, layers[n]).parameters())
        assert damage == pytest.approx(scale * ridged_damage(unit, gram, w, set(keep.tolist()),
                                                             REFIT_RIDGE), rel=1e-6)
        assert rows[-1].act_error < rows[-1].act_error_start  # the refit helps


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


def multi_head(arch):
    """The tiny ``arch`` model with as many key/value heads as query heads (4)."""
    config = build(arch).config
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    return type(build(arch))(config).eval()


@pytest.mark.parametrize("arch, grouped", [("llama", True), ("qwen2", True), ("llama", False)])
def test_compactify_drops_a_silent_key_value_head_and_the_cache_shrinks(arch, grouped, tmp_path):
    model = silence_heads(build(arch) if grouped else multi_head(arch), heads=(2, 3))
    batch = inputs(arch)
    expected = logits(model, batch)
    report = compactify(model, ratio=0.5, targets=["self_attn"], calibration=calibration(),
                        progress=False)  # half of every attention: its silent heads
    d = model.model.layers[0].self_attn.head_dim
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        groups = attn.k_proj.out_features // d
        assert type(attn.k_proj) is type(attn.v_proj) is nn.Linear
        assert groups < (2 if grouped else 4)  # a key/value head went, with its query heads
        assert attn.q_proj.out_features == groups * attn.num_key_value_groups * d
        assert {f"model.layers.{i}.self_attn.{p}_proj" for p in "kv"} <= {
            r.name for r in report.layers if r.method == "slim"}
    # only silent heads went: the same logits, up to the refit's float64 round trip
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    prompt = batch["input_ids"][:1]
    dynamic = model.generate(prompt, max_new_tokens=6, do_sample=False)
    static = model.generate(prompt, max_new_tokens=6, do_sample=False,
                            cache_implementation="static")
    assert torch.equal(dynamic, static)
    save_compactified(model, tmp_path / "m")
    written = json.loads((tmp_path / "m" / "tensornet.json").read_text())
    assert "model.layers.0.self_attn.k_proj" in written["resized"]
    now = logits(model, batch)
    for loaded in (load_compactified(tmp_path / "m"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "m")):
        for layer, mine in zip(loaded.model.layers, model.model.layers):
            assert layer.self_attn.k_proj.weight.shape == mine.self_attn.k_proj.weight.shape
            assert layer.self_attn.num_key_value_groups == mine.self_attn.num_key_value_groups
        torch.testing.assert_close(logits(loaded, batch), now, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_the_caches_follow_key_value_heads_that_differ_between_blocks(arch):
    """Only block 0 loses a key/value head, so the cache holds layers of two widths; Gemma 2
    with a window of 4 tokens, which the prompt and the new tokens cross, so its sliding
    layers evict while they generate."""
    model = build(arch)
    if arch == "gemma2":
        config = model.config
        config.sliding_window = 4
        torch.manual_seed(0)
        model = type(model)(config).eval()
    silence_heads(model, heads=(2, 3), blocks=[0])  # block 0's second key/value group
    prompt = inputs(arch)["input_ids"][:1]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    compactify(model, ratio=0.9, targets=["self_attn"], calibration=calibration(),
               progress=False)
    widths = [layer.self_attn.k_proj.out_features for layer in model.model.layers]
    d = model.model.layers[0].self_attn.head_dim
    assert widths[0] < widths[1] == model.config.num_key_value_heads * d
    for cache in (None, "static"):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation=cache)
        assert torch.equal(out, expected), cache


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
