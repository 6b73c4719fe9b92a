"""The SQLite results store: schema, exactly-once rows, failure rows, identity checks, concurrent writers."""
from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from harness.store import CellIdentityError, ResultsStore, SampleRow, open_store


def row(i, task="t", length=1024, status="ok", score=100.0, **kw):
    return SampleRow("m", task, length, i, status, score, f"pred {i}", record={"input": f"x{i}"}, **kw)


def test_schema_wal_and_required_columns(tmp_path):
    with ResultsStore(tmp_path) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = {r[1] for r in store.conn.execute("PRAGMA table_info(samples)")}
        assert {"model", "task", "length", "sample_index", "score", "prediction", "status", "error_kind", "record",
                "metrics"} <= cols
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"runs", "models", "cells", "samples", "meta"} <= tables


def test_rows_are_stored_exactly_once_and_never_overwritten(tmp_path):
    with ResultsStore(tmp_path) as store:
        assert store.add_sample(row(0, score=100.0))
        assert not store.add_sample(row(0, score=0.0))
        assert store.add_sample(row(1, status="error", score=None, error_kind="oom", error="x"))
        assert store.stored_samples("m", "t", 1024) == {0: ("ok", None), 1: ("error", None)}
        assert store.add_sample(row(2, status="error", score=None, error_kind="oom", error="x"))
        assert store.delete_failed("m", "t", 1024, indices=[0, 2]) == 1          # an ok row is never deleted
        assert set(store.stored_samples("m", "t", 1024)) == {0, 1}
        assert store.delete_failed("m", "t", 1024) == 1
        stored = store.query("SELECT score, record FROM samples")
    assert [r[0] for r in stored] == [100.0]
    assert json.loads(stored[0][1]) == {"input": "x0"}


def test_non_finite_scores_are_stored_as_null(tmp_path):
    with ResultsStore(tmp_path) as store:
        store.add_sample(SampleRow("m", "t", 0, 0, "ok", float("nan"), metrics={"x": float("inf")}))
        score, metrics = store.query("SELECT score, metrics FROM samples")[0]
    assert score is None and json.loads(metrics) == {"x": None}


def test_cell_identity_mismatch_needs_a_new_folder(tmp_path):
    with ResultsStore(tmp_path) as store:
        store.begin_cell("m", "t", 1024, {"seed": 0, "tokenizer_sha": "a"}, "sha-a", 4, "run1")
        store.begin_cell("m", "t", 1024, {"seed": 0, "tokenizer_sha": "a"}, "sha-a", 8, "run2")   # same: fine
        store.begin_cell("m", "t", 1024, {"seed": 1, "tokenizer_sha": "a"}, "sha-b", 4, "run3")   # no rows yet
        store.add_sample(row(0))
        with pytest.raises(CellIdentityError, match="seed"):
            store.begin_cell("m", "t", 1024, {"seed": 2, "tokenizer_sha": "a"}, "sha-c", 4, "run4")


def test_open_store_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.sqlite"):
        open_store(tmp_path / "nowhere")


def _writer(folder, offset):
    with ResultsStore(folder) as store:
        for i in range(offset, 200, 2):
            store.add_sample(row(i))
        for i in range(0, 200):            # both processes try every key: still exactly once
            store.add_sample(row(i, score=0.0))


def test_two_processes_write_concurrently(tmp_path):
    ResultsStore(tmp_path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, k)) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    n, distinct = conn.execute("SELECT COUNT(*), COUNT(DISTINCT sample_index) FROM samples").fetchone()
    assert n == distinct == 200
