"""torchrun with 2 CPU processes (gloo) shards every cell's samples across the ranks and stores the same rows as
one process, also after one rank is killed with SIGKILL mid-cell and the sweep is rerun."""
from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.distributed import DistContext

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(output: Path) -> list[str]:
    """A sweep with a slow cell (0.15 s a sample unless FAKE_TASK_DELAY=0), so that a kill lands inside it."""
    return ["run", "--models", "gdn2-tiny-random", "--device", "cpu", "--tasks", "test_runner_support:SlowTask",
            "niah_single_1", "mqar", "test_runner_support:FlakyTask", "--lengths", "512", "--samples", "6",
            "--output", str(output), "--no-progress"]


def env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), OMP_NUM_THREADS="1", **extra)


def torchrun(output: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), str(REPO / "run_eval.py"), *args(output)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The rows of one process running the sweep uninterrupted."""
    out = tmp_path_factory.mktemp("single") / "one"
    done = subprocess.run([sys.executable, str(REPO / "run_eval.py"), *args(out), "--no-report"], cwd=REPO,
                          env=env(FAKE_TASK_DELAY="0"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, ranks = rows(out)
    assert ranks == [0] and len(one) == 24
    return one


def rows(output: Path) -> list[tuple]:
    conn = sqlite3.connect(output / "results.sqlite")
    out = conn.execute("SELECT model, task, length, sample_index, status, score, prediction, error_kind, record "
                       "FROM samples ORDER BY task, length, sample_index").fetchall()
    ranks = conn.execute("SELECT DISTINCT rank FROM samples").fetchall()
    conn.close()
    return out, sorted(r[0] for r in ranks)


def counts(stdout: str) -> tuple[int, ...]:
    """(scored, already stored, failed) samples from a run's summary line."""
    found = re.search(r"(\d+) sample\(s\) scored, (\d+) already stored, (\d+) failed sample", stdout)
    assert found, stdout[-2000:]
    return tuple(int(x) for x in found.groups())


def test_owns_is_a_partition():
    world = [DistContext(rank=r, world_size=3) for r in range(3)]
    for i in range(20):
        assert sum(d.owns(i) for d in world) == 1


def test_torchrun_two_processes_equal_one(tmp_path, single):
    multi = subprocess.run(torchrun(tmp_path / "two"), cwd=REPO, env=env(FAKE_TASK_DELAY="0"), capture_output=True,
                           text=True, timeout=300)
    assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-3000:]
    two, two_ranks = rows(tmp_path / "two")
    assert two_ranks == [0, 1] and two == single
    assert multi.stdout.count("### All cells") == 1          # only rank 0 reports
    assert counts(multi.stdout) == (21, 0, 3)                 # the summary counts every rank's share


def rank_pid_once_it_stored(db: Path, rank: int, rows: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    """The pid of `rank` (runs table) once it has stored `rows` rows of the slow cell."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before the kill"
        try:
            conn = sqlite3.connect(db, timeout=5)
            n = conn.execute("SELECT COUNT(*) FROM samples WHERE task = 'slow' AND rank = ?", (rank,)).fetchone()[0]
            pid = conn.execute("SELECT pid FROM runs WHERE rank = ? AND status = 'running'", (rank,)).fetchone()
            conn.close()
            if n >= rows and pid:
                return pid[0]
        except sqlite3.OperationalError:          # not created yet
            pass
        time.sleep(0.05)
    raise AssertionError("the sweep was too slow to reach the kill point")


def test_sigkill_of_one_rank_then_rerun_loses_and_duplicates_nothing(tmp_path, single):
    """kill -9 of rank 1 mid-cell: torchrun stops the other rank; a rerun with 2 ranks completes the sweep, and the
    store equals a single uninterrupted process's, sample for sample."""
    out = tmp_path / "two"
    proc = subprocess.Popen(torchrun(out), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.kill(rank_pid_once_it_stored(out / "results.sqlite", 1, 1, proc), signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before, _ = rows(out)
    assert 0 < len(before) < 24 and len([r for r in before if r[1] == "slow"]) < 6
    again = subprocess.run(torchrun(out), cwd=REPO, env=env(FAKE_TASK_DELAY="0"), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    scored, stored, failed = counts(again.stdout)
    assert (scored + failed, stored) == (24 - len(before), len(before))
    two, ranks = rows(out)
    assert ranks == [0, 1] and two == single
    conn = sqlite3.connect(out / "results.sqlite")
    runs = conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status ORDER BY status").fetchall()
    conn.close()
    assert runs == [("done", 2), ("killed", 2)]                    # the killed run is not left 'running'
