"""fuse_siblings: low-rank layers that read one input run their input sides as one stacked
matmul, with the outputs, parameters, saving, training and compiling of the unfused model."""

import copy
import pickle

import pytest
import torch
import torch._dynamo
from hypothesis import given, strategies as st
from torch._dynamo.utils import counters

from models import build, inputs
from tensornet_llm import (
    compactify, fuse_siblings, load_compactified, save_compactified, unfuse_siblings,
)
from tensornet_llm.errors import ArgumentError
from tensornet_llm.layers import Layout, MPOLinear, SiblingGroup
from tensornet_llm.layers.interpolative import InterpolativeLinear


def low_rank_model(name="llama", layers=2):
    model = build(name, layers=layers)
    compactify(model, chi=6, method="low-rank", progress=False)
    return model


def test_groups_are_found_by_shared_input_and_outputs_do_not_change():
    model = low_rank_model()
    ids = inputs("llama")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    groups = fuse_siblings(model)
    assert sorted(groups) == sorted(
        [tuple(f"model.layers.{b}.self_attn.{p}_proj" for p in "qkv") for b in range(2)]
        + [(f"model.layers.{b}.mlp.gate_proj", f"model.layers.{b}.mlp.up_proj")
           for b in range(2)])
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q._siblings, SiblingGroup) and q._siblings.ranks == [6, 6, 6]
    def matmuls() -> tuple[int, torch.Tensor]:
        """Matmuls of one no-grad forward (``F.linear`` and ``torch.mm``, which the kept-rows
        inference path uses), and its logits."""
        calls = []
        linear, mm = torch.nn.functional.linear, torch.mm
        torch.nn.functional.linear = lambda *a, **k: calls.append(1) or linear(*a, **k)
        torch.mm = lambda *a, **k: calls.append(1) or mm(*a, **k)
        try:
            with torch.no_grad():
                logits = model(ids).logits
            return len(calls), logits
        finally:
            torch.nn.functional.linear, torch.mm = linear, mm

    fused, after = matmuls()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # per block: q/k/v take 1 + 3 matmuls instead of 6, gate/up 1 + 2 instead of 4
    unfuse_siblings(model)
    plain, _ = matmuls()
    assert plain - fused == 2 * (2 + 1)


def test_members_share_one_stacked_tensor_and_the_state_dict_is_unchanged(tmp_path):
    model = low_rank_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_siblings(model)
    attn = model.model.layers[0].self_attn
    v_q, v_k = attn.q_proj.cores[1], attn.k_proj.cores[1]
    assert v_q.untyped_storage().data_ptr() == v_k.untyped_storage().data_ptr()
    assert v_k.data_ptr() == v_q.data_ptr() + v_q.numel() * v_q.element_size()
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    save_compactified(model, tmp_path / "m")  # views into one storage are written as copies
    loaded = load_compactified(tmp_path / "m")
    ids = inputs("llama")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert unfuse_siblings(model) == 4
    assert attn.q_proj._siblings is None
    assert v_q.untyped_storage().data_ptr() != v_k.untyped_storage().data_ptr()
    assert unfuse_siblings(model) == 0


def test_edits_moves_and_new_cores_are_followed():
    model = low_rank_model()
    reference = copy.deepcopy(model)
    fuse_siblings(model)
    ids = inputs("llama")["input_ids"]
    with torch.no_grad():
        for m in (model, reference):  # an in-place edit of one member's factor
            m.model.layers[1].self_attn.k_proj.cores[1].mul_(1.5)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        model.double()  # new tensors: the group stacks them again at the next call
        reference.double()
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-9, atol=1e-9)
        assert model.model.layers[1].self_attn.k_proj._siblings._stacked.dtype == torch.float64
        up = model.model.layers[0].mlp.up_proj
        left = torch.randn(up.out_features, 2, dtype=torch.float64)
        right = torch.randn(2, up.in_features, dtype=torch.float64)
        for m in (model, reference):  # another rank for one member
            m.model.layers[0].mlp.up_proj.append_factors_(left, right)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-9, atol=1e-9)
        assert model.model.layers[0].mlp.up_proj._siblings.ranks == [6, 8]


def test_a_member_called_alone_or_out_of_order_runs_on_its_own():
    torch.manual_seed(0)
    layers = [Layout.low_rank(20, 16).decompose(torch.randn(16, 20), torch.randn(16), r)
              for r in (3, 5, 4)]
    expected = [copy.deepcopy(m) for m in layers]
    SiblingGroup(layers)
    x, other = torch.randn(2, 20), torch.randn(2, 20)
    with torch.no_grad():
        for layer, ref in zip(layers, expected):  # the call order: shared product
            torch.testing.assert_close(layer(x), ref(x))
        for layer, ref in zip(layers[::-1], expected[::-1]):  # reversed: each alone
            torch.testing.assert_close(layer(other), ref(other))
        torch.testing.assert_close(layers[0](x), expected[0](x))
        torch.testing.assert_close(layers[2](other), expected[2](other))  # not the cached input


@given(ranks=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       n_in=st.integers(1, 24), n_out=st.lists(st.integers(1, 24), min_size=4, max_size=4),
       rows=st.sampled_from([(1,), (1, 1), (3,), (2, 5)]), kept_rows=st.booleans())
def test_a_group_gives_each_member_its_own_output(ranks, n_in, n_out, rows, kept_rows):
    """Two-factor and kept-rows members, one token (the matrix-vector path) and several."""
    torch.manual_seed(len(ranks) * 31 + n_in)
    layers = [Layout.low_rank(n_in, o, rows=kept_rows).decompose(torch.randn(o, n_in),
                                                              torch.randn(o), r)
              for r, o in zip(ranks, n_out)]
    assert all(isinstance(layer, InterpolativeLinear) == kept_rows for layer in layers)
    x = torch.randn(*rows, n_in)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        group = SiblingGroup(layers)
        got = [layer(x) for layer in layers]
    assert group.ranks == [layer.bond_dims[0] for layer in layers]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_training_runs_unfused_with_the_same_gradients():
    model, reference = low_rank_model(), low_rank_model()
    fuse_siblings(model)
    model.double().float()  # restacked at the next call, here under inference_mode
    with torch.inference_mode():
        model(inputs("llama")["input_ids"])
    model.train(), reference.train()
    batch = inputs("llama")["input_ids"]
    for m in (model, reference):
        m(batch, labels=batch).loss.backward()
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6, msg=name)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    optimiser.step()  # writes into the stacked tensor through the members' views
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, reference(batch).logits, rtol=1e-5,
                                   atol=1e-5)


def test_copies_run_unfused_and_generate_the_same_tokens():
    model = low_rank_model()
    fuse_siblings(model)
    twin = copy.deepcopy(model)
    pickled = pickle.loads(pickle.dumps(model))
    ids = inputs("llama")["input_ids"][:1]
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for other in (twin, pickled):
        assert all(m._siblings is None for m in other.modules() if isinstance(m, MPOLinear))
        assert torch.equal(other.generate(ids, max_new_tokens=8, do_sample=False,
                                          pad_token_id=0), tokens)


def test_a_fused_model_compiles_without_graph_breaks():
    model = low_rank_model(layers=1)
    fuse_siblings(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        for length in (1, 9):
            ids = torch.randint(2, 90, (1, length))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5,
                                       atol=1e-5)
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_other_architectures_and_bad_input():
    model = low_rank_model("t5")
    groups = fuse_siblings(model)
    assert any(g[-1].endswith("SelfAttention.v") for g in groups), groups
    with pytest.raises(ArgumentError, match="model must be"):
        fuse_siblings("model")
    with pytest.raises(ArgumentError, match="example must be"):
        fuse_siblings(model, example=[1, 2])
    with pytest.raises(ValueError, match="two or more"):
        SiblingGroup([model.get_submodule(groups[0][0])])
