"""Bad input and failures, as a hostile user would try them: each class is refused with a message that names the
problem and the fix, before any model loads, and nothing stored is lost or relabelled (docs/sweeps.md, "Bad input
and failures")."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from harness.cli import main
from harness.registry import load_model
from harness.runner import CellPlan, Plan, SweepRunner
from harness.store import CellIdentityError, ResultsStore, RunLock, SampleRow

SUPPORT = "test_runner_support"
Z95 = 1.959963984540054
FAST = ["--models", "gdn2-tiny-random", "--device", "cpu", "--no-progress", "--no-report"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("gdn2-tiny-random", device="cpu")


def refused(capsys, argv: list[str], *needles: str) -> str:
    """main(argv) exits 2 (returned, or argparse's SystemExit) and its stderr contains every needle; returns it."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err
    return err


def sweep(out: Path, cells, tiny, samples=4, loader=None, **kw):
    plan = Plan(models=["gdn2-tiny-random"], cells=cells, samples=samples, device="cpu", **kw)
    with ResultsStore(out) as store:
        return SweepRunner(plan, store, progress=False, log=lambda m: None,
                           loader=loader or (lambda spec: tiny)).run()


def cells_of(out: Path) -> dict:
    conn = sqlite3.connect(out / "results.sqlite")
    found = {(m, t, length): (s, e)
             for m, t, length, s, e in conn.execute("SELECT model, task, length, status, error FROM cells")}
    conn.close()
    return found


# ------------------------------------------------------------------------------ wrong results stored or shown
def test_second_run_into_a_locked_folder_is_refused_with_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire(["run_eval.py", "run", "--seed", "1"])
    try:
        err = refused(capsys, ["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--samples", "2", "--seed", "2",
                               "--output", str(out)], "another run is writing to", f"pid {os.getpid()}",
                      "--seed 1", "another --output")
    finally:
        lock.release()
    assert "Traceback" not in err
    conn = sqlite3.connect(out / "results.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 0
    conn.close()
    assert main(["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--samples", "2", "--output", str(out)]) == 0


def test_a_row_made_under_another_cell_identity_is_never_stored(tmp_path):
    """Two writers that both began the cell before either stored a row: the row of the one whose identity was
    replaced is refused, in the same transaction that would have stored it."""
    with ResultsStore(tmp_path) as store:
        store.begin_cell("m", "t", 16, {"seed": 1}, "sha-seed-1", 4, "run-a")
        store.begin_cell("m", "t", 16, {"seed": 2}, "sha-seed-2", 4, "run-b")      # no rows yet: allowed
        with pytest.raises(CellIdentityError, match="another process changed it"):
            store.add_sample(SampleRow("m", "t", 16, 0, "ok", 100.0, seed=1), "sha-seed-1")
        assert store.add_sample(SampleRow("m", "t", 16, 0, "ok", 0.0, seed=2), "sha-seed-2")
        assert [tuple(r) for r in store.query("SELECT sample_index, seed FROM samples")] == [(0, 2)]


def test_binomial_interval_contains_the_mean_at_0_and_100_percent():
    from harness.report import interval95

    for n in range(1, 501):
        lo, hi = interval95([0.0] * n)
        assert lo == 0.0 and hi == pytest.approx(100 * Z95 ** 2 / (n + Z95 ** 2), rel=1e-9)   # Wilson at p = 0
        lo, hi = interval95([100.0] * n)
        assert hi == 100.0 and lo == pytest.approx(100 * n / (n + Z95 ** 2), rel=1e-9)       # Wilson at p = 1
        assert 0.0 <= lo <= 100.0
    lo, hi = interval95([100.0] * 7 + [0.0] * 3)                   # 7/10: Wilson's closed form
    p, n = 0.7, 10
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    assert (lo, hi) == (pytest.approx(100 * (centre - half)), pytest.approx(100 * (centre + half)))


@pytest.mark.parametrize("score", [0.0, 100.0])
def test_report_plots_cells_that_score_all_0_or_all_100(tmp_path, score):
    pytest.importorskip("matplotlib")
    from harness.report import write_report

    with ResultsStore(tmp_path) as store:
        for length in (1024, 2048):
            for i in range(100):                                   # paper-table3's default count
                store.add_sample(SampleRow("m", "niah_single_1", length, i, "ok", score, "x"))
    report = write_report(tmp_path, plots=True, exports=False)
    assert any(p.name == "accuracy_vs_length_niah_single_1.png" for p in report["files"])


def test_mqar_refuses_inputs_past_the_hard_context_limit(tmp_path, tiny):
    from harness.model import ContextTooLongError
    from harness.task_adapters import resolve_task

    task = resolve_task("mqar")
    sample = task.samples(tiny, 128, 1, 0)[0]
    tiny.max_length = 100
    try:
        with pytest.raises(ContextTooLongError, match="context limit of 100"):
            task.evaluate(tiny, sample)
        summary = sweep(tmp_path, [CellPlan("mqar", [128])], tiny, samples=4)
    finally:
        tiny.max_length = None
    cell = summary.cells[0]
    assert cell.status == "failed" and cell.ok == 0 and "context limit" in cell.error
    assert "--retry-failed" in cell.error


def test_a_model_that_fails_to_load_does_not_relabel_complete_cells(tmp_path, tiny):
    sweep(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16])], tiny, samples=3)
    before = cells_of(tmp_path)

    def broken(spec):
        raise RuntimeError("weights unreadable")

    summary = sweep(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16, 32])], tiny, samples=3, loader=broken)
    assert all(c.status == "failed" and "failed to load" in c.error for c in summary.cells)
    assert cells_of(tmp_path) == before                           # the complete cell stays done; nothing added


def test_a_failed_label_does_not_stick_through_a_complete_rerun(tmp_path, tiny):
    sweep(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16])], tiny, samples=3)
    with ResultsStore(tmp_path) as store:                          # a label left by an older run
        store.set_cell_status("gdn2-tiny-random", "count", 16, "failed", "model failed to load")
    loads = []
    sweep(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16])], tiny, samples=3,
          loader=lambda spec: loads.append(spec) or tiny)
    assert loads == []                                             # complete: not even loaded
    assert cells_of(tmp_path)[("gdn2-tiny-random", "count", 16)] == ("done", None)


def test_typo_in_a_model_spec_stores_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, ["run", "--models", "gdn2-tiny-randm", "--device", "cpu", "--tasks", "mqar", "--lengths", "128",
                     "--samples", "2", "--output", str(out)], "Did you mean 'gdn2-tiny-random'")
    refused(capsys, ["run", "--models", "gdn2-tiny-random", "--device", "cuda:0", "--tasks", "mqar", "--lengths",
                     "128", "--output", str(out)], "CUDA is not available")
    assert not out.exists()


def test_missing_bare_path_says_it_does_not_exist(tmp_path, capsys):
    refused(capsys, ["run", "--models", str(tmp_path / "no-such-ckpt"), "--tasks", "mqar", "--lengths", "128",
                     "--output", str(tmp_path / "o")], "does not exist")
    refused(capsys, ["run", "--models", f"kda={tmp_path / 'no-such-ckpt'}", "--tasks", "mqar", "--lengths", "128",
                     "--output", str(tmp_path / "o")], "does not exist")


# ------------------------------------------------------------------------------ clear messages, nothing lost
def test_output_path_that_is_a_file_under_a_file_or_read_only(tmp_path, capsys, read_only):
    a_file = tmp_path / "plain.txt"
    a_file.write_text("not a folder")
    args = ["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--samples", "1", "--output"]
    refused(capsys, [*args, str(a_file)], "is a file, not a folder")
    refused(capsys, [*args, str(a_file / "sub")], f"{a_file} is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    refused(capsys, [*args, str(locked / "out")], "cannot be created")
    refused(capsys, [*args, str(locked)], "not writable")
    assert a_file.read_text() == "not a folder"


@pytest.fixture
def read_only():
    """Make a path read-only for this process (chmod; as root, which ignores modes, chattr +i); undone after."""
    made = []

    def make(path: Path) -> None:
        path.chmod(0o555 if path.is_dir() else 0o444)
        made.append(path)
        if os.access(path, os.W_OK):
            subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        assert not os.access(path, os.W_OK)

    yield make
    for path in reversed(made):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stored") / "run"
    assert main(["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--samples", "2", "--output", str(out)]) == 0
    return out


def copy_of(stored: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "results.sqlite").write_bytes((stored / "results.sqlite").read_bytes())
    return dest


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_store_is_named_and_left_alone(tmp_path, capsys, stored_run, damage):
    out = copy_of(stored_run, tmp_path / "out")
    db = out / "results.sqlite"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not sqlite " * 400)
    damaged = db.read_bytes()
    for argv in (["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--samples", "2", "--output", str(out)],
                 ["report", str(out), "--no-plots"]):
        refused(capsys, argv, str(db), "corrupt or truncated", "another --output")
    assert db.read_bytes() == damaged


def test_read_only_store_and_report_on_a_read_only_folder(tmp_path, capsys, stored_run, read_only):
    out = copy_of(stored_run, tmp_path / "out")
    read_only(out / "results.sqlite")
    refused(capsys, ["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--samples", "3", "--output", str(out)],
            "results.sqlite is read-only", "chmod")
    read_only(out)
    refused(capsys, ["report", str(out), "--no-plots"], "read-only: pass --out DIR")
    assert main(["report", str(out), "--no-plots", "--out", str(tmp_path / "rep")]) == 0
    assert "mqar@128" in capsys.readouterr().out and (tmp_path / "rep" / "all.md").is_file()


SUITES = {
    "malformed": ("cells: [task: mqar\n", "not valid YAML"),
    "list_top": ("- task: mqar\n", "top level must be a mapping"),
    "cells_not_list": ("cells: mqar\n", "'cells' must be a non-empty list"),
    "no_cells": ("models: [gdn2-tiny-random]\n", "'cells' must be a non-empty list"),
    "bad_samples": ("samples: ten\ncells:\n  - {task: mqar, lengths: [128]}\n", "'samples' must be a whole number"),
    "zero_cell_samples": ("cells:\n  - {task: mqar, lengths: [128], samples: 0}\n", "'samples' must be a whole"),
    "bad_length": ("cells:\n  - {task: mqar, lengths: [-5]}\n", "it must be a positive whole number"),
    "unknown_task": ("cells:\n  - {task: niah_singel_1, lengths: [1k]}\n", "Did you mean 'niah_single_1'"),
    "bad_option": ("cells:\n  - {task: mqar, lengths: [128], options: {num_kv_pairs: abc}}\n",
                   "num_kv_pairs must be a whole number"),
    "unknown_option": ("cells:\n  - {task: mqar, lengths: [128], options: {num_kv_pair: 4}}\n",
                       "unknown option(s) ['num_kv_pair']"),
}


@pytest.mark.parametrize("case", sorted(SUITES))
def test_bad_suite_files_are_refused_before_any_model_loads(tmp_path, capsys, case):
    text, needle = SUITES[case]
    suite = tmp_path / f"{case}.yaml"
    suite.write_text(text)
    refused(capsys, ["run", "--suite", str(suite), "--models", "gdn2-tiny-random", "--device", "cpu", "--output",
                     str(tmp_path / "o")], needle)
    assert not (tmp_path / "o").exists()


def test_lm_eval_typo_is_refused_with_the_nearest_name(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    refused(capsys, ["run", *FAST, "--tasks", "lm_eval:hellaswg", "--output", str(tmp_path / "o")],
            "unknown lm-eval task 'lm_eval:hellaswg'", "Did you mean 'lm_eval:hellaswag'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--samples", "0"], ["--samples", "-3"], ["--limit", "0"], ["--limit", "-1"],
                                   ["--lengths", "0"], ["--seed", "-1"]])
def test_zero_or_negative_counts_are_refused(tmp_path, capsys, flags):
    argv = ["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--output", str(tmp_path / "o"), *flags]
    refused(capsys, argv, flags[0] if flags[0] != "--lengths" else "positive")
    assert not (tmp_path / "o").exists()


def test_tokenizer_on_the_command_line_and_in_a_spec(tmp_path, capsys):
    from harness.bundled import BPE_4K

    out = tmp_path / "o"
    assert main(["run", *FAST, "--tokenizer", str(BPE_4K), "--tasks", "mqar", "--lengths", "128", "--samples", "1",
                 "--output", str(out)]) == 0
    refused(capsys, ["run", "--models", f"gdn2-tiny-random,tokenizer={tmp_path / 'nope'}", "--tasks", "mqar",
                     "--output", str(out)], "tokenizer", "does not exist")
    model = load_model(f"gdn2-tiny-random,tokenizer={BPE_4K},bos=false", device="cpu")
    assert model.add_bos is False and model.name == "gdn2-tiny-random"


def test_context_limit_failures_are_counted_after_a_rerun(tmp_path, tiny, capsys):
    from harness.cli import print_summary

    tiny.max_length = 100
    try:
        sweep(tmp_path, [CellPlan("mqar", [128])], tiny, samples=3)        # 3 failures in a row: abandoned
        rerun = sweep(tmp_path, [CellPlan("mqar", [128])], tiny, samples=3)
    finally:
        tiny.max_length = None
    assert rerun.cells[0].failed_before == 3
    print_summary(rerun, 1.0)
    printed = capsys.readouterr().out
    assert "1 cell(s) failed or with failures" in printed and "--retry-failed" in printed


def test_binary_haystack_file_is_named(tmp_path, capsys):
    binary = tmp_path / "essay.txt"
    binary.write_bytes(bytes(range(256)) * 50)
    refused(capsys, ["run", *FAST, "--tasks", "niah_single_2", "--lengths", "1k", "--haystack-file", str(binary),
                     "--output", str(tmp_path / "o")], str(binary), "not UTF-8 text")


def test_runs_left_running_by_a_killed_process_are_marked_killed(tmp_path, tiny):
    with ResultsStore(tmp_path) as store:
        store.start_run("killed-run", 0, 1, {})
    sweep(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16])], tiny, samples=1)
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    status = dict(conn.execute("SELECT run_id, status FROM runs").fetchall())
    conn.close()
    assert status.pop("killed-run") == "killed" and list(status.values()) == ["done"]


def test_results_record_whether_inputs_start_with_bos(tmp_path):
    assert main(["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--samples", "1",
                 "--output", str(tmp_path)]) == 0
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    describe = json.loads(conn.execute("SELECT describe FROM models").fetchone()[0])
    conn.close()
    assert describe["input_bos"] is False                           # the bundled BPE adds no special tokens


def test_a_cell_whose_stored_samples_all_failed_stays_failed_on_rerun(tmp_path, tiny):
    sweep(tmp_path, [CellPlan(f"{SUPPORT}:FailingTask", [16])], tiny, samples=3)        # abandoned after 3
    again = sweep(tmp_path, [CellPlan(f"{SUPPORT}:FailingTask", [16])], tiny, samples=3)
    cell = again.cells[0]
    assert (cell.status, cell.failed_before) == ("failed", 3) and "--retry-failed" in cell.error
    assert cells_of(tmp_path)[("gdn2-tiny-random", "failing", 16)][0] == "failed"


def test_a_store_of_another_schema_version_is_left_as_it_is(tmp_path, capsys):
    db = tmp_path / "results.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES "
                       "('schema_version', '2');")
    conn.close()
    before = db.read_bytes()
    refused(capsys, ["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--output", str(tmp_path)],
            "has schema version 2", "left as it is")
    refused(capsys, ["report", str(tmp_path), "--no-plots"], "has schema version 2")
    assert db.read_bytes() == before


def test_report_out_that_is_a_file(tmp_path, capsys, stored_run):
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    refused(capsys, ["report", str(stored_run), "--no-plots", "--no-exports", "--out", str(a_file)],
            f"cannot write {a_file}", "--out DIR")
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("flags, needle", [(["--device", "tpu"], "unsupported device 'tpu'"),
                                           (["--dtype", "float8"], "unknown dtype 'float8'"),
                                           (["--tokenizer", __file__], "pass a tokenizer folder or a tokenizer.json")])
def test_unusable_device_dtype_or_tokenizer(tmp_path, capsys, flags, needle):
    refused(capsys, ["run", *FAST, "--tasks", "mqar", "--lengths", "128", "--output", str(tmp_path / "o"), *flags],
            needle)
    assert not (tmp_path / "o").exists()
