"""The sweep runner in-process: resumption, failure rows (exception, OOM after retrying smaller, NaN/Inf), failing
cells and models that do not stop the sweep, identity checks."""
from __future__ import annotations

import sqlite3

import pytest

from harness.registry import load_model
from harness.runner import CellPlan, Plan, PlanError, SweepRunner, load_suite, parse_length, plan_from_suite
from harness.store import CellIdentityError, ResultsStore

SUPPORT = "test_runner_support"


@pytest.fixture(scope="module")
def tiny():
    return load_model("gdn2-tiny-random", device="cpu")


def run(tmp_path, cells, samples=4, models=("gdn2-tiny-random",), tiny=None, **kw):
    plan = Plan(models=list(models), cells=cells, samples=samples, device="cpu", **kw)
    loader = (lambda spec: tiny if spec == "gdn2-tiny-random" else load_model(spec, device="cpu")) if tiny else None
    with ResultsStore(tmp_path) as store:
        return SweepRunner(plan, store, progress=False, log=lambda m: None, loader=loader).run()


def rows(tmp_path, where="1"):
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    conn.row_factory = sqlite3.Row
    out = [dict(r) for r in conn.execute(f"SELECT * FROM samples WHERE {where} ORDER BY task, length, sample_index")]
    conn.close()
    return out


def test_resume_skips_stored_and_extends(tmp_path, tiny):
    s1 = run(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16, 32])], samples=3, tiny=tiny)
    assert [(c.ok, c.skipped) for c in s1.cells] == [(3, 0), (3, 0)]
    first = {(r["length"], r["sample_index"]): (r["score"], r["prediction"]) for r in rows(tmp_path)}
    s2 = run(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16, 32])], samples=3, tiny=tiny)
    assert [(c.ok, c.skipped) for c in s2.cells] == [(0, 3), (0, 3)]
    s3 = run(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16, 32])], samples=5, tiny=tiny)
    assert [(c.ok, c.skipped) for c in s3.cells] == [(2, 3), (2, 3)]
    stored = rows(tmp_path)
    assert len(stored) == 10
    assert {(r["length"], r["sample_index"]): (r["score"], r["prediction"]) for r in stored
            if r["sample_index"] < 3} == first


def test_complete_plan_does_not_load_the_model(tmp_path, tiny):
    run(tmp_path, [CellPlan(f"{SUPPORT}:CountTask", [16])], samples=2, tiny=tiny)
    loads = []
    plan = Plan(models=["gdn2-tiny-random"], cells=[CellPlan(f"{SUPPORT}:CountTask", [16])], samples=2)
    with ResultsStore(tmp_path) as store:
        summary = SweepRunner(plan, store, progress=False, log=lambda m: None,
                              loader=lambda spec: loads.append(spec) or tiny).run()
    assert loads == [] and summary.cells[0].skipped == 2


def test_a_loader_resolves_names_the_registry_does_not_know(tmp_path, tiny):
    """benchmarks/bench_eval_hflm.py runs the runner on an in-memory model under its own name."""
    plan = Plan(models=["my-model-in-memory"], cells=[CellPlan(f"{SUPPORT}:CountTask", [16])], samples=2)
    with ResultsStore(tmp_path) as store:
        summary = SweepRunner(plan, store, progress=False, log=lambda m: None, loader=lambda spec: tiny).run()
    assert summary.cells[0].ok == 2
    with ResultsStore(tmp_path / "registry") as store, pytest.raises(PlanError, match="unknown model 'my-model"):
        SweepRunner(plan, store, progress=False, log=lambda m: None).run()


def test_failing_cells_and_models_do_not_stop_the_sweep(tmp_path, tiny):
    cells = [CellPlan(f"{SUPPORT}:FailingTask", [16]), CellPlan(f"{SUPPORT}:BrokenSamplesTask", [16]),
             CellPlan("niah_single_1", [64]),                 # too short for the task: LengthTargetError
             CellPlan(f"{SUPPORT}:FlakyTask", [16]), CellPlan(f"{SUPPORT}:CountTask", [16])]
    broken = tmp_path / "broken"                              # a checkpoint folder without weights
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "gdn2"}')
    out = tmp_path / "out"
    summary = run(out, cells, samples=6, models=(f"gdn2={broken}", "gdn2-tiny-random"), tiny=tiny)
    by = {(c.model, c.task): c for c in summary.cells}
    assert all(c.status == "failed" and "failed to load" in c.error for c in summary.cells[:5])
    assert by[("gdn2-tiny-random", "failing")].status == "failed"
    assert by[("gdn2-tiny-random", "failing")].failed == 3          # abandoned after 3 failures in a row
    assert by[("gdn2-tiny-random", "broken_samples")].status == "failed"
    assert by[("gdn2-tiny-random", "niah_single_1")].status == "failed"
    assert "samples" in by[("gdn2-tiny-random", "niah_single_1")].error
    flaky = by[("gdn2-tiny-random", "flaky")]
    assert (flaky.status, flaky.ok, flaky.failed) == ("done", 3, 3)
    assert by[("gdn2-tiny-random", "count")].ok == 6
    failed = rows(out, "status = 'error'")
    assert {r["task"] for r in failed} == {"failing", "flaky"}
    assert all(r["error_kind"] == "exception" and r["score"] is None for r in failed)
    conn = sqlite3.connect(out / "results.sqlite")
    cell_status = dict(((m, t), s) for m, t, s in conn.execute("SELECT model, task, status FROM cells"))
    assert {m for m, _ in cell_status} == {"gdn2-tiny-random"}    # the model that never loaded stores nothing
    assert cell_status[("gdn2-tiny-random", "count")] == "done"
    # --retry-failed retries failure rows (and only those)
    again = run(out, [CellPlan(f"{SUPPORT}:FlakyTask", [16])], samples=6, tiny=tiny, retry_failed=True)
    assert (again.cells[0].ok, again.cells[0].failed, again.cells[0].skipped) == (0, 3, 3)


def test_retry_failed_on_one_rank_leaves_other_ranks_rows(tmp_path, tiny):
    """Under torchrun every rank retries its own failures; a slow rank must not delete rows that a faster rank has
    already stored again."""
    from harness.distributed import DistContext

    run(tmp_path, [CellPlan(f"{SUPPORT}:FlakyTask", [16])], samples=6, tiny=tiny)   # failures at 1, 3, 5
    first = {r["sample_index"]: r["run_id"] for r in rows(tmp_path, "status = 'error'")}
    plan = Plan(models=["gdn2-tiny-random"], cells=[CellPlan(f"{SUPPORT}:FlakyTask", [16])], samples=6,
                device="cpu", retry_failed=True)
    with ResultsStore(tmp_path) as store:
        summary = SweepRunner(plan, store, DistContext(rank=1, world_size=3), progress=False, log=lambda m: None,
                              loader=lambda spec: tiny).run()
    assert (summary.cells[0].planned, summary.cells[0].failed) == (2, 1)          # rank 1 owns samples 1 and 4
    again = {r["sample_index"]: r["run_id"] for r in rows(tmp_path, "status = 'error'")}
    assert set(again) == {1, 3, 5}
    assert again[3] == first[3] and again[5] == first[5] and again[1] != first[1]


def test_oom_retries_with_smaller_segments_then_records_a_failure(tmp_path, tiny):
    from test_runner_support import OOMTask

    fits, never = OOMTask(fits_at=256, name="oom_fits"), OOMTask(fits_at=0, name="oom_never")
    import harness.task_adapters as adapters

    original = adapters.resolve_task
    adapters.resolve_task = lambda name, options=None, offline=True: {"fits": fits, "never": never}[name]
    try:
        summary = run(tmp_path, [CellPlan("fits", [16]), CellPlan("never", [16])], samples=1, tiny=tiny)
    finally:
        adapters.resolve_task = original
    assert summary.cells[0].ok == 1
    assert fits.segments_seen == [2048, 1024, 512, 256]
    assert tiny.segment == 2048                                   # restored after the sample
    failed = rows(tmp_path, "task = 'oom_never'")
    assert failed[0]["status"] == "error" and failed[0]["error_kind"] == "oom"
    assert never.segments_seen[-1] == 64


def test_nonfinite_logits_and_scores_are_failure_rows(tmp_path, tiny):
    run(tmp_path, [CellPlan(f"{SUPPORT}:NaNLogitsTask", [16]), CellPlan(f"{SUPPORT}:NaNScoreTask", [16])],
        samples=1, tiny=tiny)
    stored = {r["task"]: r for r in rows(tmp_path)}
    assert stored["nan_logits"]["error_kind"] == "nonfinite" and "NaN/Inf" in stored["nan_logits"]["error"]
    assert stored["nan_score"]["error_kind"] == "nonfinite" and stored["nan_score"]["score"] is None
    assert tiny.check_finite  # the runner turns the check on


def test_identity_mismatch_is_refused(tmp_path, tiny):
    run(tmp_path, [CellPlan("niah_single_1", [512])], samples=1, tiny=tiny)
    with pytest.raises(CellIdentityError, match="seed"):
        run(tmp_path, [CellPlan("niah_single_1", [512])], samples=1, tiny=tiny, seed=1)
    record = rows(tmp_path)[0]
    assert '"needle_depth_tokens"' in record["record"] and record["sample_sha"]


def test_suites_parse_and_expand():
    smoke = plan_from_suite(load_suite("smoke"))
    assert smoke.models == ["gdn2-tiny-random"]
    cells = smoke.expand()
    assert ("niah_single_1", 1024, 4, {}) in cells and ("mqar", 256, 8, {}) in cells
    quick = plan_from_suite(load_suite("quick"))
    assert len(quick.models) == 8 and all(m.endswith("-small") for m in quick.models)
    assert ("mqar", 512, 20, {"num_kv_pairs": 32}) in quick.expand()
    table3 = plan_from_suite(load_suite("paper-table3"), samples=5, limit=3)
    assert {n for _, _, n, _ in table3.expand()} == {3}
    assert len(table3.expand()) == 14
    assert parse_length("4k") == 4096 and parse_length(2048) == 2048 and parse_length("1.5K") == 1536
    assert parse_length(None) is None
    for bad in ("four", "4.3k", "0", "-1k", "1e3"):    # 4.3k = 4403.2 tokens was truncated to 4403
        with pytest.raises(ValueError, match="context length"):
            parse_length(bad)


def test_bad_suite_keys_are_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [x]\ncells:\n  - task: niah_single_1\n    length: [1k]\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_suite(str(path))
