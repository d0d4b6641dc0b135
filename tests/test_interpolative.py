"""Low-rank layers stored as kept rows: the same weight in fewer parameters, exact edits,
save/load, quantization, compile and what compactify builds."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from models import build, inputs
from tensornet_llm import CompactifyConfig, compactify, load_compactified, save_compactified
from tensornet_llm.layers.interpolative import InterpolativeLinear, maxvol_rows
from tensornet_llm.layers.layout import Layout
from tensornet_llm.layers.mpo import MPOLinear
from tensornet_llm.layers.quantized import QuantizedTensorNetworkLinear, round_tensor
from tensornet_llm.train.quantize import quantize


def factors(m, n, r, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)
    return Layout.low_rank(n, m, rows=False).decompose(weight, torch.randn(m, dtype=dtype), r)


@given(m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 24), seed=st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_kept_rows_hold_the_same_weight_in_fewer_parameters(m, n, r, seed):
    r = min(r, m, n)
    low_rank = factors(m, n, r, seed)
    layer = InterpolativeLinear.from_factors(low_rank)
    torch.testing.assert_close(layer.to_dense(), low_rank.to_dense(), rtol=1e-9, atol=1e-9)
    for tokens in (1, 4):  # the one-token path (two matrix-vector products), and the general one
        x = torch.randn(tokens, n, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
        expected = layer(x)
        torch.testing.assert_close(expected, low_rank(x), rtol=1e-9, atol=1e-9)
        with torch.no_grad():  # past a few tokens: one output buffer, strided matmuls, a gather
            torch.testing.assert_close(layer(x.view(tokens, 1, n)), expected.view(tokens, 1, m),
                                       rtol=1e-12, atol=1e-12)
    assert layer.num_parameters == r * (m + n - r) + m
    assert layer.num_parameters == InterpolativeLinear.count_parameters(
        n, m, r, 2, True, in_shape=(1, n), out_shape=(m, 1))
    assert layer.rank == r and layer.bond_dims == (r,)
    # Maxvol keeps the coefficients bounded, so the conversion is well conditioned.
    assert layer.cores[0].numel() == 0 or float(layer.cores[0].detach().abs().max()) <= 1.1 + 1e-9
    kept = layer._stacked_rows()[:r]
    torch.testing.assert_close(layer.cores[1].reshape(r, n), low_rank.to_dense()[kept])


@given(m=st.integers(2, 40), n=st.integers(1, 24), r=st.integers(1, 12), tokens=st.integers(1, 20),
       seed=st.integers(0, 99))
@settings(max_examples=30, deadline=None)
def test_bfloat16_paths_compute_the_same_map(m, n, r, tokens, seed):
    """In a 2-byte dtype on the CPU the layer multiplies by ``U`` once from ``r`` tokens up and
    gathers with ``torch.gather`` below: outputs and gradients agree with float64, in bfloat16
    and under autocast, with and without autograd."""
    r = min(r, m - 1, n)
    reference = InterpolativeLinear.from_factors(factors(m, n, r, seed))
    x = torch.randn(tokens, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = reference(x)
    expected.square().sum().backward()
    scale = float(expected.detach().abs().max()) + 1.0
    for mode in ("bfloat16", "autocast"):
        layer = copy.deepcopy(reference).to(torch.bfloat16 if mode == "bfloat16" else torch.float32)
        layer.zero_grad()
        xin = x.to(torch.bfloat16 if mode == "bfloat16" else torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            with torch.no_grad():
                inferred = layer(xin)
            out = layer(xin)
            out.float().square().sum().backward()
        assert out.dtype == torch.bfloat16
        for y in (inferred, out):
            torch.testing.assert_close(y.double(), expected, rtol=0, atol=0.05 * scale)
        for p, q in zip(layer.cores, reference.cores):
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
    layer = InterpolativeLinear.from_linear(linear, 9)
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-10, atol=1e-10)
    for r in range(1, 9):
        assert Layout.low_rank(12, 9).num_parameters(12, 9, r, False) < 12 * 9
        assert Layout.low_rank(12, 9, rows=False).num_parameters(12, 9, r, False) == r * 21


@pytest.mark.parametrize("k", [1, 3])
def test_appending_factors_is_exact_and_restore_undoes_it_bit_for_bit(k):
    layer = InterpolativeLinear.from_factors(factors(10, 8, 4))
    before, state = layer.to_dense(), layer.state()
    g = torch.Generator().manual_seed(3)
    left = torch.randn(10, k, dtype=torch.float64, generator=g)
    right = torch.randn(k, 8, dtype=torch.float64, generator=g)
    layer.append_factors_(left, right)
    assert layer.rank == 4 + k and layer.num_parameters == (4 + k) * (18 - 4 - k) + 10
    torch.testing.assert_close(layer.to_dense(), before + left @ right, rtol=1e-10, atol=1e-10)
    assert float(layer.cores[0].detach().abs().max()) <= 1.1 + 1e-9  # the joining rows are maxvol's
    gain = torch.rand(10, dtype=torch.float64, generator=g) + 0.5
    expected = gain[:, None] * layer.to_dense()
    layer.scale_rows_(gain)
    torch.testing.assert_close(layer.to_dense(), expected, rtol=1e-10, atol=1e-10)
    layer.restore_(state)
    assert layer.rank == 4 and all(torch.equal(a, b) for a, b in zip(layer.state(), state))
    with pytest.raises(ValueError, match="exceed out_features"):
        layer.append_factors_(torch.zeros(10, 7, dtype=torch.float64),
                              torch.zeros(7, 8, dtype=torch.float64))


def compressed(**options):
    model = build("llama")
    compactify(model, chi=6, method="low-rank", progress=False, **options)
    return model


def test_compactify_stores_low_rank_layers_as_kept_rows_unless_asked_for_factors():
    rows, plain = compressed(), compressed(config=CompactifyConfig(interpolative=False))
    kinds = {type(m) for m in rows.modules()} & {InterpolativeLinear, MPOLinear}
    assert kinds == {InterpolativeLinear}
    assert not any(isinstance(m, InterpolativeLinear) for m in plain.modules())
    batch = inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(rows(**batch).logits, plain(**batch).logits, rtol=1e-4, atol=1e-4)
    count = lambda model: sum(p.numel() for p in model.parameters())
    saved = sum(m.rank ** 2 for m in rows.modules() if isinstance(m, InterpolativeLinear))
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
        ranks[rows] = sum(m.bond_dims[0] for m in model.modules()
                          if getattr(m, "is_low_rank", False))
    assert ranks[True] > ranks[False]


def test_kept_rows_survive_save_load_quantize_and_compile(tmp_path):
    model = compressed()
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    save_compactified(model, tmp_path / "m")
    loaded = load_compactified(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, InterpolativeLinear)
    assert torch.equal(layer.row_order, model.model.layers[0].self_attn.q_proj.row_order)

    quantized = copy.deepcopy(model)
    quantize(quantized, 8)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, QuantizedTensorNetworkLinear)
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


def test_int4_rounds_kept_rows_as_balanced_factors():
    torch.manual_seed(0)
    weight = torch.randn(384, 256) @ torch.diag(torch.linspace(1, 0.05, 256)) @ torch.randn(256, 256)
    layer = InterpolativeLinear.from_weight(weight, None, 200)
    factors = layer.to_factors()
    assert isinstance(factors, MPOLinear) and factors.is_low_rank
    torch.testing.assert_close(factors.to_dense(), layer.to_dense(), rtol=1e-4, atol=1e-4)
    model = torch.nn.Sequential(layer)
    quantize(model, 4)
    assert isinstance(model[0], QuantizedTensorNetworkLinear)
    dense = layer.to_dense().detach()
    error = float((model[0].to_dense() - dense).norm() / dense.norm())
    # Rounding Y itself moves every combined row by up to 200 rounded coefficients (0.26 here).
    y = layer.cores[0].detach()
    y_rounded = float((layer.dense_from([round_tensor(y, 4, 64, -1), layer.cores[1].detach()])
                       - dense).norm() / dense.norm())
    assert error < 0.2 < y_rounded


def test_quantization_aware_healing_asks_for_factors_first():
    from tensornet_llm.train.heal import heal
    from tensornet_llm.train.quantize import low_rank_as_factors, rounding_plan

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
    assert not any(isinstance(m, InterpolativeLinear) for m in model.modules())
    assert rounding_plan(model, 4)
