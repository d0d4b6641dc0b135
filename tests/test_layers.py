"""Properties of MPOLinear and TTNSLinear: exactness, forward equivalence, truncation bounds."""

import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from tensornet_llm import MPOLinear, TTNSLinear
from tensornet_llm.layers import contract
from tensornet_llm.layers.contract import batch_bucket, get_plan
from tensornet_llm.layers.decompose import _svd

LAYERS = [MPOLinear, TTNSLinear]
FULL = 10**9  # a chi no bond can reach: nothing is truncated

sizes = st.one_of(st.integers(1, 300), st.sampled_from([2, 3, 5, 7, 97, 211, 293, 256, 288]))


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def random_linear(in_f, out_f, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=dtype))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g, dtype=dtype))
    return lin


@pytest.mark.parametrize("cls", LAYERS)
@given(in_f=sizes, out_f=sizes, n_sites=st.integers(2, 5), seed=st.integers(0, 3))
def test_full_chi_reproduces_weight_float64(cls, in_f, out_f, n_sites, seed):
    lin = random_linear(in_f, out_f, seed=seed)
    layer = cls.from_linear(lin, chi=FULL, n_sites=n_sites)
    assert layer.to_dense().shape == (out_f, in_f)
    assert rel(layer.to_dense(), lin.weight) < 1e-5
    assert all(s.discarded.numel() == 0 or float(s.discarded.max()) < 1e-6 for s in layer.spectra)


@pytest.mark.parametrize("cls", LAYERS)
@given(in_f=sizes, out_f=sizes, n_sites=st.integers(2, 4))
def test_full_chi_reproduces_weight_float32(cls, in_f, out_f, n_sites):
    lin = random_linear(in_f, out_f, dtype=torch.float32)
    layer = cls.from_linear(lin, chi=FULL, n_sites=n_sites)
    assert layer.cores[0].dtype == torch.float32
    assert rel(layer.to_dense(), lin.weight) < 1e-4


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("strategy", ["network", "dense", "auto"])
@given(
    in_f=sizes, out_f=sizes, n_sites=st.integers(2, 5), chi=st.integers(1, 12),
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3), bias=st.booleans(),
)
def test_forward_equals_dense_matmul(cls, strategy, in_f, out_f, n_sites, chi, lead, bias):
    torch.manual_seed(0)
    layer = cls(in_f, out_f, chi, n_sites, bias=bias, strategy=strategy, dtype=torch.float64)
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    expected = x @ layer.to_dense().T + (layer.bias if bias else 0)
    y = layer(x)
    assert y.shape == (*lead, out_f)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


@given(in_f=st.integers(1, 40), out_f=st.integers(1, 40), chi=st.integers(1, 12),
       rows=st.sampled_from([(), (1,), (1, 1), (3,)]), bias=st.booleans(), seed=st.integers(0, 9))
def test_low_rank_factors_path_equals_dense_matmul(in_f, out_f, chi, rows, bias, seed):
    """The two-factor layout runs as two ``F.linear`` at every token count; outputs and
    gradients equal the dense map, and autocast still casts."""
    lin = random_linear(in_f, out_f, seed=seed, bias=bias)
    layer = MPOLinear.from_linear(lin, chi, 2, in_shape=(1, in_f), out_shape=(out_f, 1))
    assert layer.in_shape == (1, in_f) and layer.out_shape == (out_f, 1)
    x = torch.randn(*rows, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    u, v = (c.detach().reshape(n, -1) for c, n in zip(layer.cores, (out_f, layer.bond_dims[0])))
    w = (u @ v).requires_grad_()
    expected = x @ w.T + (lin.bias.detach() if bias else 0)
    y = layer(x)
    assert y.shape == (*rows, out_f)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    y.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(layer.cores[0].grad.reshape(out_f, -1), w.grad @ v.T)
    torch.testing.assert_close(layer.cores[1].grad.reshape(-1, in_f), u.T @ w.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.float()(x.float()).dtype == torch.bfloat16


@pytest.mark.parametrize("cls", LAYERS)
@given(
    in_f=st.integers(2, 120), out_f=st.integers(2, 120), n_sites=st.integers(2, 5),
    chi=st.integers(1, 16), seed=st.integers(0, 5),
)
def test_truncation_error_obeys_svd_bound(cls, in_f, out_f, n_sites, chi, seed):
    lin = random_linear(in_f, out_f, seed=seed)
    layer = cls.from_linear(lin, chi=chi, n_sites=n_sites)
    err_sq = float((layer.to_dense() - lin.weight).detach().pow(2).sum())
    bound = sum(s.discarded_weight() for s in layer.spectra)
    assert err_sq <= bound * (1 + 1e-9) + 1e-12
    assert all(s.rank <= chi for s in layer.spectra)


@pytest.mark.parametrize("cls", LAYERS)
@given(
    in_f=st.integers(2, 100), out_f=st.integers(2, 100), n_sites=st.integers(2, 4),
    chis=st.lists(st.integers(1, 40), min_size=2, max_size=4, unique=True), seed=st.integers(0, 5),
)
def test_more_chi_never_increases_error(cls, in_f, out_f, n_sites, chis, seed):
    lin = random_linear(in_f, out_f, seed=seed)
    errors = [
        float((cls.from_linear(lin, chi=c, n_sites=n_sites).to_dense() - lin.weight).detach().norm())
        for c in sorted(chis)
    ]
    scale = float(lin.weight.detach().norm())
    assert all(b <= a + 1e-10 * scale for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("cls", LAYERS)
def test_tolerance_bounds_relative_error_and_saves_parameters(cls):
    # A network of bond dimension 3 plus a little noise: small singular values beyond rank 3 at
    # every bond, so a tolerance can drop ranks.
    torch.manual_seed(1)
    with torch.no_grad():
        w = cls(96, 64, 3, n_sites=3, dtype=torch.float64).to_dense()
        w += 1e-3 * w.std() * torch.randn_like(w)
    full = cls.from_weight(w, None, chi=FULL, n_sites=3)
    for tol in (0.3, 0.05, 0.01):
        layer = cls.from_weight(w, None, chi=FULL, n_sites=3, tol=tol)
        assert rel(layer.to_dense(), w) <= tol
        assert layer.num_parameters <= full.num_parameters
    assert cls.from_weight(w, None, chi=FULL, n_sites=3, tol=0.05).num_parameters < full.num_parameters


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("strategy", ["network", "dense"])
def test_gradcheck(cls, strategy):
    torch.manual_seed(0)
    layer = cls(6, 10, 3, n_sites=3, strategy=strategy, dtype=torch.float64)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    names, params = zip(*layer.named_parameters())

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("cls", LAYERS)
def test_backward_reaches_every_core(cls):
    layer = cls(24, 30, 4, n_sites=3)
    layer(torch.randn(5, 24)).square().sum().backward()
    for core in layer.cores:
        assert core.grad is not None and core.grad.abs().sum() > 0
    assert layer.bias.grad is not None


@pytest.mark.parametrize("cls", LAYERS)
def test_dense_strategy_training_keeps_no_rebuilt_weight(cls):
    """Backward rebuilds W instead of storing it: nothing of W's size waits in the graph, and the
    gradients are those of the network strategy."""
    torch.manual_seed(0)
    layer = cls(96, 144, 4, n_sites=3, strategy="dense")
    x = torch.randn(5, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        loss = layer(x).square().sum()
    assert saved and max(saved) < 96 * 144 // 4
    loss.backward()
    grads = [p.grad.clone() for p in (x, *layer.parameters())]
    x.grad = None
    layer.zero_grad()
    layer.strategy = "network"
    layer(x).square().sum().backward()
    for g, p in zip(grads, (x, *layer.parameters())):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", LAYERS)
def test_scratch_rebuild_serves_inference_mode_then_no_grad(cls, monkeypatch):
    """The reused buffer of a large rebuild, first allocated under ``torch.inference_mode``,
    still takes the next rebuild under ``torch.no_grad`` (as ``generate`` runs): an inference
    tensor could not be written into there."""
    monkeypatch.setattr(contract, "SCRATCH_MIN_ELEMENTS", 1)
    contract.clear_scratch()
    torch.manual_seed(0)
    layer = cls(48, 64, 4, n_sites=3, strategy="dense")
    x = torch.randn(3, 48)
    expected = layer(x).detach()
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        second = layer(x)
    contract.clear_scratch()
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("strategy", ["network", "dense"])
def test_autocast_forward_and_backward(cls, strategy):
    """Under autocast the whole contraction runs in the autocast dtype, as nn.Linear does."""
    torch.manual_seed(0)
    layer = cls(48, 64, 4, n_sites=3, strategy=strategy)
    x = torch.randn(3, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel(y.detach().float(), layer(x).detach()) < 3e-2
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and all(c.grad.dtype == torch.float32 for c in layer.cores)
    assert all(torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0 for c in layer.cores)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_is_close(cls, dtype):
    lin = random_linear(96, 144, dtype=torch.float32)
    layer = cls.from_linear(lin, chi=8)
    x = torch.randn(7, 96)
    ref = layer(x)
    half = cls.from_linear(lin.to(dtype), chi=8)
    assert half.cores[0].dtype == dtype and half.bias.dtype == dtype
    for strategy in ("network", "dense"):
        half.strategy = strategy
        y = half(x.to(dtype))
        assert y.dtype == dtype
        assert rel(y.float(), ref) < (2e-2 if dtype == torch.float16 else 6e-2)


@pytest.mark.parametrize("cls", LAYERS)
def test_random_init_matches_nn_linear_variance(cls):
    torch.manual_seed(0)
    layer = cls(512, 768, 16, n_sites=3)
    var = float(layer.to_dense().detach().var())
    assert 0.6 < var * 3 * 512 < 1.6


@pytest.mark.parametrize("cls", LAYERS)
def test_state_dict_round_trip_and_layout(cls):
    src = cls.from_linear(random_linear(50, 77, dtype=torch.float32), chi=5, n_sites=3)
    dst = cls.from_layout(src.layout())
    assert dst.bond_dims == src.bond_dims and dst.padded_in == src.padded_in
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 50)
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("cls", LAYERS)
def test_to_device_dtype_and_to_linear(cls):
    layer = cls(40, 24, 4).to(torch.float64)
    assert all(c.dtype == torch.float64 for c in layer.cores)
    lin = layer.to_linear()
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(lin(x), layer(x))


@pytest.mark.parametrize("cls", LAYERS)
def test_counts_and_repr(cls):
    layer = cls(576, 1536, 32, n_sites=3, bias=False)
    assert layer.num_parameters == sum(c.numel() for c in layer.cores)
    assert layer.dense_parameters == 576 * 1536
    assert math.isclose(layer.compression_ratio, 576 * 1536 / layer.num_parameters)
    assert max(layer.bond_dims) <= 32
    assert "bond_dims" in repr(layer) and "in_shape=(8, 9, 8)" in repr(layer)


@pytest.mark.parametrize("cls", LAYERS)
@given(in_f=sizes, out_f=sizes, chi=st.integers(1, 64), n_sites=st.integers(1, 4),
       bias=st.booleans())
def test_count_parameters_matches_the_built_layer(cls, in_f, out_f, chi, n_sites, bias):
    layer = cls(in_f, out_f, chi, n_sites, bias=bias, device="meta")
    assert cls.count_parameters(in_f, out_f, chi, n_sites, bias) == layer.num_parameters


@given(rows=st.integers(1, 40), cols=st.integers(1, 40), wide=st.integers(1, 12),
       seed=st.integers(0, 3))
def test_svd_is_a_thin_svd_for_wide_tall_and_square_matrices(rows, cols, wide, seed):
    g = torch.Generator().manual_seed(seed)
    for shape in [(rows, cols * wide), (rows * wide, cols)]:  # wide >= 4: the QR route
        mat = torch.randn(*shape, generator=g, dtype=torch.float64)
        u, s, vh = _svd(mat)
        k = min(shape)
        assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
        torch.testing.assert_close((u * s) @ vh, mat)
        torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=mat.dtype))
        torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=mat.dtype))
        torch.testing.assert_close(s, torch.linalg.svdvals(mat))


@pytest.mark.parametrize("cls", LAYERS)
def test_conv1d_weight_is_transposed(cls):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=36, nx=20)  # weight (in=20, out=36)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    layer = cls.from_linear(conv, chi=FULL)
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", LAYERS)
def test_measured_spectra_match_decomposition(cls):
    layer = cls.from_linear(random_linear(48, 60, dtype=torch.float64), chi=FULL)
    for before, after in zip(layer.spectra, layer.measure_spectra()):
        torch.testing.assert_close(after.kept, before.kept, rtol=1e-4, atol=1e-5)
        assert 0.0 <= after.entropy() <= 1.0


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"chi": 0}, "chi"),
        ({"chi": -2}, "chi"),
        ({"n_sites": 0}, "n_sites"),
        ({"in_shape": (5, 5, 5)}, "in_shape"),
        ({"out_shape": (2, 2)}, "n_sites"),
        ({"out_shape": (2, 3, 4)}, "out_shape"),
        ({"bond_dims": (99, 99, 99, 99)}, "bond_dims"),
        ({"strategy": "fast"}, "strategy"),
    ],
)
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    args = {"in_features": 24, "out_features": 36, "chi": 4, "n_sites": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        cls(**args)


@pytest.mark.parametrize("cls", LAYERS)
def test_wrong_input_dimension(cls):
    with pytest.raises(ValueError, match="in_features"):
        cls(24, 36, 4)(torch.randn(3, 25))


def test_from_linear_bad_tol_and_chi():
    lin = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="tol"):
        MPOLinear.from_linear(lin, chi=4, tol=2.0)
    with pytest.raises(ValueError, match="chi"):
        MPOLinear.from_linear(lin, chi=0)
    with pytest.raises(TypeError, match="module"):
        MPOLinear.from_linear(nn.Conv2d(2, 2, 1), chi=2)


def test_plans_are_cached_per_bucket_and_choose_by_cost():
    layer = MPOLinear(4096, 4096, 8, n_sites=4)
    assert batch_bucket(1) == 1 and batch_bucket(5) == 8 and batch_bucket(8) == 8
    assert get_plan(layer.spec, 5) is get_plan(layer.spec, 7)
    assert get_plan(layer.spec, 5) is not get_plan(layer.spec, 9)
    plan = get_plan(layer.spec, 1)
    assert plan.choose(1) == "network"  # a small chi at one token: far fewer FLOPs than dense
    assert plan.flops("network", 1) < 0.25 * plan.flops("dense", 1)
    big = get_plan(MPOLinear(576, 1536, 64, n_sites=3).spec, 4096)
    # at 4096 rows the best network path rebuilds W inside itself: no fewer FLOPs than dense
    assert big.flops("network", 4096) >= 0.999 * big.flops("dense", 4096)
    assert big.choose(4096) == "dense"  # rebuilding W once beats a fat contraction per row
