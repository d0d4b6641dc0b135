"""Budgeted chi (compactify(ratio=...)): the allocation and its damage estimates."""

import importlib

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from models import build
from tensornet_llm import (
    CompactifyConfig, MPOLinear, TTNSLinear, compactify, load_compactified, save_compactified,
)
from tensornet_llm.compress.budget import (
    RANK_MULTIPLE, Option, damage, lower_hull, _start_row_errors, allocate, chi_for_params,
    choose, ladder,
)
from tensornet_llm.compress.calibrate import (
    as_batches, collect_covariances, collect_output_gradients, output_gradients,
)
from tensornet_llm.compress.fit import (
    kronecker_whitened, metric_roots, output_weights, stable_cholesky, whitened_svd,
)
from tensornet_llm.layers.layout import Layout
from test_compactify import assert_unchanged, calibration_batches, snapshot


def layers(seed=0):
    torch.manual_seed(seed)
    shapes = [(24, 40), (40, 24), (32, 32), (48, 16)]
    return {f"l{i}": nn.Linear(i_f, o_f, bias=i % 2 == 0) for i, (i_f, o_f) in enumerate(shapes)}


@pytest.mark.parametrize("cls", [MPOLinear, TTNSLinear])
@given(in_f=st.integers(4, 64), out_f=st.integers(4, 64), frac=st.floats(0.05, 1.5))
@settings(max_examples=25, deadline=None)
def test_chi_for_params_is_the_largest_that_fits(cls, in_f, out_f, frac):
    budget = max(1, int(frac * in_f * out_f))
    chi = chi_for_params(cls, in_f, out_f, 3, budget)
    count = lambda c: sum(p.numel() for p in cls(in_f, out_f, c, 3, bias=False, device="meta").cores)
    assert chi == 1 or count(chi) <= budget
    assert count(chi + 1) > budget or count(chi + 1) == count(chi)


@pytest.mark.parametrize("rows", [True, False])
def test_budget_ranks_of_low_rank_layers_are_aligned(rows):
    """Low-rank rungs sit on multiples of RANK_MULTIPLE (below it, as they fit); other layouts
    keep the largest chi that fits."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    options = ladder(linear, [Layout.low_rank(96, 160, rows=rows), Layout(MPOLinear, 3)])
    low = [o.chi for o in options if o.layout is not None and o.layout.is_low_rank]
    assert len(low) >= 5 and all(c % RANK_MULTIPLE == 0 or c < RANK_MULTIPLE for c in low)
    mpo = [o for o in options if o.layout is not None and not o.layout.is_low_rank]
    assert any(o.chi % RANK_MULTIPLE for o in mpo)  # not rounded
    for o in options[1:]:
        assert o.params < 96 * 160 + 160
        assert o.params == o.layout.num_parameters(96, 160, o.chi, True)


def test_lower_hull_is_convex_and_drops_dominated_options():
    opts = [Option(None, 100, 0.0), Option(8, 50, 1.0), Option(6, 40, 1.5), Option(5, 45, 3.0),
            Option(4, 30, 5.0), Option(2, 20, 20.0), Option(3, 35, 9.0)]
    hull = lower_hull(opts)
    assert [o.chi for o in hull] == [None, 8, 6, 4, 2]
    slopes = [(b.damage - a.damage) / (a.params - b.params) for a, b in zip(hull, hull[1:])]
    assert slopes == sorted(slopes)


@pytest.mark.parametrize("cls", [MPOLinear, TTNSLinear])
@given(ratio=st.floats(0.3, 1.0))
@settings(max_examples=8, deadline=None)
def test_budget_respected_within_one_chi_step(cls, ratio):
    modules = layers()
    alloc = allocate(modules, ratio, {n: (cls, 3) for n in modules})
    assert alloc.params_after <= alloc.budget
    # Within one step: no step back up along any module's hull would still fit the budget.
    for name, opts in alloc.options.items():
        hull = lower_hull(opts)
        at = [o.chi for o in hull].index(alloc.chi[name])
        if at > 0:
            assert alloc.params_after + hull[at - 1].params - hull[at].params > alloc.budget
    for name, chi in alloc.chi.items():
        assert chi is None or any(o.chi == chi for o in alloc.options[name])


def test_more_budget_never_predicts_more_damage():
    modules = layers(1)
    damages = [allocate(modules, r, {n: (MPOLinear, 3) for n in modules}).damage
               for r in (0.3, 0.5, 0.7, 0.9, 1.0)]
    assert damages == sorted(damages, reverse=True)
    assert damages[-1] == 0.0


def test_output_gradients_match_autograd():
    model = build("llama")
    batches = as_batches(calibration_batches(2))
    name = "model.layers.1.mlp.up_proj"
    module = model.get_submodule(name)
    grads = collect_output_gradients(model, batches, {name: module})
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    handle = module.register_forward_hook(keep)
    total, count = torch.zeros(module.out_features, dtype=torch.float64), 0
    for batch in batches:
        out = model(**batch, labels=batch["input_ids"])
        (out.loss * batch["input_ids"].numel()).backward()
        g = outs[-1].grad.reshape(-1, module.out_features).double()
        total += g.pow(2).sum(0)
        count += g.shape[0]
    handle.remove()
    torch.testing.assert_close(grads[name], total / count, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("calibrated", [False, True])
def test_compactify_ratio_keeps_that_fraction(calibrated):
    model = build("llama")
    report = compactify(model, ratio=0.5, progress=False, fit_steps=5,
                        calibration=calibration_batches(2) if calibrated else None)
    assert report.ratio == 0.5
    assert 0.4 <= report.kept_fraction <= 0.5
    before = sum(p.numel() for p in build("llama").parameters())
    assert report.model_params_after == sum(p.numel() for p in model.parameters()) < before
    assert "ratio=0.5" in str(report)
    with torch.no_grad():
        assert torch.isfinite(model(calibration_batches(1)[0]).logits).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.5, "chi": 8}, "exclusive"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": "half"}, "ratio"),
        ({"ratio": 0.001}, "ratio=0.001"),
    ],
)
def test_bad_ratio_leaves_model_untouched(kwargs, match):
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        compactify(model, progress=False, **kwargs)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("calibrated", [False, True])
def test_min_saving_compresses_fewer_modules_further(calibrated):
    """Every module the budget compresses keeps at most 1 - min_saving of its parameters."""
    calibration = calibration_batches(2) if calibrated else None
    reports = {}
    for saving in (0.0, 0.5):
        model = build("llama")
        reports[saving] = compactify(model, ratio=0.8, progress=False, fit_steps=2,
                                     calibration=calibration,
                                     config=CompactifyConfig(min_saving=saving))
        assert reports[saving].kept_fraction <= 0.8
    assert all(layer.params_after <= 0.5 * layer.params_before for layer in reports[0.5].layers)
    assert any(layer.params_after > 0.5 * layer.params_before for layer in reports[0.0].layers)
    assert 0 < len(reports[0.5].layers) < len(reports[0.0].layers)


@pytest.mark.parametrize("max_keep", [0.3, 0.6, 1.0])
def test_ladder_offers_nothing_above_max_keep(max_keep):
    linear = nn.Linear(48, 80)
    options = ladder(linear, [Layout.low_rank(48, 80), Layout(MPOLinear, 3)], max_keep=max_keep)
    dense = 48 * 80 + 80
    assert options[0].chi is None and options[0].params == dense
    assert len(options) > 3 and all(o.params <= max_keep * dense for o in options[1:])


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 0.8, "min_saving": 1.0}, "min_saving must be"),
    ({"ratio": 0.8, "min_saving": -0.1}, "min_saving must be"),
    ({"ratio": 0.8, "min_saving": True}, "min_saving must be"),
    ({"chi": 4, "min_saving": 0.3}, "give ratio"),
    ({"ratio": 0.8, "call_cost": -1}, "call_cost must be"),
    ({"ratio": 0.8, "call_cost": float("inf")}, "call_cost must be"),
    ({"ratio": 0.8, "call_cost": True}, "call_cost must be"),
    ({"ratio": 0.8, "call_cost": "1e5"}, "call_cost must be"),
    ({"chi": 4, "call_cost": 100}, "give ratio"),
    ({"ratio": 0.8, "call_cost": 100, "cross_layer": 2}, "cross_layer"),
])
def test_bad_budget_option_leaves_model_untouched(kwargs, match):
    """min_saving and call_cost: bad values, or either without a budget, fail before any
    module changes."""
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        compactify(model, progress=False, config=CompactifyConfig(**kwargs))
    assert_unchanged(model, snap)


# ----- layouts: the budget chooses between a 3-site MPO and the low-rank factorisation ----------

@given(out_f=st.integers(2, 40), in_f=st.integers(2, 40), chi=st.integers(1, 12))
@settings(max_examples=25, deadline=None)
def test_low_rank_layout_is_the_truncated_svd(out_f, in_f, chi):
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    r = min(chi, in_f, out_f)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    # Stored as two factors, r (in + out) parameters; as kept rows, r^2 fewer for the same cut.
    for rows, count in ((False, r * (in_f + out_f)), (True, r * (in_f + out_f - r))):
        layout = Layout.low_rank(in_f, out_f, rows=rows)
        layer = layout.decompose(w, None, chi)
        torch.testing.assert_close(layer.to_dense(), (u[:, :r] * s[:r]) @ vh[:r])
        assert layer.num_parameters == layout.num_parameters(in_f, out_f, chi, False) == count
        assert layout.name == "low-rank" and layout.factor_form().cls is MPOLinear
    assert Layout(MPOLinear, 3).name == "mpo"


@given(out_f=st.integers(2, 30), in_f=st.integers(2, 30), seed=st.integers(0, 5),
       low_rank=st.booleans())
@settings(max_examples=15, deadline=None)
def test_start_row_errors_are_the_row_norms_of_the_start_error(out_f, in_f, seed, low_rank):
    """The budget's per-chi damages come from the squared row norms of ``(W - start) L``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(4 * in_f, in_f, generator=g, dtype=torch.float64) * torch.rand(
        in_f, generator=g, dtype=torch.float64)
    cov = x.T @ x / x.shape[0]
    factor = stable_cholesky(cov)
    layout = Layout.low_rank(in_f, out_f) if low_rank else Layout(MPOLinear, 2)
    chis = [1, 2, 3, min(in_f, out_f)]
    rows = _start_row_errors(layout, w, chis, cov, factor)
    for chi, row in zip(chis, rows):
        if low_rank:
            start = whitened_svd(w, cov, chi)
        else:
            probe = layout.cls(in_f, out_f, chi, 2, device="meta")
            start = kronecker_whitened(probe, w, cov)
            start = start.to_dense() if start is not None else (
                layout.decompose(w @ factor, None, chi).to_dense()
                - w @ factor) @ torch.linalg.inv(factor) + w
        torch.testing.assert_close(row, ((w - start) @ factor).pow(2).sum(1))


def structured(kind, seed):
    """A 32 x 32 linear whose weight is exactly rank 2 or exactly an MPO of bond 1 (4 x 8 sites)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "low-rank":
        w = torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g)
    else:  # W[(o1 o2), (i1 i2)] = A[o1, i1] B[o2, i2]: a Kronecker product
        w = torch.kron(torch.randn(4, 4, generator=g), torch.randn(8, 8, generator=g))
    lin = nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("calibrated", [False, True])
def test_budget_picks_the_layout_that_fits_the_weight(calibrated):
    modules = {f"{kind}{s}": structured(kind, s) for kind in ("low-rank", "kron") for s in (0, 1)}
    mpo = Layout(MPOLinear, 2, (4, 8), (4, 8))
    offered = {n: [mpo, Layout.low_rank(32, 32)] for n in modules}
    covs = {n: torch.eye(32, dtype=torch.float64) for n in modules} if calibrated else None
    alloc = allocate(modules, 0.3, offered, covs)
    for name in modules:
        assert alloc.layout[name].name == ("low-rank" if name.startswith("low-rank") else "mpo")
    assert alloc.damage < 1e-8
    only_mpo = allocate(modules, 0.3, {n: [mpo] for n in modules}, covs)
    assert only_mpo.damage > 1e-3  # the rank-2 weights are no bond-1 Kronecker products


def test_compactify_offers_low_rank_only_when_asked(tmp_path, monkeypatch):
    cm = importlib.import_module("tensornet_llm.compress.surgery")  # where layers are fitted
    fits = []
    original = cm.fit_weighted
    monkeypatch.setattr(cm, "fit_weighted", lambda layer, *a, **k: fits.append(layer) or
                        original(layer, *a, **k))
    batches = calibration_batches(2)
    methods = {}
    for low_rank in (False, True):
        model = build("llama")
        fits.clear()
        report = compactify(model, config=CompactifyConfig(ratio=0.5, low_rank=low_rank,
                                                           fit_steps=3, slim_mlp=False),
                            calibration=batches,
                            progress=False)
        methods[low_rank] = {r.method for r in report.layers}
        assert 0.4 <= report.kept_fraction <= 0.5
        # A low-rank layer starts at its weighted optimum (whitened SVD): only the others fit.
        assert len(fits) == sum(r.method != "low-rank" for r in report.layers)
    assert methods[False] == {"mpo"}
    assert "low-rank" in methods[True]
    # Low-rank layers are 2-site MPOs: they save and load like any other.
    loaded = load_compactified(save_compactified(model, tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[0]).logits, model(batches[0]).logits)


@given(out_f=st.integers(2, 30), in_f=st.integers(2, 30), seed=st.integers(0, 5))
@settings(max_examples=10, deadline=None)
def test_weighted_start_row_errors_are_the_row_norms_of_the_weighted_start(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    x = torch.randn(4 * in_f, in_f, generator=g, dtype=torch.float64)
    cov = x.T @ x / x.shape[0]
    factor = stable_cholesky(cov)
    grads = torch.randn(2 * out_f, out_f, generator=g, dtype=torch.float64)
    layout = Layout.low_rank(in_f, out_f, rows=False)
    chis = [1, 2, min(in_f, out_f)]
    # the diagonal metric (weights per output): rows of E L; the full one (K-FAC,
    # output_metric="full"): rows of R E L, R = M^(1/2)
    for rows in (output_weights(torch.rand(out_f, generator=g, dtype=torch.float64) ** 3),
                 output_weights(grads.T @ grads)):
        root = metric_roots(rows)[0] if rows.dim() == 2 else torch.eye(out_f, dtype=w.dtype)
        for chi, row in zip(chis, _start_row_errors(layout, w, chis, cov, factor, rows)):
            start = kronecker_whitened(layout.factor_form().decompose(w, None, chi), w, cov, rows=rows)
            torch.testing.assert_close(row, (root @ (w - start.to_dense()) @ factor).pow(2).sum(1))


def test_full_metric_damage_is_the_kfac_estimate_for_every_layout():
    """With ``E[g g^T]`` the budget prices a network by ``0.5 tr(E_L^T E[g g^T] E_L)`` of the
    start it fits from (``E_L = (W - W_hat) L``), for the low-rank and a 3-site layout."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 36, generator=g, dtype=torch.float64)
    x = torch.randn(120, 36, generator=g, dtype=torch.float64)
    cov = x.T @ x / 120
    factor = stable_cholesky(cov)
    grads = torch.randn(60, 24, generator=g, dtype=torch.float64) @ torch.randn(
        24, 24, generator=g, dtype=torch.float64)
    second = grads.T @ grads / 60
    rows = output_weights(second)
    for layout in (Layout.low_rank(36, 24, rows=False), Layout(MPOLinear, 3)):
        for chi, row in zip([2, 5], _start_row_errors(layout, w, [2, 5], cov, factor, rows)):
            start = kronecker_whitened(layout.factor_form().decompose(w, None, chi), w, cov, rows=rows)
            e = (w - start.to_dense().detach()) @ factor
            expected = 0.5 * float(torch.trace(e.T @ second @ e))
            assert damage(row, 0.0, second) == pytest.approx(expected, rel=1e-6)


def test_compactify_fits_what_the_budget_ranks_by():
    """With loss gradients each low-rank layer is the two-sided cut ``D^(1/2) W L`` (D: the
    gradient's second moment at its output); ``weigh_outputs=False`` gives SVD-LLM's cut."""
    batches = calibration_batches(2)
    name = "model.layers.0.mlp.up_proj"  # block 0: its inputs are the dense model's
    dense = build("llama")
    module = dense.get_submodule(name)
    grads = collect_output_gradients(dense, as_batches(batches), {name: module})
    cov = collect_covariances(dense, as_batches(batches), {name: module}).covariance(name)
    cuts = {}
    for weigh in (True, False):
        model = build("llama")
        report = compactify(model, config=CompactifyConfig(  # up_proj's rows in output order
            ratio=0.5, method="low-rank", weigh_outputs=weigh, share_mlp_rows=False,
            slim_mlp=False),
            calibration=batches, progress=False)
        assert any("Gauss-Newton loss estimate" in n for n in report.notes) == weigh
        layer = model.get_submodule(name)
        rows = output_weights(grads[name]) if weigh else None
        expected = kronecker_whitened(Layout.low_rank(module.in_features, module.out_features, rows=False)
                                      .factor_form().decompose(module.weight.detach(), None,
                                                 layer.bond_dims[0]),
                                      module.weight.detach(), cov, rows=rows)
        torch.testing.assert_close(layer.to_dense(), expected.to_dense(), rtol=1e-4, atol=1e-5)
        cuts[weigh] = layer.to_dense()
    assert not torch.allclose(cuts[True], cuts[False], atol=1e-4)
    with pytest.raises(ValueError, match="weigh_outputs"):
        compactify(build("llama"), config=CompactifyConfig(ratio=0.5, weigh_outputs="yes"),
                   progress=False)
    with pytest.raises(ValueError, match="output_metric"):
        compactify(build("llama"), config=CompactifyConfig(ratio=0.5, output_metric="kfac"),
                   progress=False)


def test_full_output_metric_fits_the_kfac_cut():
    """``output_metric="full"``: each low-rank layer is the cut of ``M^(1/2) W L`` with ``M`` the
    whole second moment ``E[g g^T]`` of the loss gradient at its output."""
    batches = calibration_batches(2)
    name = "model.layers.0.self_attn.q_proj"  # block 0: its inputs are the dense model's
    dense = build("llama")
    module = dense.get_submodule(name)
    grads, _ = output_gradients(dense, as_batches(batches), {name: module}, full=True)
    diagonal = collect_output_gradients(dense, as_batches(batches), {name: module})
    torch.testing.assert_close(grads[name].diagonal(), diagonal[name])
    cov = collect_covariances(dense, as_batches(batches), {name: module}).covariance(name)
    model = build("llama")
    report = compactify(model, config=CompactifyConfig(
        ratio=0.5, method="low-rank", output_metric="full"), calibration=batches, progress=False)
    assert any("K-FAC" in n for n in report.notes)
    layer = model.get_submodule(name)
    cuts = {}
    for metric in ("full", "diagonal"):
        rows = output_weights(grads[name] if metric == "full" else diagonal[name])
        cuts[metric] = kronecker_whitened(
            Layout.low_rank(module.in_features, module.out_features, rows=False).factor_form().decompose(
                module.weight.detach(), None, layer.bond_dims[0]),
            module.weight.detach(), cov, rows=rows).to_dense()
    torch.testing.assert_close(layer.to_dense(), cuts["full"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cuts["full"], cuts["diagonal"], atol=1e-4)


@pytest.mark.parametrize("cross_layer", [None, 2])
def test_the_planning_stages_show_progress_before_the_layers(cross_layer, capsys):
    """The budget pass (statistics, loss gradients, pricing every layout) takes minutes on a
    real model: each stage has a bar, shown before compactify's own."""
    model = build("llama")
    compactify(model, ratio=0.5, calibration=calibration_batches(), cross_layer=cross_layer,
               progress=True)
    err = capsys.readouterr().err
    stages = ["budget: input statistics", "budget: loss gradients", "budget: pricing layouts"]
    where = [err.find(s) for s in stages] + [err.find("compactify")]
    assert -1 not in where and where == sorted(where), err[:500]
    compactify(build("llama"), ratio=0.5, calibration=calibration_batches(), progress=False)
    assert capsys.readouterr().err == ""


def test_a_ladder_whose_dense_rung_is_dominated_starts_below_it():
    # "a" loses nothing at half its parameters (a rung of no damage), so the budget has them
    # without cutting "b"; counting "a" as dense would cut "b" for nothing
    ladders = {"a": [Option(None, 100, 0.0), Option(8, 50, 0.0)],
               "b": [Option(None, 100, 0.0), Option(8, 60, 1.0), Option(4, 20, 5.0)]}
    allocation = choose(ladders, 0.8, "fisher")
    assert allocation.chi == {"a": 8, "b": None}
    assert allocation.params_after == 150 and allocation.damage == 0.0


# ----- call_cost: the budget weighs each choice by its parameters and its calls -----------------

def _two_ladders():
    """Two modules of 1,000 parameters: ``a`` cut low rank (two calls) to 800 for damage 1,
    ``b`` slimmed (one call) to 800 for damage 1.5."""
    return {"a": [Option(None, 1000, 0.0), Option(10, 800, 1.0, calls=2)],
            "b": [Option(None, 1000, 0.0), Option(None, 800, 1.5, width=8)]}


@pytest.mark.parametrize("call_cost, cut", [(0, "a"), (100, "b"), (300, "b")])
def test_call_cost_prefers_the_choices_with_fewer_calls(call_cost, cut):
    """At call_cost 0 the least damage wins; at 100, ``a``'s cut saves 100 of cost for damage 1
    and ``b``'s 200 for 1.5, so ``b`` is cut; at 300 ``a``'s cut costs more than dense and
    leaves its hull. The parameters kept never exceed the budget."""
    allocation = choose(_two_ladders(), 0.9, "fisher", call_cost)
    assert allocation.params_after <= allocation.budget == 1800
    assert {n for n, o in allocation.chosen.items() if o.params < 1000} == {cut}
    assert len(lower_hull(_two_ladders()["a"], call_cost)) == (1 if call_cost >= 200 else 2)


_rungs = st.lists(st.tuples(st.integers(1, 999), st.floats(0.0, 10.0), st.integers(1, 3)),
                  min_size=1, max_size=6)


@given(ladders=st.lists(_rungs, min_size=1, max_size=5), call_cost=st.floats(0, 2000),
       ratio=st.floats(0.05, 1.0))
@settings(max_examples=60, deadline=None)
def test_call_cost_allocation_keeps_the_ratio_on_each_cost_hull(ladders, call_cost, ratio):
    """Whatever the call cost, the parameters kept fit the ratio, and every module's choice
    lies on its (cost, damage) hull: nothing cheaper does less damage."""
    options = {f"m{i}": [Option(None, 1000, 0.0)] + [Option(1, p, d, calls=c) for p, d, c in rungs]
               for i, rungs in enumerate(ladders)}
    hulls = {n: lower_hull(o, call_cost) for n, o in options.items()}
    if sum(h[-1].params for h in hulls.values()) > ratio * 1000 * len(options):
        with pytest.raises(ValueError, match="call_cost below" if call_cost else "use ratio"):
            choose(options, ratio, "fisher", call_cost)
        return
    allocation = choose(options, ratio, "fisher", call_cost)
    assert allocation.params_after <= allocation.budget
    for name, option in allocation.chosen.items():
        assert option in hulls[name]
        assert not any(o.cost(call_cost) <= option.cost(call_cost) and o.damage < option.damage
                       for o in options[name])


def test_compactify_call_cost_cuts_low_rank_only_where_it_saves_a_call():
    """Tiny LLaMA, ratio 0.8 with calibration: at call_cost 0 the budget cuts some modules low
    rank by fewer parameters than a call costs; with that call cost every low-rank layer saves
    more than it, the rest coming from slim MLPs and fewer heads, and the ratio still holds."""
    from tensornet_llm.layers.low_rank import FactoredLinear

    calibration, cost = calibration_batches(2), 400
    savings = {}
    for call_cost in (0, cost):
        model = build("llama")
        report = compactify(model, ratio=0.8, progress=False, fit_steps=0,
                            calibration=calibration, config=CompactifyConfig(call_cost=call_cost))
        assert report.kept_fraction <= 0.8
        assert any("call_cost" in note for note in report.notes) == bool(call_cost)
        savings[call_cost] = [r.params_before - r.params_after for r in report.layers
                              if isinstance(model.get_submodule(r.name), FactoredLinear)]
    assert any(s <= cost for s in savings[0])
    assert savings[cost] and all(s > cost for s in savings[cost])
