"""RULER post-processing and metrics on hand-made cases, the task registry, determinism, and the generate CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import UnknownTaskError, get_task, list_tasks
from tasks.offline_tokenizers import OFFLINE_TOKENIZERS
from tasks.ruler import Sample, postprocess_pred, score_prediction, string_match_all, string_match_part

ROOT = Path(__file__).resolve().parents[1]


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_postprocess():
    assert postprocess_pred("  1234567\x00tail\t\n ") == "1234567\ntail"
    assert postprocess_pred("a\x1fb") == "a\nb"
    assert postprocess_pred("\n\n") == ""


def test_string_match_all_partial_credit():
    preds = ["The numbers are 111 and 222.", "nothing", "AbC-dEf 333"]
    refs = [["111", "222", "999", "888"], ["5"], ["abc-def", "333"]]
    # (2/4 + 0 + 2/2) / 3 * 100 = 50.0
    assert string_match_all(preds, refs) == 50.0
    assert string_match_all(["x 1"], [["1", "2", "3"]]) == 33.33  # rounded to 2 decimals like RULER


def test_string_match_part_any_match():
    preds = ["Paris, France", "london", "none"]
    refs = [["Paris", "Lyon"], ["Rome", "London"], ["Berlin"]]
    assert string_match_part(preds, refs) == pytest.approx(66.67)


def test_metric_input_errors():
    with pytest.raises(ValueError):
        string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        string_match_all([], [])


def test_per_sample_score_and_aggregate():
    task = get_task("niah_multivalue")
    sample = {"outputs": ["1111111", "2222222", "3333333", "4444444"]}
    assert task.score(" 1111111, 3333333\x00", sample) == 50.0
    assert score_prediction("ROME", ["rome", "paris"], "string_match_part") == 100.0
    samples = [sample, {"outputs": ["5"]}]
    assert task.aggregate(["1111111 2222222 3333333 4444444", "no"], samples) == 50.0


# ---- registry ---------------------------------------------------------------------------------------------------
def test_registry_names_and_aliases():
    names = list_tasks()
    for n in ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
              "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "mqar", "niah_mqar_nl"]:
        assert n in names
    assert get_task("s_niah_1") is get_task("niah_single_1")
    assert get_task("S-NIAH-2").name == "niah_single_2"
    assert get_task("s_niah_3").name == "niah_single_3"
    assert get_task("mk_niah_1").name == "niah_multikey_1"
    assert get_task("niah_multikey_1").knobs.num_needle_k == 4
    assert get_task("niah_multiquery").knobs.num_keys == 4
    assert get_task("mqar").kind == "token" and get_task("vt").kind == "generate"


def test_unknown_task_lists_names_and_nearest():
    with pytest.raises(UnknownTaskError) as err:
        get_task("niah_singel_2")
    msg = str(err.value)
    assert "Did you mean 'niah_single_2'" in msg and "mk_niah_1" in msg


def test_tasks_import_without_torch():
    code = ("import sys, tasks, tasks.ruler, tasks.mqar, tasks.cli; tasks.get_task('vt'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- records, determinism, CLI ---------------------------------------------------------------------------------
def test_record_format_round_trip():
    tok = OFFLINE_TOKENIZERS["mistral"]()
    s = get_task("niah_single_3").build_samples(tok, 1024, 1, seed=0)[0]
    rec = s.to_record()
    assert list(rec)[:6] == ["index", "input", "outputs", "length", "length_w_model_temp", "answer_prefix"]
    for key in ["task", "max_new_tokens", "needle_depth_tokens", "haystack", "haystack_sha256", "seed"]:
        assert key in rec
    assert Sample.from_record(json.loads(json.dumps(rec))) == s


def _generate(args):
    import argparse

    from tasks.cli import add_generate_arguments, run_generate

    parsed = add_generate_arguments(argparse.ArgumentParser()).parse_args(args)
    return run_generate(parsed)


def test_same_seed_same_samples_across_processes(tmp_path):
    args = ["--length", "2048", "--samples", "4", "--tokenizer", "offline:mistral", "--seed", "11"]
    for task in ["niah_multikey_1", "vt"]:
        here, there = tmp_path / f"{task}-a.jsonl", tmp_path / f"{task}-b.jsonl"
        assert _generate(["--task", task, *args, "--out", str(here)]) == 0
        subprocess.run([sys.executable, "-m", "tasks.cli", "--task", task, *args, "--out", str(there)],
                       check=True, cwd=ROOT, capture_output=True)
        a, b = here.read_text(), there.read_text()
        assert a == b and len(a.splitlines()) == 4
    other = tmp_path / "other-seed.jsonl"
    assert _generate(["--task", "vt", *args[:-1], "12", "--out", str(other)]) == 0
    assert other.read_text() != (tmp_path / "vt-a.jsonl").read_text()


def test_cli_writes_ruler_records(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert _generate(["--task", "niah_single_1", "--length", "2k", "--samples", "5", "--tokenizer",
                      "offline:gpt-neox", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert all(0.9 * 2048 <= r["length"] <= 2048 for r in rows)
    assert all(set(r) >= {"index", "input", "outputs", "length", "answer_prefix"} for r in rows)
    assert _generate(["--task", "nope", "--length", "2k", "--tokenizer", "offline:gpt-neox"]) == 2
    assert "Known tasks" in capsys.readouterr().err


def test_cli_tokenizer_file_path(tmp_path):
    from tasks.offline_tokenizers import gpt_neox_path, mistral_model_path

    for path in [gpt_neox_path(), mistral_model_path()]:
        out = tmp_path / "p.jsonl"
        assert _generate(["--task", "fwe", "--length", "1024", "--samples", "2", "--tokenizer", str(path),
                          "--out", str(out)]) == 0
        assert len(out.read_text().splitlines()) == 2


def test_registry_aliases_match_task_rows():
    for name, aliases in list_tasks().items():
        task = get_task(name)
        assert task.name == name
        if hasattr(task, "aliases"):
            assert tuple(task.aliases) == tuple(aliases)
