"""Cross-layer groups with a shared input basis stored as kept rows (issue 19): the same maps
as the plain gauge, ``in_rank^2`` fewer parameters per group, through compactify, training,
save/load, compile and quantization."""

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from models import build, inputs
from test_cross_layer import CALIBRATION, random_group
from torch._dynamo.utils import counters

from tensornet_llm import CompactifyConfig, compactify
from tensornet_llm.compress.sweeps import fit_group
from tensornet_llm.errors import ArgumentError, RankDeficientError
from tensornet_llm.layers.cross_layer import (
    CrossLayerLinear, SharedBases, kept_rows_gauge, plain_members,
)


def members_of(in_basis, cores, kept_rows: bool, dtype=torch.float64):
    """The drop-in members of one group with a shared input basis, in either gauge."""
    out_f, rank = cores[0].shape
    forms = [(None, None, c) for c in cores]
    if kept_rows:
        in_basis, forms = kept_rows_gauge(in_basis, cores)
    shared = SharedBases(in_basis.shape[1], out_f, rank, None, len(cores), dtype=dtype)
    with torch.no_grad():
        shared.in_basis.copy_(in_basis)
    members = []
    for index, (kept, order, core) in enumerate(forms):
        member = CrossLayerLinear(shared, index, bias=True, kept=kept, row_order=order,
                                  dtype=dtype)
        with torch.no_grad():
            member.core.copy_(core)
            member.bias.copy_(torch.linspace(-1, 1, out_f, dtype=dtype))
        members.append(member)
    return members


def group_size(members) -> int:
    return sum(p.numel() for p in members[0].shared.parameters()) + sum(
        m.core.numel() for m in members)


@settings(deadline=None, max_examples=40)
@given(g=st.integers(1, 4), out_f=st.integers(1, 9), in_f=st.integers(1, 12),
       rank=st.integers(1, 12), tokens=st.integers(1, 5))
def test_kept_rows_compute_the_same_maps_with_rank_squared_fewer_parameters(g, out_f, in_f,
                                                                            rank, tokens):
    rank = min(rank, in_f, g * out_f)
    weights, covs = random_group(g, out_f, in_f, seed=g * 100 + out_f * 10 + in_f)
    fit = fit_group(weights, covs, side="input", in_rank=rank, sweeps=0)
    plain = members_of(fit.in_basis, fit.cores, kept_rows=False)
    kept = members_of(fit.in_basis, fit.cores, kept_rows=True)
    assert group_size(plain) - group_size(kept) == rank * rank
    assert sum(m.kept.numel() for m in kept) == rank  # the identity rows, spread over members
    x = torch.randn(tokens, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(plain, kept):
        torch.testing.assert_close(b.to_dense(), a.to_dense(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b(x), a(x), rtol=1e-9, atol=1e-9)
        assert b.core.numel() == 0 or b.core.abs().max() <= 1.1 + 1e-9  # maxvol: well scaled
    for a, b in zip(plain, plain_members(kept)):  # and back, with an orthonormal basis
        torch.testing.assert_close(b.to_dense(), a.to_dense(), rtol=1e-9, atol=1e-9)
        assert b.kept is None
    basis = plain_members(kept)[0].shared.in_basis
    torch.testing.assert_close(basis @ basis.T, torch.eye(rank, dtype=torch.float64))


def test_bad_kept_rows_are_refused_in_one_line():
    shared = SharedBases(6, 4, 3, None, 2)
    with pytest.raises(ArgumentError, match="row_order"):
        CrossLayerLinear(shared, 0, kept=[0], row_order=[0, 1, 2])
    with pytest.raises(ArgumentError, match="kept"):
        CrossLayerLinear(shared, 0, kept=[0, 3], row_order=[0, 1, 2, 3])
    with pytest.raises(ArgumentError, match="both or neither"):
        CrossLayerLinear(shared, 0, kept=[0])
    with pytest.raises(ArgumentError, match="side"):
        CrossLayerLinear(SharedBases(6, 4, 3, 2, 2), 0, kept=[0], row_order=[0, 1, 2, 3])


def kept_model(layers: int = 4, **config):
    model = build("llama", layers=layers)
    report = compactify(model, chi=6, calibration=CALIBRATION, progress=False,
                        config=CompactifyConfig(cross_layer=2, cross_layer_side="input", **config))
    return model, report


def test_compactify_stores_shared_input_bases_as_kept_rows():
    model, report = kept_model()
    plain, plain_report = kept_model(interpolative=False)
    members = [m for m in model.modules() if isinstance(m, CrossLayerLinear)]
    assert members and all(m.kept is not None for m in members[::2])  # one gauge per group
    groups = len({id(m.shared) for m in members})
    assert plain_report.model_params_after - report.model_params_after == groups * 6 * 6
    assert sum(p.numel() for p in model.parameters()) == report.model_params_after
    x = inputs("llama")
    with torch.no_grad():  # the same fit in another gauge
        torch.testing.assert_close(model(**x).logits, plain(**x).logits, rtol=1e-4, atol=1e-4)


def test_twins_whose_stacked_cores_lack_rank_keep_the_plain_form():
    """Identical blocks fitted in closed form at an input rank above out_features: the stacked
    cores [C; C] have rank out_features < r, so no r rows of them are invertible. The gauge
    says so in one line, and compactify keeps those groups plain, with the same maps."""
    in_basis = torch.randn(24, 32, dtype=torch.float64)
    core = torch.randn(16, 24, dtype=torch.float64)
    with pytest.raises(RankDeficientError, match="full column rank 24"):
        kept_rows_gauge(in_basis, [core, core])
    model = build("llama", layers=2)
    with torch.no_grad():
        for a, b in zip(model.model.layers[1].parameters(), model.model.layers[0].parameters()):
            a.copy_(b)
    x = inputs("llama")
    with torch.no_grad():
        ref = model(**x).logits
    compactify(model, chi=10**6, progress=False,
               config=CompactifyConfig(cross_layer=2, cross_layer_side="input", sweeps=0))
    k0 = model.model.layers[0].self_attn.k_proj  # 32 -> 16 at rank 32: [C; C] has rank 16
    assert isinstance(k0, CrossLayerLinear) and k0.shared.core_shape[1] > k0.out_features
    assert k0.kept is None
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_full_rank_kept_rows_reproduce_the_model(size):
    model = build("llama", layers=4)
    x = inputs("llama")
    with torch.no_grad():
        ref = model(**x).logits
    compactify(model, chi=10**6, cross_layer=size, progress=False,
               config=CompactifyConfig(cross_layer_side="input"))
    assert any(m.kept is not None for m in model.modules() if isinstance(m, CrossLayerLinear))
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, ref, rtol=1e-4, atol=1e-4)


def test_kept_rows_train_and_compile():
    """(Save and load: test_cross_layer's round trip, for side="input".)"""
    model, _ = kept_model()
    ids = inputs("llama")["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    a = model.model.layers[0].self_attn.q_proj
    assert a.kept is not None and a.core.grad is not None and a.shared.in_basis.grad is not None
    model.eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    for length in (1, 7):
        ids = torch.randint(2, 90, (1, length))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5,
                                       atol=1e-5)
    assert not counters["graph_break"]
    torch._dynamo.reset()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_rounds_kept_rows_in_the_orthonormal_gauge(bits):
    if bits == 8:
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
    from tensornet_llm import quantize
    from tensornet_llm.layers.quantized import QuantizedLinear
    from tensornet_llm.saving.tensors import is_torchao_tensor
    from tensornet_llm.train.qat import rounding_plan
    from tensornet_llm.train.quantize import low_rank_as_factors

    model, _ = kept_model()
    x = inputs("llama")
    with pytest.raises(ArgumentError, match="low_rank_as_factors"):
        rounding_plan(model, bits)
    converted, _ = kept_model()
    with torch.no_grad():
        ref = model(**x).logits
    assert low_rank_as_factors(converted) > 0
    assert not any(m.kept is not None for m in converted.modules()
                   if isinstance(m, CrossLayerLinear))
    assert rounding_plan(converted, bits)
    with torch.no_grad():
        torch.testing.assert_close(converted(**x).logits, ref, rtol=1e-4, atol=1e-4)
    quantize(model, bits)
    quantize(converted, bits)
    q0, q1 = (model.model.layers[b].self_attn.q_proj for b in (0, 1))
    assert q0.shared is q1.shared  # the group's basis is still one module, quantized once
    basis = q0.shared.input
    assert is_torchao_tensor(basis.weight) if bits == 8 else isinstance(basis, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, converted(**x).logits)
