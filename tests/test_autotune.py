"""autotune: measured strategy choice per layer shape, followed by "auto" afterwards."""

import pytest
import torch

from models import build, inputs
from tensornet_llm import MPOLinear, TTNSLinear, autotune, compactify, quantize
from tensornet_llm.layers import contract
from tensornet_llm.layers.contract import batch_bucket, clear_plan_cache, get_plan, tuned_strategy


@pytest.fixture(autouse=True)
def _forget_measurements():
    clear_plan_cache()
    yield
    clear_plan_cache()


def _count_rebuilds(monkeypatch) -> list[int]:
    """Count calls of the dense strategy's weight rebuild inside tn_linear."""
    calls = [0]
    original = contract.rebuild

    def counting(plan, cores, *args):
        calls[0] += 1
        return original(plan, cores, *args)

    monkeypatch.setattr(contract, "rebuild", counting)
    return calls


@pytest.mark.parametrize("cls", [MPOLinear, TTNSLinear])
def test_auto_follows_the_measurement_not_the_model(cls, monkeypatch):
    layer = cls(4096, 4096, 8, n_sites=4)
    assert get_plan(layer.spec, 1).choose(1) == "network"  # what the cost model says
    x = torch.randn(1, 4096)
    expected = layer(x)
    rebuilds = _count_rebuilds(monkeypatch)
    # Pretend the machine measured the other way round: auto must now rebuild the weight.
    contract.record_strategy(layer.spec, 1, "cpu", torch.float32, "dense")
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    assert rebuilds[0] == 1
    layer(torch.randn(3, 4096))  # another bucket (4): back to the cost model, the network
    assert rebuilds[0] == 1
    clear_plan_cache()
    layer(x)
    assert rebuilds[0] == 1 and tuned_strategy(layer.spec, 1, "cpu", torch.float32) is None


def test_rows_record_the_faster_strategy_per_bucket():
    layer = MPOLinear(96, 160, 6, n_sites=3)
    rows = autotune(layer, batch_sizes=[1, 5, 8, 100], repeats=1, min_seconds=0)
    assert [r.batch for r in rows] == [1, 8, 128]  # 5 and 8 share a bucket
    for r in rows:
        assert r.network_seconds > 0 and r.dense_seconds > 0
        assert r.choice == min(("network", "dense"), key=lambda s: getattr(r, f"{s}_seconds"))
        for batch in (r.batch, r.batch // 2 + 1):  # any batch in the bucket
            assert batch_bucket(batch) == r.batch
            assert tuned_strategy(layer.spec, batch, "cpu", torch.float32) == r.choice
    assert tuned_strategy(layer.spec, 2, "cpu", torch.float32) is None  # not tuned
    assert tuned_strategy(layer.spec, 1, "cpu", torch.float64) is None  # other dtype


def test_model_layers_sharing_a_shape_are_timed_once_and_outputs_do_not_change():
    model = build("llama")
    compactify(model, chi=4, progress=False)
    batch = inputs("llama")
    before = model(**batch).logits
    rows = autotune(model, batch_sizes=[batch["input_ids"].numel()], repeats=1, min_seconds=0)
    names = [n for r in rows for n in r.modules]
    assert len(names) == len(set(names)) == 14  # 2 blocks x (4 attention + 3 MLP)
    assert len(rows) < len(names)  # the two blocks' layers share shapes
    torch.testing.assert_close(model(**batch).logits, before, rtol=1e-4, atol=1e-5)


def test_quantized_layers_are_tuned():
    pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = build("gpt2")
    compactify(model, chi=4, progress=False)
    quantize(model, bits=8)
    rows = autotune(model, batch_sizes=[4], repeats=1, min_seconds=0)
    assert {n for r in rows for n in r.modules} >= {"transformer.h.0.attn.c_attn"}


@pytest.mark.parametrize("kwargs, name", [
    ({"batch_sizes": []}, "batch_sizes"), ({"batch_sizes": [0]}, "batch_sizes"),
    ({"batch_sizes": 16}, "batch_sizes"), ({"repeats": 0}, "repeats"),
    ({"min_seconds": -1.0}, "min_seconds"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        autotune(MPOLinear(8, 8, 2), **kwargs)


def test_a_model_without_networks_is_an_error():
    with pytest.raises(ValueError, match="compactify"):
        autotune(build("llama"))
