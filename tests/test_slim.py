"""Slim MLPs (``tensornet_llm.compress.slim``): the greedy neuron choice lowers exactly the damage
it reports, the refit is the least-squares optimum and exact where nothing is removed, the
budget's MLP ladder combines the projections' own rungs correctly, and ``compactify`` builds
what the budget priced; gated MLPs and the plain MLPs of other families (GPT-2's ``Conv1D``,
OPT's projections in the decoder layer itself), which survive saving and loading bit for bit."""

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from models import build, calibration, inputs
from tensornet_llm import CompactifyConfig, compactify, quantize
from tensornet_llm.compress.budget import Option, lower_hull, slim_ladder, unit_ladder
from tensornet_llm.compress.slim import (
    REFIT_RIDGE, SlimChoice, build_slim, damage_scale, greedy_neurons, mlp_units, refit_down,
    slim_layers,
)
from tensornet_llm.layers.base import linear_weight

#: Plain MLPs, ``down(act(up(x)))``: the module whose forward runs them, and its projections.
PLAIN = {"gpt2": ("transformer.h.0.mlp", "c_fc", "c_proj"),  # Conv1D, weights (in, out)
         "gpt_neox": ("gpt_neox.layers.0.mlp", "dense_h_to_4h", "dense_4h_to_h"),
         "falcon": ("transformer.h.0.mlp", "dense_h_to_4h", "dense_4h_to_h"),  # FalconLinear
         "opt": ("model.decoder.layers.0", "fc1", "fc2"),  # in the decoder layer itself
         "bloom": ("transformer.h.0.mlp", "dense_h_to_4h", "dense_4h_to_h")}  # adds a residual


def schur_trace(gram, weighted, chosen):
    """``tr(B Sc B^T)`` for the chosen neurons, computed directly."""
    if not chosen:
        return float((weighted @ gram * weighted).sum())
    s = torch.tensor(chosen)
    sc = gram - gram[:, s] @ torch.linalg.solve(gram[s][:, s], gram[s])
    return float((weighted @ sc * weighted).sum())


@st.composite
def problems(draw):
    m, out = draw(st.integers(2, 10)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3 * m, m, generator=g, dtype=torch.float64)
    return h.T @ h / h.shape[0], torch.randn(out, m, generator=g, dtype=torch.float64), seed


@settings(max_examples=40, deadline=None)
@given(problems())
def test_each_greedy_pick_lowers_the_damage_most_and_reports_it(problem):
    gram, weighted, _ = problem
    m = gram.shape[0]
    order, left = greedy_neurons(gram, weighted, m)
    assert sorted(order.tolist()) == list(range(m))
    for j in range(m + 1):
        assert left[j] == pytest.approx(schur_trace(gram, weighted, order[:j].tolist()),
                                        rel=1e-6, abs=1e-9)
    for j in range(m):  # no other neuron would have lowered it more
        best = min(schur_trace(gram, weighted, order[:j].tolist() + [p])
                   for p in range(m) if p not in order[:j].tolist())
        assert float(left[j + 1]) == pytest.approx(best, rel=1e-6, abs=1e-9)
    assert float(left[m]) == pytest.approx(0.0, abs=1e-9)


def test_neurons_the_chosen_ones_determine_cost_nothing():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=g, dtype=torch.float64)
    h = torch.cat([base, base @ torch.randn(3, 2, generator=g, dtype=torch.float64)], 1)
    gram = h.T @ h / len(h)  # rank 3 of 5
    order, left = greedy_neurons(gram, torch.randn(4, 5, generator=g, dtype=torch.float64), 5)
    assert sorted(order.tolist()) == list(range(5))
    assert float(left[3]) == pytest.approx(0.0, abs=1e-8) and torch.all(left[3:] == left[3])


@settings(max_examples=30, deadline=None)
@given(problems(), st.data())
def test_refit_is_the_least_squares_optimum(problem, data):
    gram, weight, seed = problem
    m = gram.shape[0]
    keep = torch.tensor(sorted(data.draw(st.sets(st.integers(0, m - 1), min_size=1))))
    refit = refit_down(weight, gram, keep, ridge=0.0)
    # the normal equations: the error is orthogonal to every kept neuron
    error = weight.clone()
    error[:, keep] -= refit
    torch.testing.assert_close(error @ gram[:, keep], torch.zeros(len(weight), len(keep),
                                                                   dtype=torch.float64),
                               atol=1e-8, rtol=0)
    if len(keep) == m:  # nothing removed: the weight itself, whatever the ridge
        torch.testing.assert_close(refit_down(weight, gram, keep), weight, atol=0, rtol=0)
    else:  # a ridge leaves more error on the calibration data, never less
        ridged = weight.clone()
        ridged[:, keep] -= refit_down(weight, gram, keep)
        assert float((ridged @ gram * ridged).sum()) >= float((error @ gram * error).sum()) - 1e-9


def llama_mlp(hidden: int, width: int, seed: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=width,
                                num_attention_heads=1, num_key_value_heads=1)).double()


def intermediate(mlp, x):
    with torch.no_grad():
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6).map(lambda n: 2 * n), st.integers(2, 24), st.integers(0, 2**16))
def test_a_slim_mlp_of_full_width_is_the_mlp(hidden, width, seed):
    mlp = llama_mlp(hidden, width, seed)
    x = torch.randn(4 * width, hidden, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    h = intermediate(mlp, x)
    gram = h.T @ h / len(h)
    keep = torch.arange(width)
    layers = slim_layers(mlp.gate_proj, mlp.up_proj, mlp.down_proj, keep,
                         refit_down(mlp.down_proj.weight, gram, keep))
    expected = mlp(x)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = layers
    assert all(type(layer) is nn.Linear for layer in layers)
    torch.testing.assert_close(mlp(x), expected, atol=1e-10, rtol=1e-10)


def test_dropped_neurons_the_kept_ones_predict_are_restored_exactly():
    """Where the calibration activations of the dropped neurons are combinations of the kept
    ones', the slim MLP computes the dense one on those inputs."""
    mlp = llama_mlp(6, 8, 0)
    x = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = intermediate(mlp, x)
    mix = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = torch.cat([h[:, :5], h[:, :5] @ mix], 1)  # neurons 5..7 depend on 0..4
    gram = h.T @ h / len(h)
    weighted, _ = damage_scale(mlp.down_proj.weight, None, gram)
    order, left = greedy_neurons(gram, weighted, 5)
    assert float(left[5]) == pytest.approx(0.0, abs=1e-9)
    keep = order.sort().values
    refit = refit_down(mlp.down_proj.weight, gram, keep, ridge=0.0)
    torch.testing.assert_close(h[:, keep] @ refit.T, h @ mlp.down_proj.weight.T, atol=1e-8,
                               rtol=1e-8)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 50), st.floats(0, 10)), min_size=1,
                         max_size=4), min_size=1, max_size=3))
def test_a_unit_ladder_is_the_hull_of_every_combination(rungs):
    members = {f"m{i}": [Option(None, 100, 0.0)] + [Option(j + 1, p, d) for j, (p, d) in
                                                      enumerate(r)]
               for i, r in enumerate(rungs)}
    combined = lower_hull(unit_ladder(members))
    every = [Option(None, sum(o.params for o in c), sum(o.damage for o in c))
             for c in itertools.product(*members.values())]
    points = sorted((o.params, round(o.damage, 9)) for o in lower_hull(every))
    assert sorted((o.params, round(o.damage, 9)) for o in combined) == points
    for option in combined:  # each rung says which rung of each member it is
        assert option.params == sum(part.params for _, part in option.parts)


def mlp_gram(model, name):
    """``down_proj``'s input second moment of MLP ``name`` on the test calibration."""
    mlp = model.get_submodule(name)
    seen = []
    handle = mlp.down_proj.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for ids in calibration():
            model(input_ids=ids)
    handle.remove()
    h = torch.cat(seen)
    return h.T @ h / len(h)


@pytest.mark.parametrize("ridge", [0.0, REFIT_RIDGE])
def test_the_ladder_prices_what_build_slim_builds(ridge):
    """A slim rung's damage is the minimum of the objective the ridge refit minimises on the
    calibration data: the built MLP's error (``act_error``) plus the ridge penalty of down's new
    coefficients on the kept neurons; without a ridge, the error alone."""
    model = build("llama")
    unit = mlp_units(model, {n for n, _ in model.named_modules()})[0]
    mlp = model.get_submodule(unit.name)
    gram = mlp_gram(model, unit.name)
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    options, order = slim_ladder(*layers, gram, None, ridge=ridge)
    assert len(options) > 3
    w = mlp.down_proj.weight.detach().double()
    scale = 1.0 / float((w @ gram * w).sum())  # relative, as without loss gradients
    for option in options:
        keep = order[:option.width].sort().values
        refit = refit_down(w, gram, keep, ridge=ridge)
        (_, _, down), rows = build_slim(SlimChoice(unit, order[:option.width]), layers, gram)
        if ridge == REFIT_RIDGE:  # what build_slim builds
            torch.testing.assert_close(down.weight.double(), refit, rtol=1e-6, atol=1e-7)
        error = w.clone()
        error[:, keep] -= refit
        error_sq = float((error @ gram * error).sum())
        moments = gram.diagonal()
        penalty = float(((refit - w[:, keep]).pow(2) * moments[keep]).sum())
        assert option.damage == pytest.approx(scale * (error_sq + ridge * penalty), rel=1e-6)
        if ridge == REFIT_RIDGE:
            assert rows[-1].act_error ** 2 == pytest.approx(scale * error_sq, rel=1e-6)
        assert option.params == sum(r.params_after for r in rows)


def test_which_mlps_are_slimmed():
    """Gated and plain MLPs by their projections' shapes (LLaMA's names settle which is down
    where the shapes cannot), only where the forward reads each neuron by itself between the
    projections; nothing else."""
    class Mixed(nn.Module):  # gate, up, down and act_fn, but neurons paired across the width
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(4, 6), nn.Linear(4, 6)
            self.down_proj, self.act_fn = nn.Linear(6, 4), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x).flip(-1))

    class Normed(nn.Module):  # up and down, but a norm over the neurons between them
        def __init__(self):
            super().__init__()
            self.up, self.norm, self.down = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 4)

        def forward(self, x):
            return self.down(self.norm(self.up(x)))

    class Summed(Mixed):  # summed, not multiplied, but each neuron by itself
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    model = nn.Sequential(Mixed(), Normed())
    names = {n for n, _ in model.named_modules()}
    assert mlp_units(model, names) == []
    model[0] = Summed()
    model[1].norm = nn.GELU()  # now each neuron by itself
    assert [u.members for u in mlp_units(model, names)] == [
        ("0.gate_proj", "0.up_proj", "0.down_proj"), ("1.up", "1.down")]
    llama = build("llama")
    found = mlp_units(llama, {n for n, _ in llama.named_modules()})
    assert [u.name for u in found] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(u.gate is not None for u in found)
    assert mlp_units(llama, {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}) == []
    for arch, (owner, up, down) in PLAIN.items():
        model = build(arch)
        units = mlp_units(model, {n for n, _ in model.named_modules()})
        assert len(units) == 2 and units[0].members == (f"{owner}.{up}", f"{owner}.{down}")
    import transformers as tf  # T5 v1.1's gated MLP: wi_0, wi_1, wo (no LLaMA names)

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=96,
        decoder_start_token_id=0, feed_forward_proj="gated-gelu")).eval()
    units = mlp_units(t5, {n for n, _ in t5.named_modules()})
    owner = "encoder.block.0.layer.1.DenseReluDense"
    assert len(units) == 4 and (units[0].gate, units[0].up, units[0].down) == (
        f"{owner}.wi_0", f"{owner}.wi_1", f"{owner}.wo")


@pytest.mark.parametrize("arch", list(PLAIN))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), kept=st.floats(0.1, 1.0))
def test_a_plain_mlp_keeps_exactly_what_its_kept_neurons_compute(arch, seed, kept):
    """A plain MLP slimmed to any subset of its neurons, down's columns as they are, computes
    what the MLP computes with the other neurons' columns of down set to zero (all of them
    kept: the MLP itself); every layer is a plain ``nn.Linear``."""
    model = build(arch, seed=seed % 7).double()
    owner, up_name, down_name = PLAIN[arch]
    mlp = model.get_submodule(owner)
    up, down = getattr(mlp, up_name), getattr(mlp, down_name)
    w_down = linear_weight(down)[0].detach()
    m = w_down.shape[1]
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(m, generator=g)[: max(1, round(kept * m))].sort().values
    zeroed = torch.zeros_like(w_down)
    zeroed[:, keep] = w_down[:, keep]
    stored = zeroed if linear_weight(down)[0] is down.weight else zeroed.T
    x = torch.randn(1, 5, w_down.shape[0], dtype=torch.float64, generator=g)
    args = (x, torch.randn_like(x)) if arch == "bloom" else (x,)  # Bloom's MLP adds the residual

    def first(out):  # a decoder layer may return a tuple
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        expected = first(torch.func.functional_call(mlp, {f"{down_name}.weight": stored}, args))
        layers = slim_layers(None, up, down, keep, w_down[:, keep])
        assert all(type(layer) is nn.Linear for layer in layers)
        setattr(mlp, up_name, layers[0])
        setattr(mlp, down_name, layers[1])
        torch.testing.assert_close(first(mlp(*args)), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_plain_slim_mlps_load_bit_for_bit_in_float_and_int8(arch, tmp_path):
    """Saved by ``save_pretrained``, loaded by plain ``from_pretrained``: the same logits, float
    and int8 (GPT-2's slim projections are ``nn.Linear`` where the architecture has ``Conv1D``)."""
    from transformers import AutoModelForCausalLM

    model = build(arch, layers=3)
    report = compactify(model, ratio=0.5, calibration=calibration(), progress=False)
    owner, up, down = PLAIN[arch]
    assert {r.name for r in report.layers if r.method == "slim"} == {
        f"{owner.replace('.0', f'.{i}', 1)}.{p}" for i in range(3) for p in (up, down)}
    batch = inputs(arch)
    for bits in (None, 8):
        if bits:
            pytest.importorskip("torchao")
            quantize(model, bits)
        with torch.no_grad():
            expected = model(**batch).logits
        model.save_pretrained(tmp_path / f"m{bits}")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"m{bits}")
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", *PLAIN])
def test_the_budget_slims_mlps_within_the_ratio(arch):
    model = build(arch, layers=3)
    targets = ["fc1", "fc2"] if arch == "opt" else ["mlp"]  # OPT's sit in the decoder layer
    report = compactify(model, ratio=0.5, targets=targets, calibration=calibration(),
                        progress=False)
    slim = [r for r in report.layers if r.method == "slim"]
    assert slim and report.kept_fraction <= 0.5
    for row in slim:
        layer = model.get_submodule(row.name)
        assert type(layer) is nn.Linear and row.chi in layer.weight.shape
        assert sum(p.numel() for p in layer.parameters()) == row.params_after
    assert model(input_ids=calibration()[0]).logits.isfinite().all()


def test_slim_mlp_false_offers_no_slim_layout():
    model = build("llama", layers=3)
    report = compactify(model, ratio=0.5, targets=["mlp"], calibration=calibration(),
                        config=CompactifyConfig(slim_mlp=False), progress=False)
    assert report.layers and all(r.method != "slim" for r in report.layers)
