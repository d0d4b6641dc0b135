"""One row order for a gated MLP's kept-rows gate and up layers: the same weights, layers that
keep their meaning alone, and an MLP that runs without gathers wherever that is valid."""

import copy
import io

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings, strategies as st
from torch._dynamo.utils import counters

from models import build, inputs
from tensornet_llm import (
    CompactifyConfig, compactify, load_compactified, save_compactified, share_mlp_rows,
    unshare_mlp_rows,
)
from tensornet_llm.errors import ArgumentError
from tensornet_llm.layers import gated_mlp
from tensornet_llm.layers.interpolative import InterpolativeLinear
from tensornet_llm.layers.shared_rows import shared_row_order, unordered_outputs_of
from tensornet_llm.layers.siblings import is_fusable


def kept_rows_layer(out_f: int, in_f: int, rank: int, seed: int = 0) -> InterpolativeLinear:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, in_f, generator=g, dtype=torch.float64)
    return InterpolativeLinear.from_weight(weight, torch.randn(out_f, generator=g,
                                                                dtype=torch.float64), rank)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(4, 24), r_a=st.integers(1, 8), r_b=st.integers(1, 8), seed=st.integers(0, 99))
def test_a_shared_order_keeps_nested_independent_rows_for_both_layers(m, r_a, r_b, seed):
    r_a, r_b = min(r_a, m), min(r_b, m)
    g = torch.Generator().manual_seed(seed)
    u_a = torch.randn(m, r_a, generator=g, dtype=torch.float64)
    u_b = torch.randn(m, r_b, generator=g, dtype=torch.float64)
    order = shared_row_order(u_a, u_b)
    assert sorted(order.tolist()) == list(range(m))
    for u in (u_a, u_b):  # each layer's kept rows: the first of its rank's rows of the order
        r = u.shape[1]
        assert torch.linalg.matrix_rank(u[order[:r]]) == r
        coeff = torch.linalg.solve(u[order[:r]], u, left=False)
        assert coeff.abs().max() < 1e3


def test_shared_row_order_refuses_factors_of_different_heights():
    with pytest.raises(ArgumentError, match="one m"):
        shared_row_order(torch.randn(5, 2), torch.randn(6, 2))


@settings(max_examples=20, deadline=None)
@given(out_f=st.integers(3, 20), in_f=st.integers(2, 12), rank=st.integers(1, 6),
       seed=st.integers(0, 99))
def test_new_rows_and_permuted_inputs_keep_the_weight_and_the_forward(out_f, in_f, rank, seed):
    rank = min(rank, out_f, in_f)
    layer = kept_rows_layer(out_f, in_f, rank, seed)
    weight = layer.to_dense().clone()
    x = torch.randn(3, 5, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected = x @ weight.T + layer.bias
    stacked = torch.randperm(out_f, generator=torch.Generator().manual_seed(seed + 1))
    u = layer.factors()[0].detach()
    if torch.linalg.matrix_rank(u[stacked[:rank]]) < rank:
        return  # those rows cannot be kept (tested below)
    layer.arrange_rows_(stacked)
    assert torch.equal(layer._stacked_rows(), stacked)
    columns = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed + 2))
    layer.permute_inputs_(columns)
    torch.testing.assert_close(layer.to_dense(), weight, rtol=1e-9, atol=1e-9)
    for tokens in (x, x[:1, :1]):  # many tokens, and one (its own lean path: batch-1 decode)
        want = tokens @ weight.T + layer.bias
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(layer(tokens), want, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(layer.forward_stored_order(tokens[..., columns]),
                                           want, rtol=1e-9, atol=1e-9)
    one = x[:1, :1].clone().requires_grad_()
    layer(one).sum().backward()  # the one-token path is differentiable
    torch.testing.assert_close(one.grad, weight.sum(0).expand_as(one), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        unordered = unordered_outputs_of(layer, x[..., columns])
        torch.testing.assert_close(unordered[..., layer.row_order], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)  # with autograd
    # the layout rebuilds the permuted layer; appending factors stays exact
    rebuilt = InterpolativeLinear.from_layout(layer.layout(), dtype=torch.float64)
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), expected, rtol=1e-9, atol=1e-9)
    left, right = torch.randn(out_f, 1, dtype=torch.float64), torch.randn(1, in_f, dtype=torch.float64)
    if rank < out_f:
        layer.append_factors_(left, right)
        torch.testing.assert_close(layer.to_dense(), weight + left @ right, rtol=1e-8, atol=1e-8)
    layer.permute_inputs_(None)
    assert layer.input_order is None and is_fusable(layer) and not is_fusable(rebuilt)


def test_arranging_dependent_rows_is_refused_and_changes_nothing():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 2, generator=g, dtype=torch.float64)
    u[1] = 2 * u[0]  # rows 0 and 1 cannot both be kept
    weight = u @ torch.randn(2, 5, generator=g, dtype=torch.float64)
    layer = InterpolativeLinear.from_weight(weight, None, 2)
    state = layer.state()
    with pytest.raises(ValueError, match="not independent"):
        layer.arrange_rows_(torch.arange(6))
    assert all(torch.equal(a, b) for a, b in zip(layer.state(), state))
    with pytest.raises(ValueError, match="permutation"):
        layer.arrange_rows_(torch.tensor([0, 0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="input_order must be a permutation"):
        layer.permute_inputs_(torch.tensor([0, 1, 2, 3, 3]))


def compressed(name="llama", **config):
    model = build(name)
    compactify(model, chi=6, method="low-rank", progress=False, config=CompactifyConfig(**config))
    return model


def shortcut_calls(model, batch, grad=False):
    """How many MLPs took the shortcut in one forward, and its logits."""
    calls = []
    original = gated_mlp.unordered_outputs_of
    gated_mlp.unordered_outputs_of = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.set_grad_enabled(grad):
            logits = model(**batch).logits
    finally:
        gated_mlp.unordered_outputs_of = original
    return len(calls) // 2, logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "mistral"])
def test_compactify_shares_mlp_rows_with_the_outputs_of_own_rows(name, monkeypatch):
    shared, own = compressed(name), compressed(name, share_mlp_rows=False)
    batch = inputs(name)
    mlps = [m for m in shared.modules() if hasattr(m, "gate_proj")]
    assert mlps and all("_shared_mlp_rows" in m.__dict__ for m in mlps)
    for mlp in mlps:
        assert torch.equal(mlp.gate_proj.row_order, mlp.up_proj.row_order)
        assert torch.equal(mlp.down_proj.input_order, mlp.gate_proj._stacked_rows())
    assert not any("_shared_mlp_rows" in m.__dict__ for m in own.modules())
    calls, logits = shortcut_calls(shared, batch)
    assert calls == len(mlps)
    with torch.no_grad():
        torch.testing.assert_close(logits, own(**batch).logits, rtol=1e-4, atol=1e-4)
    # one token (batch-1 decode): every layer's lean path, gate and up without their gathers
    ordered, lean = [], InterpolativeLinear._forward_one_token

    def counted(self, *args, **kwargs):
        ordered.append(kwargs.get("ordered", True))
        return lean(self, *args, **kwargs)

    monkeypatch.setattr(InterpolativeLinear, "_forward_one_token", counted)
    one = batch["input_ids"][:1, :1]
    with torch.no_grad():
        torch.testing.assert_close(shared(input_ids=one).logits, own(input_ids=one).logits,
                                   rtol=1e-4, atol=1e-4)
    assert ordered.count(False) == 2 * len(mlps)
    monkeypatch.undo()
    assert unshare_mlp_rows(shared) == len(mlps)
    assert shortcut_calls(shared, batch)[0] == 0
    torch.testing.assert_close(shortcut_calls(shared, batch)[1], logits, rtol=1e-5, atol=1e-5)


def test_the_shortcut_trains_like_the_mlps_own_forward():
    model = compressed()
    batch = inputs("llama")
    calls, loss = shortcut_calls(model, batch, grad=True)
    assert calls == 2
    loss.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    unshare_mlp_rows(model)
    model(**batch).logits.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_hooks_adapters_and_edits_make_the_mlp_run_its_own_forward():
    model = compressed()
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    mlp = model.model.layers[0].mlp
    seen = []
    hook = mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    calls, logits = shortcut_calls(model, batch)
    assert calls == 1 and len(seen) == 1  # block 0 ran its own forward, and the hook saw it
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    hook.remove()
    # a merge re-arranges the rows of one layer: its MLP runs its own forward until undone
    state = mlp.gate_proj.state()
    left, right = torch.randn(48, 1) * 1e-2, torch.randn(1, 32)
    mlp.gate_proj.append_factors_(left, right)
    assert shortcut_calls(model, batch)[0] == 1
    mlp.gate_proj.restore_(state)
    assert shortcut_calls(model, batch)[0] == 1  # a new arrangement is not trusted blindly
    share_mlp_rows(model, rearrange=False)
    calls, logits = shortcut_calls(model, batch)
    assert calls == 2
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_adapters_on_the_mlp_are_honoured():
    peft = pytest.importorskip("peft")
    from tensornet_llm import lora_config

    model = compressed()
    batch = inputs("llama")
    peft_model = peft.get_peft_model(model, lora_config(r=2, target_modules=["up_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    calls, logits = shortcut_calls(peft_model, batch)
    assert calls == 0
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=1e-4, atol=1e-4)


def test_an_mlp_that_is_not_the_usual_gated_one_keeps_its_forward():
    model = compressed(share_mlp_rows=False)
    batch = inputs("llama")
    mlp_class = type(model.model.layers[0].mlp)

    class Scaled(mlp_class):
        def forward(self, x):
            return 2 * super().forward(x)

    for layer in model.model.layers:
        layer.mlp.__class__ = Scaled
    with torch.no_grad():
        expected = model(**batch).logits
    assert share_mlp_rows(model) == []
    assert shortcut_calls(model, batch)[0] == 0
    torch.testing.assert_close(shortcut_calls(model, batch)[1], expected, rtol=1e-4, atol=1e-4)


def test_shared_rows_survive_save_load_copies_and_pickling(tmp_path):
    model = compressed()
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    save_compactified(model, tmp_path / "m")
    for copied in (load_compactified(tmp_path / "m"), copy.deepcopy(model)):
        calls, logits = shortcut_calls(copied, batch)
        assert calls == 2
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    calls, logits = shortcut_calls(unpickled, batch)
    assert calls == 2
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_the_shortcut_compiles_fullgraph(grad):
    model = compressed()
    batch = inputs("llama")
    with torch.set_grad_enabled(grad):
        expected = model(**batch).logits
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.set_grad_enabled(grad):
        logits = compiled(**batch).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"]


def test_streamed_checkpoints_are_saved_with_shared_rows(tmp_path):
    from tensornet_llm import compactify_pretrained

    build("llama").save_pretrained(tmp_path / "source")
    compactify_pretrained(tmp_path / "source", tmp_path / "out", chi=6, method="low-rank",
                          progress=False)
    streamed = load_compactified(tmp_path / "out")
    batch = inputs("llama")
    calls, logits = shortcut_calls(streamed, batch)
    assert calls == 2
    with torch.no_grad():
        torch.testing.assert_close(logits, compressed()(**batch).logits, rtol=1e-4, atol=1e-5)
