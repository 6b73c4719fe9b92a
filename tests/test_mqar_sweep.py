"""scripts/mqar_sweep.py at smoke scale on the CPU: one row per model x width x evaluated pair count with the state
size of each family, accuracies in [0, 100] over every query of the evaluation sequences, and a CSV that reads back
as the rows it was written from; --replot joins the sweeps of two seeds into one CSV and plot."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import mqar_sweep  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sweep_rows_and_csv_round_trip(tmp_path):
    out = tmp_path / "mqar"
    flags = ["--models", "gdn2", "transformer", "--widths", "64", "--layers", "1", "--seq-len", "64",
             "--train-pairs", "4", "8", "--eval-pairs", "4", "8", "--eval-sequences", "3", "--steps", "2",
             "--batch-size", "4", "--device", "cpu", "--out", str(out)]
    assert mqar_sweep.main(flags) == 0
    rows = mqar_sweep.read_results(out / "mqar_sweep.csv")
    assert [(r["model"], r["kv_pairs"]) for r in rows] == [("gdn2", 4), ("gdn2", 8), ("transformer", 4),
                                                           ("transformer", 8)]
    assert {r["model"]: r["state_floats_per_layer"] for r in rows} == {"gdn2": 64 * 64, "transformer": 0}
    assert [r["queries"] for r in rows] == [3 * 4, 3 * 8] * 2
    assert all(0.0 <= r["accuracy"] <= 100.0 and r["steps"] == 2 and r["seed"] == 0 for r in rows)
    other = tmp_path / "seed1"
    assert mqar_sweep.main([*flags[:-2], "--seed", "1", "--out", str(other)]) == 0
    joined = tmp_path / "joined"
    assert mqar_sweep.main(["--replot", str(out / "mqar_sweep.csv"), str(other / "mqar_sweep.csv"),
                            "--out", str(joined)]) == 0
    both = mqar_sweep.read_results(joined / "mqar_sweep.csv")
    assert [(r["model"], r["kv_pairs"], r["seed"]) for r in both] == [
        (m, p, s) for m in ("gdn2", "transformer") for p in (4, 8) for s in (0, 1)]
    assert [r for r in both if r["seed"] == 0] == rows
    assert (joined / "mqar_sweep.png").stat().st_size > 0
