"""Healing launched on 2 CPU processes (torchrun, gloo) is data-parallel: it equals one process
on the concatenated batches, and it checkpoints and resumes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "heal_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, *args: str, processes: int = 1) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(WORKER), str(out), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER),
                   str(out), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run(tmp_path_factory.mktemp("dp") / "two.pt", processes=2)


def test_two_processes_equal_one_on_concatenated_batches(tmp_path, two_processes):
    one = run(tmp_path / "one.pt", "--concatenate")
    assert two_processes["tokens"] == one["tokens"] == 3 * 4 * 11  # every batch of a step counted
    torch.testing.assert_close(torch.tensor(two_processes["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=1e-6)
    for key, value in one["state"].items():
        torch.testing.assert_close(two_processes["state"][key], value, rtol=1e-4, atol=1e-6)
    # ... and training did something, which a data-parallel bug could not hide behind.
    alone = run(tmp_path / "alone.pt")  # one process on the 8 small batches: another path
    moved = max(float((alone["state"][k] - v).abs().max()) for k, v in one["state"].items())
    assert moved > 1e-4


def test_two_processes_checkpoint_and_resume(tmp_path, two_processes):
    ckpt = tmp_path / "ckpt"
    first = run(tmp_path / "first.pt", "--steps", "2", "--checkpoint", str(ckpt), processes=2)
    assert first["resumed_from"] == 0 and (ckpt / "progress.json").is_file()
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    resumed = run(tmp_path / "resumed.pt", "--steps", "3", "--checkpoint", str(ckpt), processes=2)
    assert resumed["resumed_from"] == 2
    for key, value in two_processes["state"].items():
        torch.testing.assert_close(resumed["state"][key], value, rtol=1e-5, atol=1e-7)
