"""The command line: help for every command, list commands, errors that say what to do, the no-argument quick run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def test_help_for_every_command(capsys):
    for argv in (["--help"], ["run", "--help"], ["report", "--help"], ["list", "--help"], ["generate", "--help"],
                 ["bench", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "usage:" in out
    assert "python run_eval.py list suites" in build_parser().format_help()


def test_list_suites_tasks_models(capsys):
    assert main(["list", "suites"]) == 0
    out = capsys.readouterr().out
    for suite in ("quick", "paper-table3"):
        assert suite in out
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "niah_single_1" in out and "s_niah_1" in out and "mqar" in out
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "gdn2-tiny-random" in out and "random init" in out


def test_unknown_names_suggest_the_nearest(capsys, tmp_path):
    assert main(["run", "--tasks", "niah_singel_1", "--output", str(tmp_path)]) == 2
    assert "niah_single_1" in capsys.readouterr().err
    assert main(["run", "--suite", "quik", "--output", str(tmp_path)]) == 2
    assert "'quick'" in capsys.readouterr().err


def test_report_of_a_missing_folder_says_what_to_pass(capsys, tmp_path):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "--output folder" in capsys.readouterr().err


def test_bad_paper_row_is_explained(tmp_path, capsys):
    assert main(["run", "--paper-row", "x=Gated DeltaNet-2", "--output", str(tmp_path)]) == 2
    assert "recurrent:NAME" in capsys.readouterr().err


def test_run_then_report_in_process(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["run", "--models", "gdn2-tiny-random", "--device", "cpu", "--tasks", "mqar", "--lengths", "128",
                 "--samples", "2", "--output", str(out), "--no-progress",
                 "--paper-row", "gdn2-tiny-random=recurrent:Gated DeltaNet-2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mqar@128" in printed and "results.sqlite" in printed
    assert (out / "report" / "all.md").is_file() and (out / "exports" / "gdn2-tiny-random" / "results.json").is_file()
    assert main(["report", str(out), "--format", "latex", "--no-plots"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out


def test_no_arguments_runs_the_quick_suite(monkeypatch, capsys):
    """`python run_eval.py` is `run` of the quick suite (the eight bundled small models) into runs/default."""
    import harness.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_run", lambda args, argv: seen.update(args=args, argv=argv) or 0)
    assert cli.main([]) == 0
    assert seen["argv"] == ["run"] and seen["args"].suite is None and seen["args"].output is None
    assert "bundled small models" in capsys.readouterr().err
    plan = cli.make_plan(seen["args"])
    assert plan.name == "quick" and len(plan.models) == 8 and plan.allow_longer_context
    assert str(cli.default_output_for(seen["args"], plan)) == "runs/default"


def test_quick_suite_runs_every_bundled_model(tmp_path):
    """The default run's suite end to end on all eight bundled models, one sample per cell, in a subprocess as a user
    runs it: every model loads, every cell is scored, the report names every model."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "run_eval.py"), "run", "--suite", "quick", "--samples", "1",
                           "--output", str(tmp_path / "q"), "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for model in ("gdn2-small", "gdn2-scalar-erase-small", "gdn2-scalar-write-small", "gated_deltanet-small",
                  "kda-small", "mamba2-small", "mamba3-small", "transformer-small"):
        assert model in done.stdout
    assert "niah_single_1@1k" in done.stdout and "mqar@512" in done.stdout
    assert "80 sample(s) scored" in done.stdout and "0 failed sample(s), 0 cell(s) failed" in done.stdout


def test_doctor_options_pass_through_the_cli(capsys):
    # `run_eval.py doctor --family X --device D` must reach the doctor (an earlier REMAINDER wiring refused them)
    assert main(["doctor", "--family", "transformer", "--device", "cpu", "--seq-len", "130"]) == 0
    out = capsys.readouterr().out
    assert "transformer  logits upstream vs reference (T=130)  ok" in out


def test_haystack_file_reaches_essay_cells_only(tmp_path):
    essay = tmp_path / "essays.txt"
    essay.write_text(" ".join(f"Sentence number {i} is about gardens and rivers." for i in range(3000)))
    args = build_parser().parse_args(["run", "--tasks", "niah_single_1", "niah_single_2", "--lengths", "1k",
                                      "--haystack-file", str(essay), "--output", str(tmp_path / "out")])
    from harness.cli import make_plan

    plan = make_plan(args)
    options = {cell.task: cell.options for cell in plan.cells}
    assert options["niah_single_2"] == {"haystack_file": str(essay.resolve())}   # essay haystack
    assert options["niah_single_1"] == {}                                         # noise haystack: untouched
    assert main(["run", "--tasks", "niah_single_2", "--lengths", "1k", "--samples", "1", "--haystack-file",
                 str(essay), "--output", str(tmp_path / "out"), "--no-report", "--no-progress"]) == 0
    import json
    import sqlite3

    record = sqlite3.connect(tmp_path / "out" / "results.sqlite").execute("select record from samples").fetchone()[0]
    assert "Sentence number" in record and json.loads(record)["haystack"] == "essays"
