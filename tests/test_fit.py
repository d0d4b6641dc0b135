"""Data-aware fitting: covariances, the whitened-SVD baseline, the weighted tensor-network fit."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from tensornet_llm import MPOLinear, TTNSLinear
from tensornet_llm.compress.fit import (
    CovarianceCollector, corrected_target, fit_weighted, kronecker_factors, kronecker_whitened,
    metric_roots, output_weights, stable_cholesky, weighted_error, whitened_start_is_optimal,
    whitened_svd,
)
from tensornet_llm.layers.layout import Layout

LAYERS = [MPOLinear, TTNSLinear]


def anisotropic_inputs(n, dim, seed=0, dead=0):
    """Activations with a decaying spectrum (like a transformer's) and optionally dead channels."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * scales
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    x = x @ mix.T
    if dead:
        x[:, :dead] = 0
    return x


def test_collector_matches_direct_covariance():
    lin = nn.Linear(12, 5)
    xs = [torch.randn(3, 4, 12), torch.randn(7, 12)]
    with CovarianceCollector({"lin": lin}) as cov:
        for x in xs:
            lin(x)
    flat = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    torch.testing.assert_close(cov.covariance("lin"), flat.T @ flat / flat.shape[0])
    assert cov.tokens("lin") == 19
    lin(torch.randn(2, 12))  # hooks removed on exit
    assert cov.tokens("lin") == 19


def test_stable_cholesky_regularises_singular_covariance():
    x = anisotropic_inputs(10, 24, dead=3)  # fewer samples than features, dead channels
    cov = x.T @ x / 10
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(cov)
    factor = stable_cholesky(cov)
    err = (factor @ factor.T - cov).abs().max()
    assert err < 1e-4 * cov.diagonal().mean()
    good = torch.eye(5, dtype=torch.float64) * 2
    torch.testing.assert_close(stable_cholesky(good), good.sqrt())  # no shift when not needed


def test_whitened_svd_is_optimal_among_rank_r():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(500, 30)
    cov = x.T @ x / 500
    torch.testing.assert_close(whitened_svd(w, cov, 30), w)
    for rank in (2, 8, 16):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert weighted_error(whitened_svd(w, cov, rank), w, cov) <= weighted_error(plain, w, cov) + 1e-12


@pytest.mark.parametrize("cls", LAYERS)
@settings(max_examples=12, deadline=None)
@given(
    in_f=st.integers(8, 64), out_f=st.integers(8, 64), chi=st.integers(1, 6),
    seed=st.integers(0, 100), dead=st.integers(0, 4),
)
def test_weighted_fit_never_increases_weighted_error(cls, in_f, out_f, chi, seed, dead):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(4 * in_f, in_f, seed=seed, dead=min(dead, in_f - 1))
    cov = x.T @ x / x.shape[0]
    layer = cls.from_weight(w, None, chi=chi, n_sites=3)
    before = weighted_error(layer.to_dense().detach(), w, cov)
    result = fit_weighted(layer, w, cov, steps=30)
    after = weighted_error(layer.to_dense().detach(), w, cov)
    assert after <= before * (1 + 1e-9) + 1e-12
    assert result.final_error <= result.start_error + 1e-12


@pytest.mark.parametrize("cls", LAYERS)
def test_weighted_fit_improves_on_tt_svd_for_anisotropic_inputs(cls):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 60, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(600, 60, seed=3)
    cov = x.T @ x / 600
    layer = cls.from_weight(w, None, chi=4, n_sites=3)
    before = weighted_error(layer.to_dense().detach(), w, cov)
    fit_weighted(layer, w, cov, steps=100)
    assert weighted_error(layer.to_dense().detach(), w, cov) < 0.8 * before


@pytest.mark.parametrize("cls", LAYERS)
def test_white_noise_calibration_agrees_with_unweighted_fit(cls):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 60, generator=g, dtype=torch.float64)
    x = torch.randn(20000, 60, generator=g, dtype=torch.float64)  # white: C ~ I
    cov = x.T @ x / x.shape[0]
    svd_only = cls.from_weight(w, None, chi=5, n_sites=3)
    unweighted = cls.from_weight(w, None, chi=5, n_sites=3)
    fit_weighted(unweighted, w, torch.eye(60, dtype=torch.float64), steps=50)
    weighted = cls.from_weight(w, None, chi=5, n_sites=3)
    fit_weighted(weighted, w, cov, steps=50)
    frob = lambda layer: float((layer.to_dense().detach() - w).norm() / w.norm())
    assert abs(frob(weighted) - frob(unweighted)) < 0.01 * frob(unweighted)
    assert frob(unweighted) <= frob(svd_only) + 1e-9


@pytest.mark.parametrize("cls", [MPOLinear, TTNSLinear])
def test_kronecker_whitened_start_is_exact_at_full_chi_and_better_for_kronecker_data(cls):
    torch.manual_seed(3)
    weight = torch.randn(48, 60, dtype=torch.float64)
    shape = (3, 5, 4)  # factorize(60, 3)
    sites = [torch.randn(d, d, dtype=torch.float64) for d in shape]
    sites = [a @ a.T + 0.05 * torch.eye(len(a), dtype=torch.float64) for a in sites]
    cov = torch.kron(torch.kron(sites[0], sites[1]), sites[2])
    for got, want in zip(kronecker_factors(cov, shape), sites):
        torch.testing.assert_close(got, want / want.diagonal().mean())
    full = cls.from_weight(weight, None, chi=10**6)
    exact = kronecker_whitened(full, weight, cov)
    torch.testing.assert_close(exact.to_dense().double(), weight, rtol=1e-4, atol=1e-4)
    for chi in (3, 6):
        plain = cls.from_weight(weight, None, chi=chi)
        white = kronecker_whitened(plain, weight, cov)
        assert white.bond_dims == plain.bond_dims
        err = lambda layer: weighted_error(layer.to_dense().detach(), weight, cov)
        assert err(white) < err(plain)


@settings(max_examples=15, deadline=None)
@given(in_f=st.integers(4, 40), out_f=st.integers(4, 40), chi=st.integers(1, 12),
       seed=st.integers(0, 10**6), dead=st.integers(0, 3))
def test_low_rank_whitened_start_is_the_optimum_the_fit_cannot_improve(in_f, out_f, chi, seed, dead):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(3 * in_f, in_f, seed=seed, dead=min(dead, in_f - 1))
    cov = x.T @ x / x.shape[0]
    layer = Layout.low_rank(in_f, out_f, rows=False).factor_form().decompose(w, None, chi)
    start = kronecker_whitened(layer, w, cov)
    assert whitened_start_is_optimal(start)
    err = weighted_error(start.to_dense().detach(), w, cov)
    # Same error as the SVD-LLM optimum of that rank (the rank is the bond the layer got).
    rank = start.bond_dims[0]
    assert err == pytest.approx(weighted_error(whitened_svd(w, cov, rank), w, cov), abs=1e-6)
    fitted = fit_weighted(start, w, cov, steps=20)
    assert fitted.final_error >= fitted.start_error - 1e-6


def test_whitened_start_is_optimal_only_for_one_bond_with_the_input_on_one_site():
    w = torch.randn(12, 30, dtype=torch.float64)
    assert whitened_start_is_optimal(Layout.low_rank(30, 12, rows=False).factor_form().decompose(w, None, 4))
    assert whitened_start_is_optimal(MPOLinear.from_weight(w, None, 4, 2, in_shape=(30, 1),
                                                           out_shape=(1, 12)))
    assert not whitened_start_is_optimal(MPOLinear.from_weight(w, None, 4, 2, in_shape=(5, 6),
                                                               out_shape=(3, 4)))
    assert not whitened_start_is_optimal(MPOLinear.from_weight(w, None, 4, 3))
    assert not whitened_start_is_optimal(TTNSLinear.from_weight(w, None, 4, 4))


# ----- fitting to the dense outputs -----------------------------------------------------------

def test_corrected_target_is_the_weight_without_upstream_error():
    w = torch.randn(7, 10, dtype=torch.float64)
    x = anisotropic_inputs(50, 10, dead=2)
    cov = x.T @ x / 50
    torch.testing.assert_close(corrected_target(w, cov, cov), w, rtol=0, atol=0)


@given(out_f=st.integers(1, 8), in_f=st.integers(2, 12), seed=st.integers(0, 10**6))
@settings(max_examples=25, deadline=None)
def test_corrected_target_solves_least_squares_to_the_reference_outputs(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    n = 4 * in_f + 8
    x = anisotropic_inputs(n, in_f, seed=seed)  # the layer's own inputs
    x_ref = x + 0.3 * torch.randn(n, in_f, generator=g, dtype=torch.float64) * x.std(0)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    best = torch.linalg.lstsq(x, x_ref @ w.T).solution.T  # argmin ||X_r W^T - X W'^T||
    got = corrected_target(w, x.T @ x / n, x_ref.T @ x / n, damp=0.0)
    torch.testing.assert_close(got, best, rtol=1e-6, atol=1e-6 * float(best.abs().max()))
    # A damped correction is still better than the plain weight on the reference outputs.
    damped = corrected_target(w, x.T @ x / n, x_ref.T @ x / n)
    assert (x_ref @ w.T - x @ damped.T).norm() < (x_ref @ w.T - x @ w.T).norm()


def test_modules_reading_one_input_share_one_covariance_and_conflicts_fall_back():
    import torch
    from torch import nn

    from models import build
    from tensornet_llm.compress.calibrate import collect_covariances
    from tensornet_llm.compress.fit import CovarianceCollector, SharedInputConflict

    model = build("llama")
    attn = model.model.layers[0].self_attn
    modules = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
    batches = [{"input_ids": torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    shared = collect_covariances(model, batches, modules)
    with CovarianceCollector(modules) as alone:  # share=False: one sum per module
        for b in batches:
            model(**b)
    for name in modules:
        torch.testing.assert_close(shared.covariance(name), alone.covariance(name))
    taken = {n: shared.take(n) for n in modules}
    assert taken["q"] is taken["k"] is taken["v"] and taken["o"] is not taken["q"]
    assert not shared._sums  # all taken: nothing held any more

    class Swapping(nn.Module):  # b reads a's input on the first call only
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(4, 4), nn.Linear(4, 4), 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else 2 * x)

    net = Swapping()
    with pytest.raises(SharedInputConflict):
        with CovarianceCollector({"a": net.a, "b": net.b}, share=True):
            net(torch.randn(3, 4))
            net(torch.randn(3, 4))
    net.calls = 0
    xs = [torch.randn(3, 4) for _ in range(2)]
    result = collect_covariances(net, [{"x": x} for x in xs], {"a": net.a, "b": net.b})
    # The shared pass stopped at call 2 (b read another input); the pass again without sharing
    # (calls 3 and 4, where b reads 2 x) is what counts.
    gram = sum(x.T.double() @ x.double() for x in xs) / 6
    torch.testing.assert_close(result.covariance("a"), gram)
    torch.testing.assert_close(result.covariance("b"), 4 * gram)


# ----- output rows weighted by the loss gradient (the fit of the Gauss-Newton estimate) -------

def full_metric(out_f: int, g: torch.Generator) -> torch.Tensor:
    """An ``(out, out)`` gradient second moment with strongly coupled output features."""
    grads = torch.randn(3 * out_f, out_f, generator=g, dtype=torch.float64) @ torch.randn(
        out_f, out_f, generator=g, dtype=torch.float64)
    return output_weights(grads.T @ grads / grads.shape[0])


def metric_error(approx, w, cov, metric):
    """``||R (W - approx) L||^2`` with ``C = L L^T`` and ``R^T R`` the metric: output weights
    ``(out,)`` or a matrix ``(out, out)``."""
    e = w - approx
    weighted = metric[:, None] * e if metric.dim() == 1 else metric @ e
    return float(((weighted @ cov) * e).sum())


@given(in_f=st.integers(4, 24), out_f=st.integers(4, 24), chi=st.integers(1, 8),
       seed=st.integers(0, 10**6), full=st.booleans())
@settings(max_examples=30, deadline=None)
def test_weighted_low_rank_start_is_the_two_sided_optimum(in_f, out_f, chi, seed, full):
    """Output weights (``(out,)``) or the full metric (``(out, out)``, K-FAC): the low-rank start
    is ``R^-1 [R W L]_r L^-1``, which no cut weighted otherwise beats and L-BFGS cannot improve."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(3 * in_f, in_f, seed=seed)
    cov = x.T @ x / x.shape[0]
    metric = (full_metric(out_f, g) if full
              else output_weights(torch.rand(out_f, generator=g, dtype=torch.float64) ** 4))
    root, inverse = metric_roots(metric)
    root, inverse = (root, inverse) if full else (torch.diag(root), torch.diag(inverse))
    torch.testing.assert_close(root @ inverse, torch.eye(out_f, dtype=torch.float64))
    # equal up to the floor on the metric's eigenvalues (1e-6 of their mean, which is 1)
    torch.testing.assert_close(root @ root, metric if full else torch.diag(metric), atol=1e-5,
                               rtol=0)
    start = kronecker_whitened(Layout.low_rank(in_f, out_f, rows=False).factor_form().decompose(w, None, chi), w, cov,
                               rows=metric)
    assert whitened_start_is_optimal(start, metric)
    r = start.bond_dims[0]  # the bond the layer got
    factor = stable_cholesky(cov)
    u, s, vh = torch.linalg.svd(root @ w @ factor, full_matrices=False)
    best = inverse @ torch.linalg.solve_triangular(factor, (u[:, :r] * s[:r]) @ vh[:r],
                                                   upper=False, left=False)
    torch.testing.assert_close(start.to_dense().detach(), best)
    others = [whitened_svd(w, cov, r)]  # the unweighted cut, and for the full metric its diagonal
    if full:
        others.append(kronecker_whitened(Layout.low_rank(in_f, out_f, rows=False).factor_form().decompose(w, None, r), w,
                                         cov, rows=metric.diagonal().clone()).to_dense().detach())
    for other in others:
        assert metric_error(best, w, cov, metric) <= metric_error(other, w, cov, metric) + 1e-9
    fitted = fit_weighted(start, w, cov, steps=10, rows=metric)
    assert fitted.final_error >= fitted.start_error - 1e-6


@pytest.mark.parametrize("full", [False, True])
def test_weighted_fit_lowers_the_weighted_error_of_an_mpo(full):
    """An MPO whose output is split over two sites has no closed-form weighted start: the fit
    does the weighting, and ends below the fits weighted otherwise on its own objective."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 36, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(200, 36, seed=3)
    cov = x.T @ x / 200
    metric = (full_metric(24, g) if full
              else output_weights(torch.rand(24, generator=g, dtype=torch.float64) ** 6))
    others = {"plain": None, **({"diagonal": metric.diagonal().clone()} if full else {})}
    layers = {k: MPOLinear.from_weight(w, None, 3, 2, in_shape=(6, 6), out_shape=(4, 6))
              for k in (*others, "weighted")}
    assert kronecker_whitened(layers["weighted"], w, cov, rows=metric).to_dense().allclose(
        kronecker_whitened(layers["weighted"], w, cov).to_dense())
    assert not whitened_start_is_optimal(layers["weighted"], metric)
    for name, rows in {**others, "weighted": metric}.items():
        fit_weighted(layers[name], w, cov, steps=60, rows=rows)
    errors = {k: metric_error(m.to_dense().detach(), w, cov, metric) for k, m in layers.items()}
    assert errors["weighted"] < min(errors[k] for k in others)


def test_output_weights_have_mean_one_and_a_floor():
    rows = output_weights(torch.tensor([0.0, 1.0, 3.0]))
    assert rows.dtype == torch.float64 and rows[0] == 1e-6
    torch.testing.assert_close(rows[1:], torch.tensor([0.75, 2.25], dtype=torch.float64))
