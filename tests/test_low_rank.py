"""The rank-r layer as two nn.Linear (plain factors or kept rows): the same weight in fewer
parameters, what compactify builds, save/load (legacy folders too), quantization and compile."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

from models import build, inputs
from tensornet_llm import CompactifyConfig, compactify, load_compactified, save_compactified
from tensornet_llm.layers.layout import Layout
from tensornet_llm.layers.low_rank import (
    FactoredLinear, KeptRowsLinear, LowRankLinear, balanced_factors,
)
from tensornet_llm.layers.maxvol import maxvol_rows
from tensornet_llm.layers.quantized import QuantizedLinear, round_tensor
from tensornet_llm.saving.tensors import is_torchao_tensor
from tensornet_llm.train.quantize import quantize


def factors(m, n, r, seed=0, dtype=torch.float64):
    """``(U, V, b)`` of a random rank-``r`` map ``(m, n)``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype),
            torch.randn(m, generator=g, dtype=dtype))


@given(m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 24), seed=st.integers(0, 99),
       ordered=st.booleans())
@settings(max_examples=60, deadline=None)
def test_both_storages_compute_the_map_they_were_built_from(m, n, r, seed, ordered):
    r = min(r, m, n)
    u, v, b = factors(m, n, r, seed)
    kept = KeptRowsLinear.from_factors(u, v, b, ordered=ordered)
    plain = LowRankLinear.from_factors(u, v, b)
    stacked = kept.stacked() if ordered else None
    for layer in (kept, plain):
        for shape in ((1, n), (4, n), (2, 3, n)):  # one token, a batch, a batch of sequences
            x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            expected = x @ (u @ v).T + b
            if layer is kept and not ordered:  # the stacked order a consumer reads
                expected = expected[..., maxvol_rows(u)[0].tolist() + [
                    i for i in range(m) if i not in set(maxvol_rows(u)[0].tolist())]]
            torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)
    if ordered:
        torch.testing.assert_close(kept.to_dense(), u @ v, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(kept.factors()[2], b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(kept.kept.weight, (u @ v)[stacked[:r]])  # W[R] itself
    assert kept.num_parameters == r * (m + n - r) + m == KeptRowsLinear.count_parameters(n, m, r)
    assert plain.num_parameters == r * (m + n) + m == LowRankLinear.count_parameters(n, m, r)
    assert kept.rank == plain.rank == r and kept.bond_dims == (r,)
    # Maxvol keeps the coefficients bounded, so the conversion is well conditioned.
    assert kept.others.weight.numel() == 0 or float(kept.others.weight.abs().max()) <= 1.1 + 1e-9
    for layer in (kept, plain):  # the structure rebuilds from the layout, the weights load into it
        rebuilt = type(layer).from_layout(json.loads(json.dumps(layer.layout())),
                                          dtype=torch.float64)
        rebuilt.load_state_dict(layer.state_dict())
        x = torch.randn(3, n, dtype=torch.float64)
        assert torch.equal(rebuilt(x), layer(x))


@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
def test_kept_rows_in_a_two_byte_dtype_and_under_autocast(mode):
    u, v, b = factors(40, 24, 9)
    reference = KeptRowsLinear.from_factors(u, v, b)
    x = torch.randn(7, 24, dtype=torch.float64)
    expected = reference(x)
    expected.square().sum().backward()
    layer = copy.deepcopy(reference).to(torch.bfloat16 if mode == "bfloat16" else torch.float32)
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = layer(x.to(torch.bfloat16 if mode == "bfloat16" else torch.float32))
        out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    scale = float(expected.detach().abs().max()) + 1.0
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.05 * scale)
    for p, q in zip(layer.parameters(), reference.parameters()):
        g = float(q.grad.abs().max()) + 1.0
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=0, atol=0.1 * g)


def test_maxvol_only_swaps_to_a_larger_volume():
    u = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows, b = maxvol_rows(u)
    assert len(set(rows.tolist())) == 6
    torch.testing.assert_close(b[rows], torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(b @ u[rows], u)
    assert float(b.abs().max()) <= 1.1
    start, _ = maxvol_rows(u, max_swaps=0)
    assert abs(torch.linalg.det(u[rows])) >= abs(torch.linalg.det(u[start])) - 1e-12


def test_full_rank_reproduces_the_linear_and_every_rank_below_saves():
    linear = torch.nn.Linear(12, 9).double()
    for rows in (True, False):
        layer = Layout.low_rank(12, 9, rows).decompose(linear.weight, linear.bias, 9)
        assert isinstance(layer, KeptRowsLinear if rows else LowRankLinear)
        x = torch.randn(4, 12, dtype=torch.float64)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-10, atol=1e-10)
    for r in range(1, 9):
        assert Layout.low_rank(12, 9).num_parameters(12, 9, r, False) < 12 * 9
        assert Layout.low_rank(12, 9, rows=False).num_parameters(12, 9, r, False) == r * 21


def test_bad_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="rank must be at most"):
        KeptRowsLinear(4, 3, 5)
    with pytest.raises(ValueError, match="in_features"):
        LowRankLinear(0, 3, 1)
    u, v, b = factors(5, 4, 2)
    with pytest.raises(ValueError, match="stacked must be a permutation"):
        KeptRowsLinear.from_factors(u, v, b, stacked=[0, 0, 1, 2, 3])


def compressed(**options):
    model = build("llama")
    compactify(model, chi=6, method="low-rank", progress=False, **options)
    return model


def test_compactify_stores_low_rank_layers_as_kept_rows_unless_asked_for_factors():
    rows, plain = compressed(), compressed(config=CompactifyConfig(interpolative=False))
    assert {type(m) for m in rows.modules() if isinstance(m, FactoredLinear)} == {KeptRowsLinear}
    assert {type(m) for m in plain.modules() if isinstance(m, FactoredLinear)} == {LowRankLinear}
    batch = inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(rows(**batch).logits, plain(**batch).logits, rtol=1e-4, atol=1e-4)
    count = lambda model: sum(p.numel() for p in model.parameters())
    saved = sum(m.rank ** 2 for m in rows.modules() if isinstance(m, KeptRowsLinear))
    assert count(plain) - count(rows) == saved > 0


def test_the_budget_affords_higher_ranks_with_kept_rows():
    torch.manual_seed(0)
    calibration = [torch.randint(2, 96, (1, 24)) for _ in range(4)]
    ranks = {}
    for rows in (True, False):
        model = build("llama")
        report = compactify(model, ratio=0.8, calibration=calibration, progress=False,
                            config=CompactifyConfig(interpolative=rows, method="low-rank"))
        assert report.kept_fraction <= 0.8
        ranks[rows] = sum(m.rank for m in model.modules() if isinstance(m, FactoredLinear))
    assert ranks[True] > ranks[False]


def test_kept_rows_survive_save_load_quantize_and_compile(tmp_path):
    pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = compressed()
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    save_compactified(model, tmp_path / "m")
    loaded = load_compactified(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, KeptRowsLinear)
    assert torch.equal(layer.order, model.model.layers[0].self_attn.q_proj.order)

    quantized = copy.deepcopy(model)
    quantize(quantized, 8)  # two balanced factors or one linear, each in torchao's int8
    q_proj, original = (m.model.layers[0].self_attn.q_proj for m in (quantized, model))
    parts = [q_proj.first, q_proj.second] if isinstance(q_proj, LowRankLinear) else [q_proj]
    assert len(parts) == (2 if original.rank * (original.in_features + original.out_features)
                          < original.in_features * original.out_features else 1)
    assert all(isinstance(m, torch.nn.Linear) and is_torchao_tensor(m.weight) for m in parts)
    with torch.no_grad():
        out = quantized(**batch).logits
    assert float((out - expected).norm() / expected.norm()) < 0.03
    save_compactified(quantized, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(load_compactified(tmp_path / "q")(**batch).logits, out,
                                   rtol=0, atol=0)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for n in (3, 7, 11):
        x = torch.randn(2, n, layer.in_features, requires_grad=True)
        y = compiled(x)
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
        y.sum().backward()


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # without and with biases
def test_folders_of_the_earlier_kept_rows_layer_still_load(tmp_path, name):
    """Earlier versions stored a kept-rows layer as ``cores.0 = Y``, ``cores.1 = Z`` and its
    bias in output order, with ``row_order`` in ``tensornet.json`` (``method:
    "interpolative"``): such a folder loads into today's layer with the same logits."""
    model = build(name)
    compactify(model, chi=6, method="low-rank", progress=False,
               config=CompactifyConfig(share_mlp_rows=False))
    batch = inputs(name)
    with torch.no_grad():
        expected = model(**batch).logits
    folder = save_compactified(model, tmp_path / "m")
    structure = json.loads((folder / "tensornet.json").read_text())
    state = load_file(folder / "model.safetensors")
    for key, layer in model.named_modules():
        if not isinstance(layer, KeptRowsLinear):
            continue
        m, n, r = layer.out_features, layer.in_features, layer.rank
        for part in ("kept.weight", "others.weight", "kept.bias", "others.bias", "order"):
            state.pop(f"{key}.{part}", None)
        state[f"{key}.cores.0"] = layer.others.weight.detach().reshape(1, m - r, 1, r).clone()
        state[f"{key}.cores.1"] = layer.kept.weight.detach().reshape(r, 1, n, 1).clone()
        if layer.has_bias:  # in output order
            state[f"{key}.bias"] = layer.factors()[2].detach().clone()
        structure["modules"][key] = {
            "method": "interpolative", "in_features": n, "out_features": m, "chi": r,
            "n_sites": 2, "in_shape": [1, n], "out_shape": [m, 1], "bond_dims": [r],
            "bias": layer.has_bias, "row_order": layer.order.tolist()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "tensornet.json").write_text(json.dumps(structure))
    loaded = load_compactified(folder)
    assert isinstance(loaded.model.layers[0].mlp.gate_proj, KeptRowsLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_int4_rounds_kept_rows_as_balanced_factors():
    torch.manual_seed(0)
    weight = torch.randn(384, 256) @ torch.diag(torch.linspace(1, 0.05, 256)) @ torch.randn(256, 256)
    layer = Layout.low_rank(256, 384).decompose(weight, None, 140)  # factors: fewer entries
    balanced = balanced_factors(layer)
    assert isinstance(balanced, LowRankLinear)
    torch.testing.assert_close(balanced.to_dense(), layer.to_dense(), rtol=1e-4, atol=1e-4)
    model = torch.nn.Sequential(layer)
    quantize(model, 4)
    assert isinstance(model[0].first, QuantizedLinear)
    dense = layer.to_dense().detach()
    error = float((model[0].to_dense() - dense).norm() / dense.norm())
    # Rounding Y itself moves every combined row by up to 140 rounded coefficients.
    y_rounded = copy.deepcopy(layer)
    with torch.no_grad():
        y_rounded.others.weight.copy_(round_tensor(layer.others.weight, 4, 64, 0))
    y_error = float((y_rounded.to_dense() - dense).norm() / dense.norm())
    assert error < 0.2 < y_error


@pytest.mark.parametrize("rank", [40, 100])
def test_kept_rows_round_in_their_smaller_dense_like_form(rank):
    pytest.importorskip("torchao")  # int8 goes through the torchao extra
    torch.manual_seed(0)
    weight = torch.randn(96, 160) @ torch.randn(160, 128)
    layer = Layout.low_rank(128, 96).decompose(weight, None, rank)
    model = torch.nn.Sequential(copy.deepcopy(layer))
    quantize(model, 8)
    factors_smaller = rank * (128 + 96) < 128 * 96  # 40: 8,960 < 12,288; 100: 22,400
    assert isinstance(model[0], LowRankLinear if factors_smaller else torch.nn.Linear)
    dense = layer.to_dense().detach()
    rounded = model[0].to_dense() if factors_smaller else model[0].weight.dequantize()
    assert float((rounded - dense).norm() / dense.norm()) < 0.01


def test_quantization_aware_healing_asks_for_factors_first():
    from tensornet_llm.train.heal import heal
    from tensornet_llm.train.qat import rounding_plan
    from tensornet_llm.train.quantize import low_rank_as_factors

    model = compressed()
    snap = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="low_rank_as_factors"):
        heal(model, [torch.randint(2, 96, (2, 16))], steps=1, quantize=4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters()))
    batch = inputs("llama")
    with torch.no_grad():
        before = model(**batch).logits
        assert low_rank_as_factors(model) > 0
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, KeptRowsLinear) for m in model.modules())
    assert rounding_plan(model, 4)


def test_folders_with_the_earlier_core_names_still_load(tmp_path):
    """Earlier versions kept a many-site layer's cores in an ``nn.ParameterList``: the saved
    keys were ``cores.0``, ...; today's layers name them ``core0``, ... and read either."""
    model = build("llama")
    compactify(model, chi=4, method="mpo", n_sites=3, progress=False)
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    folder = save_compactified(model, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    renamed = {k.replace(".core", ".cores.") if ".core" in k and k.rsplit(".", 1)[1][4:].isdigit()
               else k: v for k, v in state.items()}
    assert any(".cores.0" in k for k in renamed)
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(load_compactified(folder)(**batch).logits, expected, rtol=0,
                                   atol=0)
