"""torch.compile all the way: every layer kind compiles with fullgraph=True, forward and backward,
equal to eager, one graph per dispatch regime at most, and whole models generate compiled."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from models import build
from tensornet_llm import MPOLinear, TTNSLinear, compactify, quantize
from tensornet_llm.layers import Layout
from tensornet_llm.layers.quantized import QuantizedTensorNetworkLinear


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def layer_kinds():
    torch.manual_seed(0)
    w, b = torch.randn(48, 40), torch.randn(48)
    return {
        "mpo": MPOLinear.from_weight(w, b, chi=5, n_sites=3),
        "ttns": TTNSLinear.from_weight(w, b, chi=5, n_sites=4),
        "low-rank": Layout.low_rank(40, 48).decompose(w, b, 6),  # stored as kept rows
        "low-rank factors": Layout.low_rank(40, 48, rows=False).decompose(w, b, 6),
        "padded": MPOLinear.from_weight(torch.randn(50, 7), None, chi=3, n_sites=3),
    }


def graphs() -> int:
    return counters["stats"].get("unique_graphs", 0)


@pytest.mark.parametrize("kind", ["mpo", "ttns", "low-rank", "low-rank factors", "padded",
                                  "quantized"])
def test_every_layer_kind_compiles_fullgraph_forward_and_backward(kind):
    layer = layer_kinds()["mpo" if kind == "quantized" else kind]
    if kind == "quantized":
        layer = QuantizedTensorNetworkLinear.from_module(layer, 8, None)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    for rows in (1, 3, 17, 300, 2048):
        x = torch.randn(rows, layer.in_features, requires_grad=True)
        y = compiled(x)
        torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-4)
        if params:  # backward through the compiled graph equals eager's
            grads = torch.autograd.grad(y.square().sum(), [x, *params])
            eager = torch.autograd.grad(layer(x).square().sum(), [x, *params])
            for a, e in zip(grads, eager):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)
    regimes = len(layer.dispatch_table().regimes) if hasattr(layer, "dispatch_table") else 1
    assert not counters["graph_break"]
    # dynamic shapes: one graph per regime of the dispatch table at most (two nn.Linear: one),
    # plus the one for a single row, which Dynamo always specialises (decode's shape)
    assert 1 <= graphs() <= regimes + 1, (graphs(), regimes)


def test_the_compiled_layer_follows_its_strategy_regimes():
    layer = layer_kinds()["mpo"]
    layer.strategy = "dense"
    assert [r.strategy for r in layer.dispatch_table().regimes] == ["dense"]
    compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=True)
    for rows in (1, 5, 900):
        torch.testing.assert_close(compiled(torch.ones(rows, 40)), layer(torch.ones(rows, 40)))
    assert graphs() <= 2  # any number of rows; one row is specialised


@pytest.mark.parametrize("method", ["mpo", "ttns", "low-rank"])
def test_a_compactified_model_compiles_fullgraph_for_every_prompt_length(method):
    model = build("llama", layers=1)
    if method == "low-rank":
        compactify(model, ratio=0.5, progress=False)
    else:
        compactify(model, chi=4, method=method, n_sites=3 if method == "mpo" else 4,
                   progress=False)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    for length in (1, 2, 7, 33, 64, 130):
        ids = torch.randint(2, 90, (1, length))
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"]
    regimes = max((len(m.dispatch_table().regimes) for m in model.modules()
                   if hasattr(m, "dispatch_table")), default=1)
    assert graphs() <= regimes + 1, graphs()  # + the single-token graph


def test_generate_with_a_static_cache_and_a_compiled_forward():
    model = build("llama", layers=1)
    compactify(model, chi=4, progress=False)
    ids = torch.randint(2, 90, (1, 6))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager", dynamic=True)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(out, expected)
    assert not counters["graph_break"]


def test_quantized_model_compiles():
    pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = build("llama", layers=1)
    compactify(model, chi=4, progress=False)
    quantize(model, bits=8)
    ids = torch.randint(2, 90, (1, 9))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"]


def test_inductor_compiles_a_low_rank_and_an_mpo_layer():
    """The real compiler (C++ code generation), once, on the two commonest layers."""
    kinds = layer_kinds()
    for kind in ("low-rank", "mpo"):
        layer = kinds[kind]
        compiled = torch.compile(layer, fullgraph=True)
        for rows in (9, 1):  # one token specialises a graph of its own
            x = torch.randn(rows, 40)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)
