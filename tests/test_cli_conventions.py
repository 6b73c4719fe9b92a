"""Conventions lm-eval users expect: comma-separated --tasks / --lengths, --limit as a count or a fraction.
(The `gdn2-eval` console script is run from an installed wheel in test_wheel.py.)"""
from __future__ import annotations

import pytest

from harness.cli import build_parser, make_plan


def plan_of(*argv: str):
    return make_plan(build_parser().parse_args(["run", "--models", "gdn2-tiny-random", *argv]))


def cells(plan) -> list[tuple]:
    return [(c.task, c.lengths, c.samples) for c in plan.cells]


@pytest.mark.parametrize("tasks,lengths", [(["niah_single_1,mqar"], ["1k,2k"]),
                                           (["niah_single_1", "mqar"], ["1k", "2k"]),
                                           (["niah_single_1,", "mqar"], ["1k,", "2k"])])
def test_tasks_and_lengths_take_commas_or_spaces(tasks, lengths):
    plan = plan_of("--tasks", *tasks, "--lengths", *lengths)
    assert [(c.task, c.lengths) for c in plan.cells] == [("niah_single_1", [1024, 2048]), ("mqar", [1024, 2048])]


def test_empty_task_list_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--tasks", ","])
    assert "no names given" in capsys.readouterr().err


def test_limit_count_caps_every_cell():
    plan = plan_of("--tasks", "mqar", "--lengths", "128", "--samples", "50", "--limit", "20")
    assert plan.limit == 20 and [n for _, _, n, _ in plan.expand()] == [20]


@pytest.mark.parametrize("limit,samples,expected", [("0.1", "50", 5), ("0.25", "10", 3), ("0.001", "50", 1)])
def test_limit_fraction_keeps_that_share_rounded_up(limit, samples, expected):
    plan = plan_of("--tasks", "mqar", "--lengths", "128", "--samples", samples, "--limit", limit)
    assert plan.limit is None and [n for _, _, n, _ in plan.expand()] == [expected]


def test_limit_fraction_of_the_default_sample_count():
    from harness.runner import DEFAULT_SAMPLES

    plan = plan_of("--tasks", "mqar", "--lengths", "128", "--limit", "0.5")
    assert [n for _, _, n, _ in plan.expand()] == [DEFAULT_SAMPLES // 2]


def test_limit_fraction_reaches_lm_eval_for_its_full_document_set():
    plan = plan_of("--tasks", "lm_eval:piqa", "mqar", "--lengths", "128", "--limit", "0.1")
    expanded = {task: n for task, _, n, _ in plan.expand()}
    assert expanded["lm_eval:piqa"] == 0.1        # lm-eval's simple_evaluate(limit=0.1): a tenth of its documents


@pytest.mark.parametrize("bad", ["0", "1.5", "-3", "ten", "nan"])
def test_bad_limit_is_explained(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--limit", bad])
    assert "fraction between 0 and 1" in capsys.readouterr().err

