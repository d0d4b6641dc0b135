"""Healing launched on 2 CPU processes (torchrun, gloo) is data-parallel: with heal's defaults
(warm-up, cosine decay, clipping) it equals one process on the concatenated batches, and it
checkpoints and resumes to the same weights.

The defaults matter: a learning-rate schedule stepped once per process (accelerate's default
for a prepared scheduler) runs warm-up and decay twice as fast on 2 processes, which a constant
rate without warm-up would hide."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tensornet_llm.train.heal import auto_precision

WORKER = Path(__file__).resolve().parent / "heal_worker.py"
DEFAULT = auto_precision(cpu=True)  # what mixed_precision="auto" resolves to on this CPU
OTHER = "no" if DEFAULT == "bf16" else "bf16"
# Parameters after training: float32 agrees to rounding; bf16 autocast rounds the two runs'
# matmuls differently (other batch shapes), within a few bf16 ulps of the updates.
TOLERANCE = {"no": dict(rtol=1e-4, atol=1e-6), "bf16": dict(rtol=2e-3, atol=2e-5)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, *args: str, processes: int = 1, fails: bool = False) -> dict | None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(WORKER), str(out), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER),
                   str(out), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if fails:
        assert done.returncode != 0 and not out.exists(), done.stderr[-3000:]
        return None
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def assert_same_state(a: dict, b: dict, precision: str) -> None:
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, **TOLERANCE[precision], msg=key)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run(tmp_path_factory.mktemp("dp") / "two.pt", processes=2)


def test_two_processes_equal_one_on_concatenated_batches(tmp_path, two_processes):
    one = run(tmp_path / "one.pt", "--concatenate")
    assert two_processes["precision"] == one["precision"] == DEFAULT
    steps = len(one["losses"])
    assert two_processes["tokens"] == one["tokens"] == steps * 4 * 11  # every batch counted
    torch.testing.assert_close(torch.tensor(two_processes["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-3 if DEFAULT == "bf16" else 1e-5, atol=1e-6)
    assert_same_state(two_processes["state"], one["state"], DEFAULT)
    # ... and training did something, which a data-parallel bug could not hide behind.
    alone = run(tmp_path / "alone.pt")  # one process on the 8 small batches: another path
    moved = max(float((alone["state"][k] - v).abs().max()) for k, v in one["state"].items())
    assert moved > 20 * TOLERANCE[DEFAULT]["atol"]


def test_two_processes_equal_one_in_the_other_precision(tmp_path):
    two = run(tmp_path / "two.pt", "--precision", OTHER, processes=2)
    one = run(tmp_path / "one.pt", "--precision", OTHER, "--concatenate")
    assert two["precision"] == one["precision"] == OTHER
    assert_same_state(two["state"], one["state"], OTHER)


def test_two_processes_checkpoint_and_resume(tmp_path, two_processes):
    ckpt = tmp_path / "ckpt"
    # Interrupted after step 24, two steps after the checkpoint of step 22 (inside the decay).
    run(tmp_path / "first.pt", "--checkpoint", str(ckpt), "--crash-after", "24", processes=2,
        fails=True)
    assert (ckpt / "progress.json").is_file()
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    resumed = run(tmp_path / "resumed.pt", "--checkpoint", str(ckpt), processes=2)
    assert resumed["resumed_from"] == 22
    assert_same_state(resumed["state"], two_processes["state"], DEFAULT)
