"""Healing: the loss falls, only the chosen parameters move, distillation terms, resume."""

import copy
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from models import build
from tensornet_llm import compactify
from tensornet_llm.layers.base import TensorNetworkLinear
from tensornet_llm.errors import HealingCheckWarning
from tensornet_llm.train.heal import HealConfig, _loss_terms, auto_precision, heal, trainable_parameters
from tensornet_llm.train.qat import rounded_weights
from tensornet_llm.train.quantize import QuantizeConfig, quantize
from tensornet_llm.train import token_loss as token_loss_module
from test_compactify import assert_unchanged, snapshot


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A repetitive stream the model can learn quickly: loss must fall within a few steps.
    base = torch.randint(2, 96, (16,), generator=g)
    return [torch.stack([base.roll(int(s)) for s in torch.randint(0, 16, (4,), generator=g)])
            for _ in range(n)]


def mean_loss(model, data):
    with torch.no_grad():
        return sum(float(model(input_ids=b, labels=b).loss) for b in data) / len(data)


@pytest.fixture
def compressed():
    model = build("llama")
    teacher = copy.deepcopy(model)
    compactify(model, chi=4, progress=False)
    return model, teacher


def test_healing_lowers_the_loss(compressed):
    model, _ = compressed
    data = batches()
    before = mean_loss(model, data)
    # train="all": a random tiny model learns a random stream mostly in its embeddings
    result = heal(model, data, steps=15, lr=3e-3, warmup_steps=0, train="all", progress=False)
    assert result.steps == 15 and len(result.ce) == 15
    assert result.tokens == 15 * 4 * 15
    assert mean_loss(model, data) < before - 0.3
    assert not model.training  # mode restored
    assert result.mixed_precision == auto_precision()


def test_bf16_mixed_precision_heals_and_keeps_float32_weights(compressed):
    model, teacher = compressed
    data = batches()
    before = mean_loss(model, data)
    result = heal(model, data, steps=15, lr=3e-3, warmup_steps=0, mixed_precision="bf16",
                  teacher=teacher, train="all", progress=False)
    assert result.mixed_precision == "bf16"
    assert mean_loss(model, data) < before - 0.3
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cores_only_changes_only_cores(compressed):
    model, _ = compressed
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    heal(model, batches(), steps=3, lr=1e-2, train="cores", progress=False)
    core_ids = {id(c) for m in model.modules() if isinstance(m, TensorNetworkLinear) for c in m.cores}
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (id(p) in core_ids), name
        assert p.requires_grad  # flags restored


@pytest.mark.parametrize("tied", [True, False])
def test_blocks_leaves_the_embeddings_and_lm_head_alone(tied):
    """train="blocks": everything moves but the token embeddings and the LM head (one tied
    table, or two), whose flags are restored after."""
    model = build("llama")
    model.lm_head.weight = (model.get_input_embeddings().weight if tied else
                            torch.nn.Parameter(model.lm_head.weight.detach().clone()))
    compactify(model, chi=4, progress=False)
    tables = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert len(tables) == (1 if tied else 2)
    assert {id(p) for p in trainable_parameters(model, "blocks")} == {
        id(p) for p in model.parameters()} - tables
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = heal(model, batches(), steps=3, lr=1e-2, progress=False)  # the default
    assert result.train == "blocks"
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == (id(p) not in tables), name
        assert p.requires_grad  # flags restored


def test_default_trains_everything_of_a_model_without_embedding_getters():
    class Plain(torch.nn.Module):  # not a transformers model: no get_input_embeddings()
        def __init__(self):
            super().__init__()
            self.inner = build("llama")

        def forward(self, **inputs):
            return self.inner(**inputs)

    model = Plain()
    before = model.inner.lm_head.weight.detach().clone()
    assert heal(model, batches(), steps=2, lr=1e-2, progress=False).train == "all"
    assert not torch.equal(model.inner.lm_head.weight, before)
    with pytest.raises(ValueError, match="train='blocks' needs a model with get_input_embeddings"):
        heal(model, batches(), steps=1, train="blocks", progress=False)


def test_distillation_terms_and_frozen_teacher(compressed):
    model, teacher = compressed
    snap = snapshot(teacher)
    result = heal(model, batches(), steps=3, lr=1e-3, teacher=teacher, hidden_weight=0.5,
                  progress=False)
    assert all(d > 0 for d in result.distill) and all(h > 0 for h in result.hidden)
    for loss, ce, kl, hid in zip(result.losses, result.ce, result.distill, result.hidden):
        assert loss == pytest.approx(ce + kl + 0.5 * hid, rel=1e-5)
    assert_unchanged(teacher, snap)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_terms_and_gradient_match_the_textbook_formulas(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 7, 13, generator=g, requires_grad=True)
    teacher = torch.randn(2, 7, 13, generator=g)
    targets = torch.randint(0, 13, (2, 6), generator=g)
    targets[0, :3] = -100  # unscored positions count in neither term
    cfg = HealConfig(ce_weight=0.7, temperature=temperature)
    loss, terms = _loss_terms(SimpleNamespace(logits=student), SimpleNamespace(logits=teacher),
                              targets, cfg, 0.4)

    s, t, keep = student[:, :-1], teacher[:, :-1], targets != -100
    ce = F.cross_entropy(s.reshape(-1, 13), targets.reshape(-1), ignore_index=-100)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                  reduction="none").sum(-1)[keep].mean() * temperature ** 2
    assert terms["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert terms["distill"] == pytest.approx(float(kl), rel=1e-5)
    ours, = torch.autograd.grad(loss, student)
    textbook, = torch.autograd.grad(0.7 * ce + 0.4 * kl, student)
    torch.testing.assert_close(ours, textbook)
    assert ours[0, :3].abs().max() == 0  # inputs of unscored positions get no gradient


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6)), vocab=st.integers(2, 40),
       temperature=st.sampled_from([1.0, 0.5, 3.0]), weights=st.sampled_from([0.0, 0.3, 1.0]),
       distill=st.sampled_from([0.0, 0.6]), teacher=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), chunk=st.integers(1, 200),
       seed=st.integers(0, 2**16))
def test_chunked_token_loss_equals_the_textbook_loss_and_gradient(
        shape, vocab, temperature, weights, distill, teacher, dtype, chunk, seed):
    """token_loss on chunks of any size: the weighted CE + T^2 KL and its gradient, as the
    textbook formulas in float32 give them, without touching its inputs."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype).requires_grad_()
    t = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype) if teacher else None
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < 0.3] = -100
    w = torch.rand(shape, generator=g) * (targets >= 0)
    before = (logits.detach().clone(), None if t is None else t.clone(), targets.clone(), w.clone())
    old = token_loss_module.CHUNK_ELEMENTS
    token_loss_module.CHUNK_ELEMENTS = chunk
    try:
        loss, ce, kl = token_loss_module.token_loss(logits, targets, w, t, weights, distill,
                                                     temperature)
    finally:
        token_loss_module.CHUNK_ELEMENTS = old
    s = logits.float()
    ref_ce = (F.cross_entropy(s.reshape(-1, vocab), targets.reshape(-1).clamp_min(0),
                              reduction="none") * w.reshape(-1)).sum()
    ref_kl = torch.zeros(())
    if t is not None:
        ref_kl = (F.kl_div(F.log_softmax(s / temperature, -1),
                           F.log_softmax(t.float() / temperature, -1), reduction="none",
                           log_target=True).sum(-1) * w).sum() * temperature ** 2
    ref = weights * ref_ce + distill * ref_kl
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    if weights == 0 and (distill == 0 or t is None):
        return  # nothing depends on the logits
    ours, = torch.autograd.grad(3 * loss, logits)
    textbook, = torch.autograd.grad(3 * ref, logits)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), textbook.float(), rtol=1e-2 if dtype != torch.float32
                               else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-6)
    for a, b in zip(before, (logits, t, targets, w)):
        assert a is None or torch.equal(a, b)


def test_token_loss_names_mismatched_shapes():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="teacher logits"):
        token_loss_module.token_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3),
                                     torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="targets"):
        token_loss_module.token_loss(logits, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert auto_precision(cpu=True) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert auto_precision(cpu=True) == "no"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert auto_precision(cpu=True) == "no"  # an older torch without the probe


def test_distilling_a_model_from_itself_has_zero_kl():
    model = build("llama")
    teacher = copy.deepcopy(model)
    result = heal(model, batches(1), steps=1, lr=1e-9, teacher=teacher, ce_weight=0.0,
                  hidden_weight=1.0, warmup_steps=0, progress=False)
    assert result.distill[0] == pytest.approx(0, abs=1e-5)
    assert result.hidden[0] == pytest.approx(0, abs=1e-8)


def test_interrupted_run_resumes_to_the_same_weights(compressed, tmp_path):
    model, _ = compressed
    straight, resumed = copy.deepcopy(model), copy.deepcopy(model)
    # Full precision: bf16 rounding would magnify float32 summation-order noise past the
    # tolerance that shows the resumed run continues the same one.
    options = dict(steps=6, lr=2e-3, progress=False, gradient_accumulation_steps=2,
                   warmup_steps=2, checkpoint_every=3, mixed_precision="no")
    full = heal(straight, batches(), checkpoint_dir=tmp_path / "a", **options)

    calls = 0

    def crash(*_):  # the 7th forward (step 4) dies, after the checkpoint of step 3
        nonlocal calls
        calls += 1
        if calls == 7:
            raise KeyboardInterrupt

    handle = resumed.register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        heal(resumed, batches(), checkpoint_dir=tmp_path / "b", **options)
    handle.remove()
    again = heal(resumed, batches(), checkpoint_dir=tmp_path / "b", **options)
    assert again.resumed_from == 3
    assert again.losses == pytest.approx(full.losses, rel=1e-5)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("options, message", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(train="bias"), "train must be None, 'all', 'blocks' or 'cores'"),
    (dict(mixed_precision="fp8"), "mixed_precision must be"),
    (dict(distill_weight=1.0), "need a teacher"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be"),
    (dict(on_rise="halt"), "on_rise must be 'stop' or 'warn'"),
    (dict(check_every=0), "check_every must be an integer >= 1"),
    (dict(check_tolerance=-0.1), "check_tolerance must be a number >= 0"),
    (dict(quantize=3), "quantize must be None, 8, 4 or a QuantizeConfig"),
    (dict(quantize=QuantizeConfig(bits=4, group_size=3)), "quantize: group_size must be"),
])
def test_bad_options_fail_before_training(compressed, options, message):
    model, _ = compressed
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        heal(model, batches(), **{"steps": 2, "lr": 1e-3, "progress": False, **options})
    assert_unchanged(model, snap)


def test_cores_only_needs_a_compactified_model():
    with pytest.raises(ValueError, match="no tensor-network layers"):
        trainable_parameters(build("llama"), "cores")
    with pytest.raises(TypeError, match="unknown options"):
        heal(build("llama"), batches(), steps=1, learning_rate=1e-3)


def test_config_object_and_keywords_combine(compressed):
    model, _ = compressed
    result = heal(model, batches(), config=HealConfig(steps=2, lr=1e-3, progress=False), steps=1)
    assert result.steps == 1


def check_perplexity(model, data):
    return float(torch.exp(torch.tensor(mean_loss(model, data))))


def test_a_rising_check_stops_healing_and_restores_the_best_weights(compressed):
    model, _ = compressed
    check = batches(2, seed=5)  # other text than the healing batches
    # A learning rate far too high: the check perplexity rises within a few steps.
    result = heal(model, batches(), steps=40, lr=0.3, warmup_steps=0, max_grad_norm=None,
                  check=check, check_every=2, check_patience=2, mixed_precision="no",
                  progress=False)
    assert result.stopped_early and result.steps < 40
    steps = [s for s, _ in result.checks]
    assert steps == list(range(0, result.steps + 1, 2))
    best_step, best = min(result.checks, key=lambda c: c[1])
    assert result.best_step == best_step
    assert all(v > best * 1.02 for s, v in result.checks[-2:])  # two rises in a row
    assert check_perplexity(model, check) == pytest.approx(best, rel=1e-4)  # best restored


def test_a_rising_check_can_warn_instead(compressed):
    model, _ = compressed
    with pytest.warns(HealingCheckWarning, match="check perplexity rose"):
        result = heal(model, batches(), steps=12, lr=0.3, warmup_steps=0, max_grad_norm=None,
                      check=batches(2, seed=5), check_every=2, on_rise="warn", progress=False)
    assert result.steps == 12 and not result.stopped_early and len(result.checks) == 7


def test_a_falling_check_lets_healing_run_to_the_end(compressed):
    model, _ = compressed
    data = batches()
    result = heal(model, data, steps=6, lr=3e-3, warmup_steps=0, check=data, check_every=2,
                  progress=False)
    assert not result.stopped_early and result.steps == 6
    assert [s for s, _ in result.checks] == [0, 2, 4, 6]
    assert result.checks[-1][1] < result.checks[0][1] and result.best_step == 6
    assert result.to_dict()["checks"] == result.checks


def test_a_time_budget_ends_healing_with_a_final_check(compressed, monkeypatch):
    model, _ = compressed
    data = batches()
    calls = iter(range(0, 10**6, 10))  # a clock that advances 10 s at every reading
    monkeypatch.setattr(sys.modules["tensornet_llm.train.heal"], "_now", lambda: next(calls))
    result = heal(model, data, steps=200, lr=3e-3, warmup_steps=0, max_minutes=1.0,
                  check=data, check_every=50, progress=False)
    assert result.out_of_time and 1 <= result.steps < 200
    assert result.seconds >= 60
    assert [s for s, _ in result.checks] == [0, result.steps]  # a check where time ran out
    full = heal(copy.deepcopy(model), data, steps=3, warmup_steps=0, max_minutes=60, progress=False)
    assert full.steps == 3 and not full.out_of_time
    with pytest.raises(ValueError, match="max_minutes"):
        heal(model, data, steps=3, max_minutes=0, progress=False)


@pytest.mark.parametrize("bits", [4, 8])  # 8: torchao's rounding of the LM head and table
def test_quantization_aware_healing_trains_the_model_quantize_will_build(compressed, bits):
    if bits == 8:
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model, teacher = compressed
    data, check = batches(), batches(2, seed=5)
    rounded_before = copy.deepcopy(model)
    quantize(rounded_before, bits)
    # Full precision, so that the checks and the float32 perplexities below agree to 1e-5 on a
    # CPU with AMX too (where "auto" would check under bf16 autocast).
    result = heal(model, data, steps=10, lr=3e-3, warmup_steps=0, teacher=teacher,
                  quantize=bits, check=check, check_every=5, on_rise="warn",
                  mixed_precision="no", progress=False)
    assert [s for s, _ in result.checks] == [0, 5, 10]
    assert result.train == "all"  # the default here: the rounded embedding table trains too
    # The checks measured the quantized model: before healing, and of the final weights.
    assert result.checks[0][1] == pytest.approx(check_perplexity(rounded_before, check), rel=1e-5)
    rounded_after = copy.deepcopy(model)
    quantize(rounded_after, bits)
    assert result.checks[-1][1] == pytest.approx(check_perplexity(rounded_after, check), rel=1e-5)
    assert mean_loss(rounded_after, data) < mean_loss(rounded_before, data) - 0.3
    # The model keeps float weights (the updates accumulate below the rounding step).
    core = next(m for m in model.modules() if isinstance(m, TensorNetworkLinear)).cores[0]
    with rounded_weights(model, bits):
        on_grid = core.detach().clone()
    assert core.requires_grad and not torch.equal(core.detach(), on_grid)
