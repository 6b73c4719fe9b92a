"""torchrun with 2 CPU processes (gloo) shards every cell's samples across the ranks and stores the same rows as
one process."""
from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from harness.distributed import DistContext

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(output: Path) -> list[str]:
    return ["run", "--models", "gdn2-tiny-random", "--device", "cpu", "--tasks", "niah_single_1", "mqar",
            "test_runner_support:FlakyTask", "--lengths", "512", "--samples", "5", "--output", str(output),
            "--no-progress"]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), OMP_NUM_THREADS="1")


def rows(output: Path) -> list[tuple]:
    conn = sqlite3.connect(output / "results.sqlite")
    out = conn.execute("SELECT model, task, length, sample_index, status, score, prediction, error_kind, record "
                       "FROM samples ORDER BY task, length, sample_index").fetchall()
    ranks = conn.execute("SELECT DISTINCT rank FROM samples").fetchall()
    conn.close()
    return out, sorted(r[0] for r in ranks)


def test_owns_is_a_partition():
    world = [DistContext(rank=r, world_size=3) for r in range(3)]
    for i in range(20):
        assert sum(d.owns(i) for d in world) == 1


def test_torchrun_two_processes_equal_one(tmp_path):
    single = subprocess.run([sys.executable, str(REPO / "run_eval.py"), *args(tmp_path / "one")], cwd=REPO,
                            env=env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), str(REPO / "run_eval.py"), *args(tmp_path / "two")],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-3000:]
    one, one_ranks = rows(tmp_path / "one")
    two, two_ranks = rows(tmp_path / "two")
    assert one_ranks == [0] and two_ranks == [0, 1]
    assert len(one) == 15 and two == one
    assert multi.stdout.count("### All cells") == 1          # only rank 0 reports
