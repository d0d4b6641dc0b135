"""One row order for a gated MLP's kept-rows gate and up layers: the same function, no gathers,
and nothing but ordinary modules (a change of weights, not of code)."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from models import build, inputs
from tensornet_llm import (
    CompactifyConfig, compactify, load_compactified, save_compactified, share_mlp_rows,
)
from tensornet_llm.errors import ArgumentError
from tensornet_llm.layers.low_rank import KeptRowsLinear
from tensornet_llm.layers.shared_rows import shared_row_order


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


def test_dependent_kept_rows_are_refused():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 2, generator=g, dtype=torch.float64)
    u[1] = 2 * u[0]  # rows 0 and 1 cannot both be kept
    with pytest.raises(ValueError, match="not independent"):
        KeptRowsLinear.from_factors(u, torch.randn(2, 5, dtype=torch.float64), None,
                                    stacked=torch.arange(6))


def compressed(name="llama", **config):
    model = build(name)
    compactify(model, chi=6, method="low-rank", progress=False, config=CompactifyConfig(**config))
    return model


def gathers(model, batch):
    """How many ``gather`` calls one forward makes, and its logits."""
    calls = []
    original = torch.Tensor.gather
    torch.Tensor.gather = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        torch.Tensor.gather = original
    return len(calls), logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "mistral"])
def test_compactify_shares_mlp_rows_with_the_outputs_of_own_rows(name):
    shared, own = compressed(name), compressed(name, share_mlp_rows=False)
    batch = inputs(name)
    mlps = [m for m in shared.modules() if hasattr(m, "gate_proj")]
    assert mlps
    for mlp in mlps:  # gate and up in stacked order: no order buffer, no gather
        assert mlp.gate_proj.order is None and mlp.up_proj.order is None
        assert "forward" not in vars(mlp)  # its class's own forward, nothing installed
    shared_gathers, logits = gathers(shared, batch)
    own_gathers, own_logits = gathers(own, batch)
    assert own_gathers - shared_gathers == 2 * len(mlps)
    torch.testing.assert_close(logits, own_logits, rtol=1e-4, atol=1e-4)
    one = {"input_ids": batch["input_ids"][:1, :1]}  # one token (batch-1 decode)
    torch.testing.assert_close(gathers(shared, one)[1], gathers(own, one)[1], rtol=1e-4, atol=1e-4)


def test_shared_rows_train_like_own_rows():
    shared, own = compressed(), compressed(share_mlp_rows=False)
    batch = inputs("llama")
    losses = []
    for model in (shared, own):
        loss = model(**batch).logits.square().mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.kept.weight"):
        torch.testing.assert_close(shared.get_parameter(name).grad, own.get_parameter(name).grad,
                                   rtol=1e-3, atol=1e-6)


def test_an_mlp_that_is_not_the_usual_gated_one_is_left_as_it_was():
    model = compressed(share_mlp_rows=False)
    batch = inputs("llama")
    mlp_class = type(model.model.layers[0].mlp)

    class Permuting(mlp_class):  # its intermediate features are not interchangeable
        def forward(self, x):
            h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
            return self.down_proj(torch.roll(h, 1, dims=-1) + h[..., :1])

    for layer in model.model.layers:
        layer.mlp.__class__ = Permuting
    with torch.no_grad():
        expected = model(**batch).logits
    state = copy.deepcopy(model.state_dict())
    assert share_mlp_rows(model) == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)


def test_shared_rows_survive_save_load_and_streaming(tmp_path):
    from tensornet_llm import compactify_pretrained

    model = compressed()
    batch = inputs("llama")
    count, expected = gathers(model, batch)
    save_compactified(model, tmp_path / "m")
    loaded = load_compactified(tmp_path / "m")
    loaded_count, logits = gathers(loaded, batch)
    assert loaded_count == count
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert loaded.model.layers[0].mlp.gate_proj.order is None
    build("llama").save_pretrained(tmp_path / "source")
    compactify_pretrained(tmp_path / "source", tmp_path / "out", chi=6, method="low-rank",
                          progress=False)
    streamed = load_compactified(tmp_path / "out")
    assert all(m.gate_proj.order is None for m in streamed.modules() if hasattr(m, "gate_proj"))
    torch.testing.assert_close(gathers(streamed, batch)[1], expected, rtol=1e-4, atol=1e-5)
