"""compactify on tiny random models of eleven architectures, save/load, and its guarantees."""

import contextlib
import importlib
import json

import pytest
import torch
from torch import nn

from models import ARCHS, GENERATIVE, build, inputs, with_labels
from tensornet_llm import (
    CompactifyConfig, MPOLinear, TTNSLinear, TensorNetworkLinear, compactify, load_compactified,
    save_compactified,
)
from tensornet_llm.compress.calibrate import (
    BlockReplay, as_batches, collect_covariances, collect_paired_covariances,
)

FULL = 10**6


def tn_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorNetworkLinear)}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: type(m) for n, m in model.named_modules()
    }


def assert_unchanged(model, snap):
    state, types = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("method", ["mpo", "ttns"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_full_chi_reproduces_logits(arch, method):
    model = build(arch)
    batch = inputs(arch)
    with torch.no_grad():
        ref = model(**batch).logits
    report = compactify(model, chi=FULL, method=method, progress=False)
    assert len(report.layers) >= 2 * 4  # attention and MLP of both blocks
    assert all(r.rel_error < 1e-5 for r in report.layers)
    # Embeddings and heads stay dense.
    assert not isinstance(model.get_output_embeddings(), TensorNetworkLinear)
    assert all("embed" not in n and "lm_head" not in n and "wte" not in n for n in tn_modules(model))
    with torch.no_grad():
        out = model(**batch).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("method", ["mpo", "ttns"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_small_chi_trains_and_generates(arch, method):
    model = build(arch)
    before = sum(p.numel() for p in model.parameters())
    report = compactify(model, chi=3, method=method, progress=False)
    assert report.model_params_after < before == report.model_params_before
    assert sum(p.numel() for p in model.parameters()) == report.model_params_after
    model.train()
    out = model(**with_labels(arch, inputs(arch)))
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    for name, module in tn_modules(model).items():
        for k, core in enumerate(module.cores):
            assert core.grad is not None and torch.isfinite(core.grad).all(), f"{name}.cores.{k}"
            assert core.grad.abs().sum() > 0, f"{name}.cores.{k} got no gradient"
    if arch in GENERATIVE:
        model.eval()
        batch = inputs(arch)
        batch.pop("decoder_input_ids", None)
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert generated.shape[0] == 2 and generated.shape[1] >= 4


@pytest.mark.parametrize("arch, method", [("llama", "mpo"), ("gpt2", "ttns"), ("t5", "mpo"),
                                          ("bert", "ttns"), ("falcon", "mpo")])
def test_save_load_gives_equal_logits(tmp_path, arch, method):
    model = build(arch)
    compactify(model, chi={"re:.*(mlp|DenseReluDense|intermediate|output\\.dense).*": 2, "_default": 5},
               method=method, progress=False)
    batch = inputs(arch)
    with torch.no_grad():
        ref = model(**batch).logits
    path = save_compactified(model, tmp_path / "saved")
    structure = json.loads((path / "tensornet.json").read_text())
    assert set(structure["modules"]) == set(tn_modules(model))
    assert not list(path.glob("*.bin")) and (path / "model.safetensors").is_file()
    loaded = load_compactified(path)
    assert type(loaded) is type(model)
    for name, module in tn_modules(loaded).items():
        assert module.bond_dims == tn_modules(model)[name].bond_dims
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=0)


def test_tied_embeddings_stay_tied_after_load(tmp_path):
    model = build("gpt2")
    compactify(model, chi=4, progress=False)
    loaded = load_compactified(save_compactified(model, tmp_path / "m"))
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_per_module_overrides_exclude_and_report():
    model = build("llama")
    report = compactify(
        model, chi={"re:.*mlp.*": 2, "_default": 5}, n_sites=2, exclude=["layers.0."],
        progress=False,
    )
    mods = tn_modules(model)
    assert mods and all(n.startswith("model.layers.1.") for n in mods)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    for row in report.layers:
        assert row.chi == (2 if ".mlp." in row.name else 5)
        assert max(row.bond_dims) <= row.chi
        assert mods[row.name].n_sites == 2
    assert ("model.layers.0.mlp.up_proj", "excluded") in report.skipped
    data = json.loads(report.to_json())
    assert data["totals"]["modules"] == len(mods) == len(data["layers"])
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and "kept" in text


def test_method_override_and_callable_targets():
    model = build("llama")
    compactify(
        model, chi=4, method={"re:.*self_attn.*": "ttns", "_default": "mpo"},
        targets=lambda module, name: name.endswith(("q_proj", "down_proj")), progress=False,
    )
    mods = tn_modules(model)
    assert sorted(mods) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert all(isinstance(m, TTNSLinear if "q_proj" in n else MPOLinear) for n, m in mods.items())


def test_pattern_targets_and_config_object():
    model = build("gpt2")
    cfg = CompactifyConfig(chi=3, method="ttns", targets=["c_fc", "re:.*attn\\.c_proj"])
    report = compactify(model, config=cfg, progress=False)
    assert sorted(r.name for r in report.layers) == sorted(
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("mlp.c_fc", "attn.c_proj")
    )
    assert all(r.method == "ttns" for r in report.layers)


def test_preserves_dtype_and_requires_grad():
    model = build("llama").to(torch.bfloat16)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    compactify(model, chi=4, progress=False)
    for name, module in tn_modules(model).items():
        assert all(c.dtype == torch.bfloat16 for c in module.cores)
        frozen = name.startswith("model.layers.0.")
        assert all(c.requires_grad != frozen for c in module.cores), name
    out = model(**inputs("llama")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chi": 0}, "chi"),
        ({"chi": 2.5}, "chi"),
        ({"chi": {"re:.*mlp.*": 4}}, "no pattern matching"),
        ({"chi": {"re:(": 4, "_default": 4}}, "invalid regex"),
        ({"chi": 4, "method": "svd"}, "method"),
        ({"chi": 4, "n_sites": 0}, "n_sites"),
        ({"chi": 4, "targets": ["no_such_module"]}, "matched no"),
        ({"chi": 4, "targets": lambda m, n: n.endswith("embed_tokens")}, "only nn.Linear"),
        ({"chi": 4, "tol": 3.0}, "tol"),
    ],
)
def test_bad_arguments_leave_model_untouched(kwargs, match):
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        compactify(model, progress=False, **kwargs)
    assert_unchanged(model, snap)


def test_failure_midway_leaves_model_untouched(monkeypatch):
    model = build("llama")
    snap = snapshot(model)
    calls = {"n": 0}
    original = MPOLinear.from_weight.__func__

    def flaky(cls, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("decomposition failed")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(MPOLinear, "from_weight", classmethod(flaky))
    with pytest.raises(RuntimeError, match="decomposition failed"):
        compactify(model, chi=4, progress=False)
    assert_unchanged(model, snap)


def test_moe_fused_experts_are_reported_skipped():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, bos_token_id=0,
        eos_token_id=1, pad_token_id=0,
    )).eval()
    report = compactify(model, chi=4, progress=False)
    assert {r.name.rsplit(".", 1)[-1] for r in report.layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    skipped = dict(report.skipped)
    assert any("experts" in n and "fused MoE" in why for n, why in skipped.items())
    assert torch.isfinite(model(**inputs("llama")).logits).all()


def test_shared_module_is_replaced_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            lin = nn.Linear(32, 32)
            self.blocks = nn.ModuleList([nn.Sequential(lin), nn.Sequential(lin)])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x))

    model = Shared()
    x = torch.randn(3, 32)
    ref = model(x)
    report = compactify(model, chi=FULL, progress=False)
    assert len(report.layers) == 1
    assert model.blocks[0][0] is model.blocks[1][0]
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


# ----- data-aware compactify ------------------------------------------------------------------

def calibration_batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 96, (2, 12), generator=g) for _ in range(n)]


def output_error(model, reference, batches):
    with torch.no_grad():
        return sum(float((model(input_ids=b).logits - reference(input_ids=b).logits).pow(2).sum())
                   for b in batches)


@pytest.mark.parametrize("method", ["mpo", "ttns"])
def test_calibrated_fit_reduces_activation_error(method):
    dense = build("llama")
    plain, calibrated = build("llama"), build("llama")
    batches = calibration_batches()
    compactify(plain, chi=3, method=method, progress=False)
    report = compactify(calibrated, chi=3, method=method, calibration=batches, fit_steps=30,
                        progress=False)
    assert report.model_params_after == sum(p.numel() for p in plain.parameters())
    for row in report.layers:
        assert row.act_error is not None and row.act_error <= row.act_error_start * (1 + 1e-6)
    assert sum(r.act_error for r in report.layers) < 0.95 * sum(r.act_error_start for r in report.layers)
    assert output_error(calibrated, dense, batches) < output_error(plain, dense, batches)
    assert "act err" in str(report)


@pytest.mark.parametrize("arch", ["gpt2", "t5", "bert"])
def test_calibration_works_across_architectures(arch):
    model = build(arch)
    report = compactify(model, chi=3, calibration=[{"input_ids": b} for b in calibration_batches(2)],
                        fit_steps=5, progress=False)
    assert all(r.act_error is not None for r in report.layers)
    batch = inputs(arch)
    assert torch.isfinite(model(**batch).logits).all()


class _NoReplay(BlockReplay):
    def __init__(self) -> None:
        super().__init__()
        self.disable()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_replaying_finished_blocks_changes_nothing(arch, monkeypatch):
    """Calibrated compactify replays the outputs of finished blocks instead of recomputing them:
    the same covariances, hence the same fitted layers and logits, as recomputing everything."""
    cm = importlib.import_module("tensornet_llm.compress.compactify")
    calib = [{"input_ids": b} for b in calibration_batches(2)]
    runs = []
    for replay in (BlockReplay, _NoReplay):
        monkeypatch.setattr(cm, "BlockReplay", replay)
        model = build(arch, layers=4)
        report = compactify(model, chi=3, calibration=calib, fit_steps=3, progress=False)
        with torch.no_grad():
            runs.append(([r.act_error for r in report.layers], model(**inputs(arch)).logits))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6, abs=1e-9)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-6)


def test_block_replay_replays_and_steps_aside_for_blocks_run_twice():
    torch.manual_seed(0)

    class Twice(nn.Module):  # one block applied twice per pass (shared weights, ALBERT-style)
        def __init__(self):
            super().__init__()
            self.block, self.head = nn.Linear(6, 6), nn.Linear(6, 4)

        def forward(self, input_ids):
            return self.head(self.block(self.block(input_ids.float())))

    batches = [{"input_ids": torch.randn(5, 6)} for _ in range(2)]
    plain = Twice()
    want = collect_covariances(plain, batches, {"head": plain.head}).covariance("head")
    replay = BlockReplay()
    replay.finish(plain.block)
    got = collect_covariances(plain, batches, {"head": plain.head}, replay=replay)
    torch.testing.assert_close(got.covariance("head"), want)
    assert not replay.enabled and "forward" not in plain.block.__dict__

    seq = nn.Sequential(nn.Sequential(nn.Linear(6, 6)), nn.Linear(6, 6))
    replay = BlockReplay()
    replay.finish(seq[0])
    calls = []
    seq[0][0].register_forward_hook(lambda *a: calls.append(1))  # inside the replayed block
    with replay.batch(0):
        first = seq(batches[0]["input_ids"])
    with replay.batch(0):
        again = seq(batches[0]["input_ids"] * 0)  # replayed: the block's input is not read
    assert len(calls) == 1 and torch.equal(first, again)
    assert "forward" not in seq[0].__dict__


@pytest.mark.parametrize("calibration, match", [([], "empty"), (["text"], "token-id")])
def test_bad_calibration_leaves_model_untouched(calibration, match):
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        compactify(model, chi=3, calibration=calibration, progress=False)
    assert_unchanged(model, snap)


def test_calibrated_failure_midway_undoes_every_swap(monkeypatch):
    cm = importlib.import_module("tensornet_llm.compress.surgery")  # where layers are fitted

    model = build("llama")
    snap = snapshot(model)
    calls = {"n": 0}
    original = cm.fit_weighted

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # inside the second block, after the first block was swapped
            raise RuntimeError("fit failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(cm, "fit_weighted", flaky)
    with pytest.raises(RuntimeError, match="fit failed"):
        compactify(model, chi=3, calibration=calibration_batches(1), fit_steps=2, progress=False)
    assert_unchanged(model, snap)


def test_paired_covariances_pair_reference_and_own_inputs():
    model = build("llama")
    batches = as_batches(calibration_batches(2))
    first, second = model.model.layers[0], model.model.layers[1]
    target = {"q": second.self_attn.q_proj}

    @contextlib.contextmanager
    def reference():  # a different upstream: block 0's MLP output halved
        with torch.no_grad():
            first.mlp.down_proj.weight.mul_(0.5)
        try:
            yield
        finally:
            with torch.no_grad():
                first.mlp.down_proj.weight.mul_(2.0)

    def inputs_of_q() -> torch.Tensor:
        seen = []
        handle = target["q"].register_forward_pre_hook(
            lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        with torch.no_grad():
            for b in batches:
                model(**b)
        handle.remove()
        return torch.cat(seen)

    own = inputs_of_q()
    with reference():
        ref = inputs_of_q()
    snap = snapshot(model)
    covs, cross = collect_paired_covariances(model, batches, target, second, reference)
    n = own.shape[0]
    torch.testing.assert_close(covs["q"], own.T @ own / n)
    torch.testing.assert_close(cross["q"], ref.T @ own / n)
    assert not torch.allclose(cross["q"], covs["q"])
    assert_unchanged(model, snap)


def test_matching_dense_outputs_undoes_upstream_error():
    dense = build("llama")
    batches = calibration_batches()
    errors = {}
    for match in (False, True):
        model = build("llama")
        compactify(model, config=CompactifyConfig(chi=3, match_dense=match, fit_steps=30),
                   calibration=batches, progress=False)
        errors[match] = output_error(model, dense, batches)
    assert errors[True] < 0.9 * errors[False]
