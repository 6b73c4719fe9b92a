"""The report of a known store (built deterministically here) matches the checked-in expected tables
(tests/data/expected_report/). After an intended change of the layout, regenerate them with
    UPDATE_EXPECTED_REPORT=1 .venv/bin/python -m pytest tests/test_report.py
and review the diff."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from harness.report import build_tables, lm_eval_json, write_report
from harness.results import interval95, load_results, standard_error
from harness.store import ResultsStore, SampleRow

EXPECTED = Path(__file__).resolve().parent / "data" / "expected_report"
MODELS = [
    # model, setting:paper row, state floats per layer, non-embedding params
    ("gdn2-demo", "recurrent:Gated DeltaNet-2", 262144, 1_310_000_000),
    ("transformer-demo", "hybrid:Transformer", 0, 1_290_000_000),
    ("mystery-demo", None, 65536, 350_000_000),
]
KV_FLOATS_PER_TOKEN = {"transformer-demo": 4096}   # describe() of an attention model: KV cache per token per layer


def build_known_store(folder: str | Path) -> Path:
    """A small store with every kind of row the report handles: RULER cells (0/100 and fractional scores, needle
    depths), a failure row, a failed cell, an lm-eval cell with its aggregate, perplexity rows with buckets."""
    folder = Path(folder)
    with ResultsStore(folder) as store:
        store.start_run("run-1", 0, 1, {"argv": ["run"], "git_hash": "0" * 40, "packages": {"torch": "x"},
                                        "device": "cpu", "dtype": "float32", "seed": 0})
        for m, (name, paper, state, params) in enumerate(MODELS):
            setting, _, paper_model = (paper or "").partition(":")
            describe_extra = ({"kv_cache_floats_per_token_per_layer": KV_FLOATS_PER_TOKEN[name]}
                              if name in KV_FLOATS_PER_TOKEN else {})
            store.put_model({"model": name, "spec": name, "family": "demo", "source": name, "backend": "torch",
                             "device": "cpu", "dtype": "float32", "state_floats_per_layer": state,
                             "num_params_non_embedding": params, "paper_setting": setting or None,
                             "paper_model": paper_model or None, "random_init": 0,
                             "describe": {"name": name, **describe_extra}})
            for task, length, n in (("niah_single_1", 1024, 5), ("niah_single_1", 2048, 5),
                                    ("niah_multikey_1", 1024, 4)):
                for i in range(n):
                    if task == "niah_multikey_1":
                        score = [100.0, 75.0, 50.0, 25.0][(i + m) % 4]
                    else:
                        score = 100.0 if (i + m + length // 1024) % 3 else 0.0
                    depth = 10 + 20 * i
                    store.add_sample(SampleRow(name, task, length, i, "ok", score, f"answer {i}",
                                               record={"input_tokens": 1000, "token_position_answer": depth * 10,
                                                       "needle_depth_percent": [float(depth)],
                                                       "outputs": [str(1000000 + i)]}, run_id="run-1"))
            store.add_sample(SampleRow(name, "niah_single_1", 2048, 5, "error", None, "", error_kind="oom",
                                       error="out of memory at segment 64", run_id="run-1"))
            for i in range(3):
                store.add_sample(SampleRow(name, "lm_eval:piqa", 0, i, "ok", 100.0 * ((i + m) % 2), str(i % 2),
                                           metrics={"acc": float((i + m) % 2)}, record={"doc_id": i}))
            store.begin_cell(name, "lm_eval:piqa", 0, {"seed": 0}, "s", None, "run-1")
            store.set_cell_status(name, "lm_eval:piqa", 0, "done")
            acc = sum((i + m) % 2 for i in range(3)) / 3
            store.set_cell_aggregate(name, "lm_eval:piqa", 0, {"acc": acc, "piqa_acc": 100 * acc},
                                     {"paper_columns": {"piqa_acc": "acc"}}, None)
            for i in range(2):
                store.add_sample(SampleRow(name, "ppl:shakespeare", 512, i, "ok", 20.0 + m, "",
                                           metrics={"nll_sum": 512 * math.log(20.0 + m + i), "tokens": 512.0},
                                           record={"bucket": 256, "bucket_nll": [256 * 3.2, 256 * 3.0 - m],
                                                   "bucket_tokens": [256, 256]}))
        store.set_cell_status("mystery-demo", "niah_single_2", 4096, "failed",
                              "could not build samples: LengthTargetError: too short")
    return folder


@pytest.fixture(scope="module")
def known_store(tmp_path_factory):
    return build_known_store(tmp_path_factory.mktemp("known"))


RENDERED = {"all.md": lambda t: t["all"].markdown(), "table3.md": lambda t: t["table3"].markdown(),
            "table3.tex": lambda t: t["table3"].latex(), "table3.csv": lambda t: t["table3"].csv(),
            "table2.md": lambda t: t["table2"].markdown()}


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_report_matches_checked_in_tables(known_store, name):
    text = RENDERED[name](build_tables(known_store))
    path = EXPECTED / name
    if os.environ.get("UPDATE_EXPECTED_REPORT"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"report table {name} changed; see the module docstring to regenerate"


def test_paper_rows_and_deltas(known_store):
    t3 = build_tables(known_store)["table3"]
    labels = [r.label for r in t3.rows]
    assert labels[:3] == ["gdn2-demo", "↳ paper: Gated DeltaNet-2", "↳ Δ (ours − paper)"]
    assert [r.setting for r in t3.rows] == ["recurrent"] * 3 + ["hybrid"] * 3 + ["other"]
    ours, paper, delta = t3.rows[:3]
    assert paper.cells["s_niah_1@1k"] == 100.0
    assert delta.cells["s_niah_1@1k"] == pytest.approx(ours.cells["s_niah_1@1k"].value - 100.0)
    assert ours.cells["s_niah_1@2k"].failed == 1 and ours.cells["s_niah_1@2k"].n == 5


def test_intervals():
    lo, hi = interval95([100.0] * 5)
    assert hi == pytest.approx(100.0) and lo == pytest.approx(56.55, abs=0.01)   # Wilson, 5/5: 5 / (5 + z^2)
    lo, hi = interval95([0.0, 100.0] * 50)
    assert lo == pytest.approx(40.38, abs=0.01) and hi == pytest.approx(59.62, abs=0.01)
    lo, hi = interval95([25.0, 50.0, 75.0])          # normal: 50 +- 1.96 * 25 / sqrt(3)
    assert lo == pytest.approx(50 - 1.959964 * 25 / 3 ** 0.5) and hi == pytest.approx(50 + 1.959964 * 25 / 3 ** 0.5)
    assert interval95([60.0, 90.0]) == (pytest.approx(75 - 1.959964 * 15), 100.0)   # se 15; clipped at 100
    assert all(math.isnan(x) for x in interval95([50.0])) and all(math.isnan(x) for x in interval95([]))
    assert standard_error([100.0, 100.0, 0.0, 100.0, 100.0]) == pytest.approx(20.0)
    assert math.isnan(standard_error([100.0]))


def test_write_report_files_plots_and_exports(known_store, tmp_path):
    report = write_report(known_store, out=tmp_path / "rep")
    names = {p.name for p in report["files"]}
    for expected in ("all.md", "all.tex", "all.csv", "table3.md", "table2.csv", "report.md",
                     "accuracy_vs_length_niah_single_1.png", "accuracy_vs_length_niah_single_1.svg",
                     "needle_heatmap_niah_single_1.png", "perplexity_vs_position_ppl_shakespeare.svg",
                     "accuracy_vs_state_size.png", "niah_single_1@1024.csv", "niah_single_1@1024.parquet",
                     "results.json"):
        assert expected in names, expected
    data = json.loads((known_store / "exports" / "gdn2-demo" / "results.json").read_text())
    assert data["results"]["niah_single_1@2048"]["failed,none"] == 1
    assert data["git_hash"] == "0" * 40
    exported = lm_eval_json(load_results(known_store))["gdn2-demo"]
    assert exported["n-samples"]["niah_single_1@1024"]["effective"] == 5
    # scores 100, 100, 0, 100, 100: sample sd sqrt(2000), standard error sqrt(2000 / 5) = 20 (lm-eval's stderr)
    assert exported["results"]["niah_single_1@1024"]["score_stderr,none"] == pytest.approx(20.0)
    assert exported["results"]["ppl:shakespeare@512"]["score_stderr,none"] == "N/A"


@pytest.mark.parametrize("haystack,noted", [("milton-areopagitica", True), ("moby-dick", True),
                                            ("PaulGrahamEssays", False), ("paul_graham_essays", False)])
def test_table3_notes_every_essay_haystack_that_is_not_rulers(tmp_path, haystack, noted):
    with ResultsStore(tmp_path) as store:
        for task, hay in (("niah_single_1", "noise"), ("niah_single_2", haystack)):
            store.begin_cell("m", task, 1024, {"haystack": [[hay, "0" * 64]]}, task, 1, "run-1")
            store.add_sample(SampleRow("m", task, 1024, 0, "ok", 100.0))
    notes = build_tables(tmp_path)["table3"].notes
    assert any(haystack in n and "not directly comparable" in n for n in notes) == noted
    assert not any("noise" in n for n in notes)
