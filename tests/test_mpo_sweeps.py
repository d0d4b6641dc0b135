"""DMRG-style sweeps for one MPO layer: exact at full bond dimension, never worse after any
local update, better than the whitened start when the covariance is not a Kronecker product."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tensornet_llm.compress.fit import kronecker_whitened, weighted_error
from tensornet_llm.compress.mpo_sweeps import sweep_mpo
from tensornet_llm.errors import ArgumentError
from tensornet_llm.layers.mpo import MPOLinear
from tensornet_llm.layers.ttns import TTNSLinear


def problem(out_shape, in_shape, seed=0, kron=False):
    """A weight with a decaying spectrum and a covariance with correlated inputs (not a
    Kronecker product of per-site factors unless ``kron``)."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = torch.Size(out_shape).numel(), torch.Size(in_shape).numel()
    u = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))[0]
    k = min(out_f, in_f)
    weight = (u[:, :k] * torch.linspace(1, 0.05, k, dtype=torch.float64)) @ v[:, :k].T
    if kron:
        cov = torch.ones(1, 1, dtype=torch.float64)
        for d in in_shape:
            a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
            cov = torch.kron(cov, a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64))
    else:
        x = torch.randn(4 * in_f, in_f, generator=g, dtype=torch.float64)
        x = x * torch.logspace(0, -1.5, in_f, dtype=torch.float64)  # uneven input scales
        cov = x.T @ x / x.shape[0]
    return weight, cov


def layer_for(weight, out_shape, in_shape, chi, cls=MPOLinear):
    return cls.from_weight(weight, None, chi, len(out_shape), in_shape=in_shape,
                           out_shape=out_shape).double()


@pytest.mark.parametrize("two_site", [False, True])
def test_full_bond_dimension_reaches_the_weight_from_any_start(two_site):
    out_shape, in_shape = (2, 3, 2), (2, 2, 3)
    weight, cov = problem(out_shape, in_shape)
    layer = layer_for(weight, out_shape, in_shape, chi=64)
    with torch.no_grad():
        for c in layer.cores:
            c.copy_(torch.randn_like(c))  # nowhere near the weight
    result = sweep_mpo(layer, weight, cov, sweeps=3, two_site=two_site, cg_steps=200)
    assert result.start_error > 0.5
    assert result.final_error < 1e-6
    assert weighted_error(layer.to_dense(), weight, cov) < 1e-6


@pytest.mark.parametrize("two_site", [False, True])
def test_every_local_update_lowers_the_error_and_the_layer_holds_the_result(two_site):
    out_shape, in_shape = (4, 3, 4), (3, 4, 2)
    weight, cov = problem(out_shape, in_shape, seed=1)
    layer = layer_for(weight, out_shape, in_shape, chi=5)
    dims = layer.bond_dims
    result = sweep_mpo(layer, weight, cov, sweeps=2, two_site=two_site)
    history = result.history
    assert len(history) == len(result.seconds) > 1
    assert all(b <= a * (1 + 1e-9) for a, b in zip(history, history[1:]))
    assert result.final_error < result.start_error
    assert layer.bond_dims == dims  # the budget's bond dimensions are kept
    assert weighted_error(layer.to_dense(), weight, cov) == pytest.approx(result.final_error,
                                                                          rel=1e-6)
    if two_site:
        assert set(result.discarded) == set(range(len(dims)))
        assert all(0 <= d < 1 for d in result.discarded.values())


def test_sweeps_improve_on_the_whitened_start_unless_the_covariance_is_kronecker():
    out_shape, in_shape = (4, 4, 3), (3, 2, 4)
    for kron in (False, True):
        weight, cov = problem(out_shape, in_shape, seed=2, kron=kron)
        layer = kronecker_whitened(layer_for(weight, out_shape, in_shape, chi=4),
                                   weight, cov)
        start = weighted_error(layer.to_dense(), weight, cov)
        result = sweep_mpo(layer, weight, cov, sweeps=2, cg_steps=20)
        assert result.start_error == pytest.approx(start, rel=1e-9)
        if kron:  # TT-SVD of the whitened weight is near-optimal there; sweeps polish it
            assert result.final_error <= start * (1 + 1e-9)
        else:
            assert result.final_error < 0.99 * start


@given(sites=st.integers(2, 4), chi=st.integers(1, 6), seed=st.integers(0, 50),
       two_site=st.booleans())
def test_sweeps_never_end_worse_for_any_shape(sites, chi, seed, two_site):
    g = torch.Generator().manual_seed(seed)
    out_shape = tuple(int(d) for d in torch.randint(1, 4, (sites,), generator=g))
    in_shape = tuple(int(d) for d in torch.randint(1, 4, (sites,), generator=g))
    weight, cov = problem(out_shape, in_shape, seed=seed)
    layer = layer_for(weight, out_shape, in_shape, chi=chi)
    start = weighted_error(layer.to_dense(), weight, cov)
    result = sweep_mpo(layer, weight, cov, sweeps=1, two_site=two_site, cg_steps=4)
    assert result.final_error <= start * (1 + 1e-9) + 1e-12
    assert weighted_error(layer.to_dense(), weight, cov) == pytest.approx(
        result.final_error, rel=1e-6, abs=1e-9)


def test_bad_input_is_refused_before_any_work():
    weight, cov = problem((2, 3), (3, 2))
    layer = layer_for(weight, (2, 3), (3, 2), chi=2)
    with pytest.raises(ArgumentError, match="weight must be"):
        sweep_mpo(layer, weight[:, :3], cov)
    with pytest.raises(ArgumentError, match="cov must be"):
        sweep_mpo(layer, weight, cov[:3, :3])
    with pytest.raises(ArgumentError, match="sweeps must be"):
        sweep_mpo(layer, weight, cov, sweeps=-1)
    with pytest.raises(ArgumentError, match="MPOLinear"):
        sweep_mpo(layer_for(weight, (2, 3), (3, 2), chi=2, cls=TTNSLinear), weight, cov)
    padded = MPOLinear(5, 7, 2, 2).double()
    with pytest.raises(ArgumentError, match="unpadded"):
        sweep_mpo(padded, torch.randn(7, 5, dtype=torch.float64),
                  torch.eye(5, dtype=torch.float64))
