"""Cross-layer networks (issue 19): shared bases over same-role layers of consecutive blocks,
Basis Sharing, alternating sweeps; exact at full rank, sharing kept through training, compile,
save and load."""

import json

import pytest
import torch
import torch._dynamo
from hypothesis import given
from hypothesis import strategies as st
from models import build, inputs
from safetensors import safe_open
from torch._dynamo.utils import counters

from tensornet_llm import (
    CompactifyConfig,
    compactify,
    compactify_pretrained,
    load_compactified,
    save_compactified,
)
from tensornet_llm.compress.fit import output_weights, whitened_svd
from tensornet_llm.compress.groups import find_groups
from tensornet_llm.compress.sweeps import (
    basis_sharing,
    fit_group,
    group_parameters,
    group_ranks,
    stacked_spectrum,
    start_row_errors,
)
from tensornet_llm.compress.targets import find_targets
from tensornet_llm.errors import ArgumentError
from tensornet_llm.layers.cross_layer import CrossLayerLinear, SharedBases

SIDES = ["input", "output", "both"]


def random_group(g: int, out_f: int, in_f: int, seed: int = 0, shared_rank: int = 3):
    """Weights with a common input subspace plus noise, and a distinct covariance per layer."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(shared_rank, in_f, generator=gen, dtype=torch.float64)
    weights = [torch.randn(out_f, shared_rank, generator=gen, dtype=torch.float64) @ common
               + 0.3 * torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
               for _ in range(g)]
    covs = []
    for layer in range(g):
        x = torch.randn(4 * in_f + 8, in_f, generator=gen, dtype=torch.float64)
        x = x * torch.linspace(0.2, 2.0, in_f, dtype=torch.float64) * (1 + layer)
        covs.append(x.T @ x / x.shape[0])
    return weights, covs


@given(g=st.integers(1, 4), out_f=st.integers(1, 9), in_f=st.integers(1, 9),
       side=st.sampled_from(SIDES), whitened=st.booleans(), sweeps=st.integers(0, 2))
def test_full_ranks_reproduce_every_layer(g, out_f, in_f, side, whitened, sweeps):
    weights, covs = random_group(g, out_f, in_f)
    fit = fit_group(weights, covs if whitened else None, side=side, in_rank=in_f,
                    out_rank=out_f, sweeps=sweeps)
    for layer, w in enumerate(weights):
        torch.testing.assert_close(fit.weight(layer), w, rtol=0, atol=1e-9 * (1 + w.abs().max()))
    assert max(fit.errors) < 1e-8


@given(g=st.integers(2, 4), out_f=st.integers(4, 12), in_f=st.integers(4, 12),
       side=st.sampled_from(["input", "both"]), keep=st.sampled_from([0.3, 0.5]))
def test_sweeps_never_increase_the_output_error(g, out_f, in_f, side, keep):
    weights, covs = random_group(g, out_f, in_f, seed=g + out_f)
    in_rank, out_rank = group_ranks(side, in_f, out_f, g, keep)
    fit = fit_group(weights, covs, side=side, in_rank=in_rank, out_rank=out_rank, sweeps=3)
    assert all(b <= a + 1e-12 for a, b in zip(fit.history, fit.history[1:])), fit.history


def test_sweeps_improve_on_basis_sharing_when_the_layers_inputs_differ():
    weights, covs = random_group(4, 24, 20)
    start = basis_sharing(weights, covs, rank=8)
    swept = fit_group(weights, covs, side="input", in_rank=8, sweeps=4)
    assert swept.history[0] == pytest.approx(start.history[0])  # the same start
    assert swept.history[-1] < 0.97 * start.history[0]


def test_basis_sharing_is_optimal_when_the_layers_share_one_covariance():
    weights, covs = random_group(3, 16, 12)
    same = [covs[0]] * 3
    fit = fit_group(weights, same, side="input", in_rank=5, sweeps=3)
    assert fit.history[-1] == pytest.approx(fit.history[0], rel=1e-6)


def test_a_group_of_one_is_the_whitened_svd():
    weights, covs = random_group(1, 14, 10)
    fit = basis_sharing(weights, covs, rank=4)
    torch.testing.assert_close(fit.weight(0), whitened_svd(weights[0], covs[0], 4))


def test_the_shared_output_basis_start_is_the_optimum():
    weights, covs = random_group(3, 10, 14)
    fit = fit_group(weights, covs, side="output", out_rank=4, sweeps=3)
    assert len(fit.history) == 1  # nothing to sweep
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):  # any other orthonormal basis does worse
        q, _ = torch.linalg.qr(torch.randn(10, 4, generator=gen, dtype=torch.float64))
        num = sum(float((((w - q @ q.T @ w) @ c) * (w - q @ q.T @ w)).sum())
                  for w, c in zip(weights, covs))
        den = sum(float(((w @ c) * w).sum()) for w, c in zip(weights, covs))
        assert fit.history[0] <= (num / den) ** 0.5 + 1e-12


@given(side=st.sampled_from(SIDES), g=st.integers(1, 5), out_f=st.integers(2, 40),
       in_f=st.integers(2, 40), keep=st.floats(0.05, 1.0), kept_rows=st.booleans())
def test_group_ranks_fit_the_budget(side, g, out_f, in_f, keep, kept_rows):
    in_rank, out_rank = group_ranks(side, in_f, out_f, g, keep, kept_rows)
    params = group_parameters(side, in_f, out_f, g, in_rank, out_rank, kept_rows)
    if (in_rank or 1) > 1 or (out_rank or 1) > 1:  # rank 1 is the floor, whatever the budget
        assert params <= keep * g * out_f * in_f + 1e-9
    if side == "input" and in_rank < min(in_f, g * out_f):  # and it is the largest that fits
        bigger = group_parameters(side, in_f, out_f, g, in_rank + 1, None, kept_rows)
        assert bigger > keep * g * out_f * in_f - 1e-9


@given(g=st.integers(1, 4), out_f=st.integers(2, 12), in_f=st.integers(2, 12),
       side=st.sampled_from(["input", "output"]), whitened=st.booleans())
def test_the_budgets_row_errors_are_those_of_the_fitted_start(g, out_f, in_f, side, whitened):
    """One decomposition prices every rank: each must equal the start fit_group builds."""
    weights, covs = random_group(g, out_f, in_f, seed=g * out_f + in_f)
    covs = covs if whitened else None
    ranks = sorted({group_ranks(side, in_f, out_f, g, k) for k in (0.1, 0.3, 0.6, 1.0)},
                   key=lambda r: (r[0] or 0, r[1] or 0))
    for rank, rows in zip(ranks, start_row_errors(weights, covs, side, ranks)):
        fit = fit_group(weights, covs, side=side, in_rank=rank[0], out_rank=rank[1], sweeps=0)
        for layer, (w, row) in enumerate(zip(weights, rows)):
            e = w - fit.weight(layer)
            expected = ((e @ (covs[layer] if covs else torch.eye(in_f, dtype=e.dtype))) * e).sum(1)
            torch.testing.assert_close(row, expected.clamp_min(0), rtol=1e-6,
                                       atol=1e-9 * float((w * w).sum()))


def group_weights(g: int, out_f: int, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [output_weights(torch.rand(out_f, generator=gen, dtype=torch.float64) ** 4)
            for _ in range(g)]


@given(g=st.integers(2, 4), out_f=st.integers(4, 12), in_f=st.integers(4, 12),
       keep=st.sampled_from([0.3, 0.5]))
def test_weighted_sweeps_never_increase_the_weighted_error(g, out_f, in_f, keep):
    weights, covs = random_group(g, out_f, in_f, seed=g + in_f)
    in_rank, _ = group_ranks("input", in_f, out_f, g, keep)
    fit = fit_group(weights, covs, side="input", in_rank=in_rank, sweeps=3,
                    rows=group_weights(g, out_f))
    assert all(b <= a + 1e-12 for a, b in zip(fit.history, fit.history[1:])), fit.history


def test_the_weighted_start_is_optimal_for_the_weighted_error_with_one_covariance():
    """With one covariance the weighted stack's SVD is the weighted objective's optimum (Eckart-
    Young), so it beats the unweighted start there, and the budget prices exactly that start."""
    weights, covs = random_group(3, 12, 10)
    same, rows = [covs[0]] * 3, group_weights(3, 12, seed=1)
    weighted = fit_group(weights, same, side="input", in_rank=4, sweeps=0, rows=rows)
    plain = fit_group(weights, same, side="input", in_rank=4, sweeps=0)
    num = sum(float((d[:, None] * ((w - plain.weight(i)) @ c) * (w - plain.weight(i))).sum())
              for i, (w, c, d) in enumerate(zip(weights, same, rows)))
    den = sum(float((d[:, None] * (w @ c) * w).sum()) for w, c, d in zip(weights, same, rows))
    assert weighted.history[0] < (num / den) ** 0.5
    for layer, (w, row) in enumerate(zip(weights, start_row_errors(weights, same, "input",
                                                                   [(4, None)], rows)[0])):
        e = w - weighted.weight(layer)
        torch.testing.assert_close(row, ((e @ same[layer]) * e).sum(1).clamp_min(0))
    with pytest.raises(ArgumentError, match="rows"):
        fit_group(weights, same, side="both", in_rank=4, out_rank=4, rows=rows)


def test_stacked_spectrum_of_identical_layers_has_the_single_layers_rank():
    weights, covs = random_group(1, 8, 12)
    single = stacked_spectrum(weights, covs)
    double = stacked_spectrum(weights * 2, covs * 2)
    assert int((double > 1e-8 * double[0]).sum()) == int((single > 1e-8 * single[0]).sum())


def test_groups_are_same_role_runs_of_consecutive_blocks():
    model = build("llama", layers=5)
    chosen, _ = find_targets(model)
    groups = find_groups(chosen, 2)
    q = [g.names for g in groups if g.role == "self_attn.q_proj"]
    assert q == [[f"model.layers.{b}.self_attn.q_proj" for b in blocks]
                 for blocks in ([0, 1], [2, 3], [4])]
    sizes = find_groups(chosen, {"down_proj": 1, "_default": 3})
    assert {len(g.names) for g in sizes if g.role == "mlp.down_proj"} == {1}
    t5 = build("t5", layers=4)  # blocks that hold lists of their own group by the outer list
    roles = {g.role: len(g.names) for g in find_groups(find_targets(t5)[0], 4)}
    assert roles["layer.0.SelfAttention.q"] == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_full_rank_groups_reproduce_the_model(arch, size):
    model = build(arch, layers=4)
    x = inputs(arch)
    with torch.no_grad():
        ref = model(**x).logits
    compactify(model, chi=10**6, cross_layer=size, progress=False,
               config=CompactifyConfig(cross_layer_side="both"))
    members = [m for m in model.modules() if isinstance(m, CrossLayerLinear)]
    assert members and max(m.shared.group_size for m in members) == size
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, ref, rtol=1e-4, atol=1e-4)


CALIBRATION = [torch.randint(2, 96, (1, 24), generator=torch.Generator().manual_seed(i))
               for i in range(3)]


def calibrated(layers: int = 4, **config):
    """A tiny llama compressed into cross-layer pairs at chi 6 (every group shared)."""
    model = build("llama", layers=layers)
    report = compactify(model, chi=6, calibration=CALIBRATION, progress=False,
                        config=CompactifyConfig(cross_layer=2, **config))
    return model, report


def test_chi_groups_share_each_basis_once():
    model, report = calibrated()
    q0, q1 = (model.model.layers[b].self_attn.q_proj for b in (0, 1))
    assert q0.shared is q1.shared and q0.core is not q1.core
    assert sum(p.numel() for p in model.parameters()) == report.model_params_after
    assert all(r.act_error <= r.act_error_start + 1e-6 or r.act_error < 1 for r in report.layers)
    groups = [r for r in report.layers if r.method.startswith("cross-layer")]
    assert len(groups) == len(report.layers) == 28


def test_the_budget_keeps_the_ratio_and_shares_where_the_layers_agree():
    model = build("llama", layers=4)
    with torch.no_grad():  # blocks 0 and 1 become twins: a shared basis costs nothing there
        for a, b in zip(model.model.layers[1].parameters(), model.model.layers[0].parameters()):
            a.copy_(b)
    report = compactify(model, ratio=0.5, calibration=CALIBRATION, cross_layer=2,
                        progress=False)
    assert report.kept_fraction <= 0.5 + 1e-9 and report.kept_fraction > 0.45
    assert report.estimate == "fisher"
    methods = {r.name: r.method for r in report.layers}
    twins = [m for n, m in methods.items() if n.startswith(("model.layers.0.", "model.layers.1."))]
    assert sum(m.startswith("cross-layer") for m in twins) >= len(twins) // 2, methods
    assert sum(p.numel() for p in model.parameters()) == report.model_params_after


def test_training_updates_each_shared_tensor_once_from_every_member():
    model, _ = calibrated(cross_layer_side="input")
    q0, q1 = (model.model.layers[b].self_attn.q_proj for b in (0, 1))
    assert sum(p is q0.shared.in_basis for p in model.parameters()) == 1
    ids = inputs("llama")["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    shared_grad = q0.shared.in_basis.grad.clone()
    # member 1 on its own copy of the bases: the two gradients add up to the shared one
    model.zero_grad()
    own = SharedBases(q0.in_features, q0.out_features, q0.core.shape[1], None, 2)
    with torch.no_grad():
        own.in_basis.copy_(q0.shared.in_basis)
    shared, q1.shared = q1.shared, own
    model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(q0.shared.in_basis.grad + own.in_basis.grad, shared_grad)
    q1.shared = shared
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    before = q0.shared.in_basis.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert not torch.equal(q0.shared.in_basis, before)
    assert q1.shared.in_basis is q0.shared.in_basis


@pytest.mark.parametrize("side", ["both", "input"])  # input: stored as kept rows
def test_save_and_load_keep_the_sharing_bit_for_bit(tmp_path, side):
    model, _ = calibrated(cross_layer_side=side)
    x = inputs("llama")
    save_compactified(model, tmp_path / "out")
    loaded = load_compactified(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)
    a, b = (loaded.model.layers[i].mlp.up_proj for i in (0, 1))
    assert a.shared is b.shared
    originals = [model.model.layers[i].mlp.up_proj for i in (0, 1)]
    assert any(m.kept is not None for m in originals) == (side == "input")
    for new, old in zip((a, b), originals):
        assert (new.kept is None) == (old.kept is None)
        if old.kept is not None:
            assert torch.equal(new.kept, old.kept) and torch.equal(new.row_order, old.row_order)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "model.layers.0.mlp.up_proj.shared.input.weight" in stored
    assert "model.layers.1.mlp.up_proj.shared.input.weight" not in stored  # stored once
    structure = json.loads((tmp_path / "out" / "tensornet.json").read_text())
    assert structure["cross_layer"]["model.layers.1.mlp.up_proj"]["group"] == (
        "model.layers.0.mlp.up_proj")


def test_folders_with_the_earlier_parameter_names_still_load(tmp_path):
    """Earlier versions held the bases and cores as bare parameters (``shared.in_basis``,
    ``shared.out_basis``, ``core``), not as ``nn.Linear`` weights."""
    from safetensors.torch import load_file, save_file

    model, _ = calibrated(cross_layer_side="both")
    x = inputs("llama")
    save_compactified(model, tmp_path / "out")
    old_names = {".shared.input.weight": ".shared.in_basis",
                 ".shared.output.weight": ".shared.out_basis", ".mix.weight": ".core"}

    def old(key: str) -> str:
        for new, former in old_names.items():
            if key.endswith(new):
                return key[: -len(new)] + former
        return key

    path = tmp_path / "out" / "model.safetensors"
    save_file({old(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    structure_path = tmp_path / "out" / "tensornet.json"
    structure = json.loads(structure_path.read_text())
    structure["aliases"] = {old(k): old(v) for k, v in structure["aliases"].items()}
    assert structure["aliases"]
    structure_path.write_text(json.dumps(structure))
    with torch.no_grad():
        assert torch.equal(load_compactified(tmp_path / "out")(**x).logits, model(**x).logits)


def test_a_compressed_model_compiles_fullgraph():
    torch._dynamo.reset()
    counters.clear()
    model, _ = calibrated(cross_layer_side="both")
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    for length in (1, 5, 33):
        ids = torch.randint(2, 90, (1, length))
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.parametrize("options, message", [
    (dict(cross_layer=0), "cross_layer"),
    (dict(cross_layer=2, config=CompactifyConfig(cross_layer_side="left")), "cross_layer_side"),
    (dict(cross_layer=2, config=CompactifyConfig(sweeps=-1)), "sweeps"),
    (dict(cross_layer=2, config=CompactifyConfig(match_dense=True)), "match_dense"),
    (dict(cross_layer={"q_proj": 2}), "cross_layer"),  # no default for the other modules
])
def test_bad_settings_fail_before_the_model_is_touched(options, message):
    model = build("llama", layers=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArgumentError, match=message):
        compactify(model, chi=4, progress=False, **options)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(m, CrossLayerLinear) for m in model.modules())


def test_streaming_refuses_cross_layer_groups(tmp_path):
    model = build("llama", layers=2)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ArgumentError, match="cross_layer"):
        compactify_pretrained(tmp_path / "src", tmp_path / "out", chi=4, cross_layer=2)


def test_the_command_line_writes_a_cross_layer_model(tmp_path, capsys):
    from models import char_tokenizer

    from tensornet_llm.cli import main

    model = build("llama", layers=3)
    model.save_pretrained(tmp_path / "tiny")
    char_tokenizer().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    assert main(["compress", str(tmp_path / "tiny"), "--chi", "4", "--cross-layer", "2",
                 "--no-calibration", "--out", str(out), "--quiet"]) == 0
    assert "cross-layer" in capsys.readouterr().out
    loaded = load_compactified(out)
    assert loaded.model.layers[0].mlp.up_proj.shared is loaded.model.layers[1].mlp.up_proj.shared
    assert json.loads((out / "tensornet.json").read_text())["compactify"]["cross_layer"] == 2
    assert main(["compress", str(tmp_path / "tiny"), "--chi", "4", "--cross-layer", "2",
                 "--stream", "--no-calibration", "--out", str(tmp_path / "s"), "--quiet"]) != 0
    assert "cross_layer" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_groups_keep_one_basis_and_survive_save_and_load(tmp_path, bits):
    if bits == 8:
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
    from tensornet_llm import quantize
    from tensornet_llm.helpers.evaluate import model_size_bytes

    model, _ = calibrated(cross_layer_side="both")
    x = inputs("llama")
    with torch.no_grad():
        ref = model(**x).logits
    report = quantize(model, bits)
    q0, q1 = (model.model.layers[b].mlp.gate_proj for b in (0, 1))
    assert q0.shared is q1.shared and q0.shared.input is not None and q0.shared.output is not None
    # torchao's int8 keeps a float32 scale and an int8 zero point per row: on these tiny rows
    # (a few dozen entries) that is most of the way from 4x to 3x smaller
    assert report.bytes_after < report.bytes_before / (2.5 if bits == 8 else 5)
    with torch.no_grad():
        out = model(**x).logits
    assert (out - ref).abs().max() < (0.05 if bits == 8 else 0.5) * ref.abs().max()
    save_compactified(model, tmp_path / "q")
    loaded = load_compactified(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, out)
    assert model_size_bytes(loaded) == model_size_bytes(model)
    a, b = (loaded.model.layers[i].mlp.gate_proj for i in (0, 1))
    assert a.shared is b.shared  # the basis stored once is one module again


def test_lora_adapters_train_on_cross_layer_members_and_refuse_to_merge():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from tensornet_llm import lora_config
    from tensornet_llm.train.lora import MergeNotExactError

    model, _ = calibrated(cross_layer_side="input")
    peft_model = get_peft_model(model, lora_config(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = inputs("llama")["input_ids"]
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if n in trainable)
    with pytest.raises(MergeNotExactError, match="cannot be merged exactly into this CrossLayerLinear"):
        peft_model.merge_and_unload()


def test_groups_of_one_are_the_per_layer_path_exactly():
    """Same budget, same block-by-block fit on the compressed model's inputs: same model."""
    x = inputs("llama")
    per_layer, grouped = build("llama", layers=3), build("llama", layers=3)
    a = compactify(per_layer, ratio=0.5, calibration=CALIBRATION, fit_steps=5, progress=False,
                   config=CompactifyConfig(slim_mlp=False))  # groups offer no slim MLPs
    b = compactify(grouped, ratio=0.5, calibration=CALIBRATION, fit_steps=5, cross_layer=1,
                   progress=False)
    assert a.choices() == b.choices()
    with torch.no_grad():
        assert torch.equal(per_layer(**x).logits, grouped(**x).logits)


def test_a_failure_in_the_block_by_block_fit_restores_every_module(monkeypatch):
    from tensornet_llm.compress import groups as grouping

    model = build("llama", layers=4)
    originals = dict(model.named_modules())
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return fit_group(*args, **kwargs)

    monkeypatch.setattr(grouping, "fit_group", failing)
    with pytest.raises(RuntimeError, match="boom"):
        compactify(model, chi=4, calibration=CALIBRATION, cross_layer=2, progress=False,
                   config=CompactifyConfig(cross_layer_side="input"))
    assert len(calls) == 3
    assert all(originals[n] is m for n, m in model.named_modules() if n in originals)
    assert not any(isinstance(m, CrossLayerLinear) for m in model.modules())
