"""Sensitivity and entanglement profiling, their cache, and the plots."""

import math

import pytest
import torch
from torch import nn

from models import build
from tensornet_llm import MPOLinear, compactify
from tensornet_llm.compress.calibrate import as_batches
from tensornet_llm.layers.factorize import factorize
from tensornet_llm.compress.entanglement import entanglement_profile, layer_entropy
from tensornet_llm.compress.plots import plot_entanglement, plot_sensitivity
from tensornet_llm.compress.sensitivity import calibration_loss, profile_sensitivity, rank_correlation
from tensornet_llm.compress.targets import find_targets
from test_compactify import assert_unchanged, calibration_batches, snapshot

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def profile_and_model(tmp_path_factory):
    model = build("llama")
    snap = snapshot(model)
    cache = tmp_path_factory.mktemp("profiles")
    profile = profile_sensitivity(model, calibration_batches(2), keep=(0.3, 0.6),
                                  cache_dir=cache, progress=False)
    assert_unchanged(model, snap)
    return profile, model, cache


def test_one_row_per_module_and_keep(profile_and_model):
    profile, model, _ = profile_and_model
    names = [n for n, _ in find_targets(model)[0]]
    assert [(r.name, r.keep) for r in profile.rows] == [(n, k) for n in names for k in (0.3, 0.6)]
    for r in profile.rows:
        assert r.block == ".".join(r.name.split(".")[:3])
        assert r.name == f"{r.block}.{r.module_type}"
        assert r.params_after < r.params_before
        assert r.predicted_delta is not None and r.predicted_delta >= 0
        assert math.isclose(r.delta_loss, r.loss - profile.base_loss, abs_tol=1e-12)


def test_rows_measure_the_module_compressed_alone(profile_and_model):
    profile, model, _ = profile_and_model
    row = profile.rows[3]
    batches = as_batches(calibration_batches(2))
    assert math.isclose(profile.base_loss, calibration_loss(model, batches), rel_tol=1e-6)
    parent_name, _, child = row.name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, child)
    setattr(parent, child, MPOLinear.from_linear(original, chi=row.chi, n_sites=3))
    try:
        assert math.isclose(calibration_loss(model, batches), row.loss, rel_tol=1e-6)
    finally:
        setattr(parent, child, original)


def test_profile_is_cached(profile_and_model, monkeypatch):
    profile, model, cache = profile_and_model
    assert len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr("tensornet_llm.compress.sensitivity.calibration_loss",
                        lambda *a: pytest.fail("recomputed despite the cache"))
    again = profile_sensitivity(model, calibration_batches(2), keep=(0.3, 0.6), cache_dir=cache,
                                progress=False)
    assert again.rows == profile.rows and again.base_loss == profile.base_loss


def test_bad_profile_arguments():
    model = build("llama")
    with pytest.raises(ValueError, match="keep"):
        profile_sensitivity(model, calibration_batches(1), keep=(1.2,), cache_dir=False)
    with pytest.raises(ValueError, match="method"):
        profile_sensitivity(model, calibration_batches(1), method="svd", cache_dir=False)


def test_entanglement_rows_and_known_spectra():
    model = build("llama")
    rows = entanglement_profile(model)
    names = [n for n, _ in find_targets(model)[0]]
    assert sorted({r.name for r in rows}) == sorted(names)
    assert all(len([r for r in rows if r.name == n]) == 2 for n in names)  # 3 sites: 2 bonds
    assert all(0.0 <= r.entropy <= 1.0 + 1e-9 for r in rows)
    # A Kronecker product of site matrices has one singular value across every cut: entropy 0.
    (o1, o2, o3), _ = factorize(60, 3)
    (i1, i2, i3), _ = factorize(48, 3)
    product = nn.Linear(48, 60, bias=False)
    with torch.no_grad():
        kron = torch.kron(torch.kron(torch.randn(o1, i1), torch.randn(o2, i2)), torch.randn(o3, i3))
        product.weight.copy_(kron)
    holder = nn.Module()
    holder.layers = nn.ModuleList([nn.Module()])
    holder.layers[0].proj = product
    (a, b) = entanglement_profile(holder)
    assert a.rank == b.rank == 1 and a.entropy == pytest.approx(0, abs=1e-6)


def test_entanglement_of_compactified_model_uses_its_networks():
    model = build("llama")
    compactify(model, chi=3, progress=False)
    rows = entanglement_profile(model, method="ttns")
    assert {r.method for r in rows} == {"mpo"}  # the layers' own structure
    assert all(r.rank <= 3 for r in rows)
    assert set(layer_entropy(rows)) == {r.name for r in rows}


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(0.9486833, rel=1e-6)
    with pytest.raises(ValueError, match="same length"):
        rank_correlation([1, 2], [1])


def test_plots_are_written(profile_and_model, tmp_path):
    profile, model, _ = profile_and_model
    heat = plot_sensitivity(profile, tmp_path / "sens.png")
    lines = plot_entanglement(entanglement_profile(model), tmp_path / "sub" / "ent.png")
    for path in (heat, lines):
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
    with pytest.raises(ValueError, match="keep=0.9"):
        plot_sensitivity(profile, tmp_path / "x.png", keep=0.9)
