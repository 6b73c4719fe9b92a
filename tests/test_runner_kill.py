"""A real sweep (subprocess, the CLI) killed with SIGKILL mid-cell, twice, then rerun: every (model, task, length,
sample) is stored exactly once and the rerun's rows equal an uninterrupted run's."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SLOW = 10          # samples of the slow fake cell (0.15 s each, sleeping): the kills land inside it


def sweep_cmd(output: Path) -> list[str]:
    return [sys.executable, str(REPO / "run_eval.py"), "run", "--models", "gdn2-tiny-random", "--device", "cpu",
            "--tasks", "test_runner_support:SlowTask", "niah_single_1", "--lengths", "512", "--samples", str(SLOW),
            "--limit", str(SLOW), "--output", str(output), "--no-report", "--no-progress"]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), OMP_NUM_THREADS="1")


def count_rows(db: Path, task: str | None = None) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(db, timeout=5)
        sql = "SELECT COUNT(*) FROM samples" + (" WHERE task = ?" if task else "")
        n = conn.execute(sql, (task,) if task else ()).fetchone()[0]
        conn.close()
        return n
    except sqlite3.OperationalError:     # schema not created yet
        return 0


def kill_when(output: Path, task: str, at_least: int, timeout: float = 120.0) -> int:
    """Start the sweep, SIGKILL it once `task` has at least `at_least` rows; returns the rows seen then."""
    proc = subprocess.Popen(sweep_cmd(output), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    db = output / "results.sqlite"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            n = count_rows(db, task)
            if n >= at_least:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return n
            if proc.poll() is not None:
                raise AssertionError(f"sweep ended before the kill: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        raise AssertionError("sweep too slow to reach the kill point")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stored(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    out = conn.execute("SELECT model, task, length, sample_index, status, score, prediction FROM samples "
                       "ORDER BY task, length, sample_index").fetchall()
    conn.close()
    return out


def test_sigkill_mid_cell_then_resume(tmp_path):
    out = tmp_path / "killed"
    first = kill_when(out, "slow", 3)                 # mid-cell in the slow fake cell
    assert 3 <= first < SLOW
    second = kill_when(out, "slow", first + 2)        # resumed, then killed again in the same cell
    assert second < SLOW
    done = subprocess.run(sweep_cmd(out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already stored" in done.stderr or "already stored" in done.stdout
    rows = stored(out / "results.sqlite")
    keys = [r[:4] for r in rows]
    assert len(keys) == len(set(keys)), "a sample was stored twice"
    expected = {("gdn2-tiny-random", "slow", 512, i) for i in range(SLOW)} | {
        ("gdn2-tiny-random", "niah_single_1", 512, i) for i in range(SLOW)}
    assert set(keys) == expected
    assert all(r[4] == "ok" for r in rows)
    # the same rows as a sweep that was never interrupted
    clean = tmp_path / "clean"
    ok = subprocess.run(sweep_cmd(clean), cwd=REPO, env=dict(env(), FAKE_TASK_DELAY="0"), capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert stored(clean / "results.sqlite") == rows
