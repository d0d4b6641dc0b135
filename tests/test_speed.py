"""Speed against a reference, as the demo and the benchmarks measure it: interleaved rounds,
ratios of the best rounds and of each round's pair, with their spread."""

import copy

import pytest
import torch

from models import build
from tensornet_llm import compactify
from tensornet_llm.helpers.speed import RoundTimes, ratios, time_generate


def test_ratios_pair_rounds_in_order():
    reference = RoundTimes(prefill=[2.0, 4.0, 3.0], decode=[1.0, 1.0, 2.0])
    model = RoundTimes(prefill=[1.0, 4.0, 1.5], decode=[2.0, 0.5, 1.0])
    got = ratios(model, reference)
    assert got["prefill"].best == pytest.approx(2.0 / 1.0)
    assert (got["prefill"].median, got["prefill"].low, got["prefill"].high) == (2.0, 1.0, 2.0)
    assert got["decode"].best == pytest.approx(1.0 / 0.5)
    assert (got["decode"].median, got["decode"].low, got["decode"].high) == (2.0, 0.5, 2.0)
    assert str(got["decode"]) == "2.00x (rounds 0.50x-2.00x)"


def test_time_generate_times_every_model_every_round():
    dense = build("llama")
    model = copy.deepcopy(dense)
    compactify(model, chi=4, progress=False)
    prompt = torch.randint(2, 90, (1, 6))
    times = time_generate({"dense": dense, "compressed": model}, prompt, new_tokens=3, rounds=2)
    assert set(times) == {"dense", "compressed"}
    for t in times.values():
        assert len(t.prefill) == len(t.decode) == 2
        assert all(s > 0 for s in t.prefill + t.decode)
    with pytest.raises(ValueError):
        time_generate({"dense": dense}, prompt, rounds=0)


def test_the_benchmark_harness_interleaves_rounds(monkeypatch):
    """benchmarks/harness.interleaved calls every variant once per round, in turn, after the
    warm-up; each round's time is the mean of its repeats."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import harness

    order = []
    times = harness.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                rounds=3, repeat=2, warmup=1)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert [len(t) for t in times.values()] == [3, 3]
    assert harness.ratio([2.0, 1.0], [1.0, 2.0]).median == pytest.approx(1.25)


def test_a_results_file_of_another_processor_is_not_added_to(monkeypatch, tmp_path):
    """benchmarks/harness.machine records the processor; resume adds to a file only where the
    settings and the processor are the same, and says how to start afresh otherwise."""
    import argparse
    import json
    import platform
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import harness

    meta = harness.machine(rounds=3)
    assert meta["machine"].startswith(platform.machine())
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"meta": meta, "rows": [{"model": "dense"}]}))
    parser = argparse.ArgumentParser()
    assert harness.resume(path, dict(meta), False, parser) == (meta, [{"model": "dense"}])
    assert harness.resume(path, dict(meta), True, parser) == (meta, [])
    elsewhere = {**meta, "machine": "another processor"}

    def error(message):  # argparse prints the message and exits; keep the message
        raise SystemExit(message)

    monkeypatch.setattr(parser, "error", error)
    with pytest.raises(SystemExit, match=r"\(\['machine'\]\); run with no --merge"):
        harness.resume(path, elsewhere, False, parser, "no --merge")


def test_call_cost_is_the_fixed_time_of_a_call_in_parameters(monkeypatch):
    """With a clock on which a linear call of p parameters takes a * p + b, call_cost returns
    b / a, whatever the shapes and however many layers it streams through per shape."""
    from torch import nn

    from tensornet_llm.helpers import speed

    a, b, clock = 2e-9, 3e-5, [0.0]

    def forward(layer, x):
        clock[0] += a * layer.weight.numel() + b
        return x.new_zeros(*x.shape[:-1], layer.out_features)

    monkeypatch.setattr(nn.Linear, "forward", forward)
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    for shapes, streamed in ((((8, 8), (16, 32), (40, 24)), 4096), (((64, 64), (8, 16)), 1)):
        assert speed.call_cost(shapes, rounds=2, streamed_bytes=streamed) == pytest.approx(b / a)


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"shapes": ((8, 8),)}])
def test_call_cost_refuses_what_it_cannot_fit(kwargs):
    from tensornet_llm.helpers.speed import call_cost

    with pytest.raises(ValueError, match="call_cost needs"):
        call_cost(**kwargs)
