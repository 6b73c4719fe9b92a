"""scripts/plot_training_runs.py reads training records in both layouts (a bundle's <model>/training.json and a
results folder's <model>.training.json), plots the models the runs share, and names bad input."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import plot_training_runs  # noqa: E402


def record(name: str, final: float) -> dict:
    losses = [[25 * (k + 1), 8.0 - k * (8.0 - final) / 9] for k in range(10)]
    checks = [[125, {"single_noise@1024": 0.0}], [250, {"single_noise@1024": 0.5}]]
    return {"name": name, "result": {"losses": losses, "needle_checks": checks}}


def test_both_layouts_are_read_and_plotted(tmp_path):
    bundle, flat = tmp_path / "bundle", tmp_path / "flat"
    for name, final in (("a-small", 5.0), ("b-small", 4.0)):
        (bundle / name).mkdir(parents=True)
        (bundle / name / "training.json").write_text(json.dumps(record(name, final)))
    flat.mkdir()
    (flat / "a-small.training.json").write_text(json.dumps(record("a-small", 3.0)))
    runs = {label: plot_training_runs.read_run(folder) for label, folder in (("s0", bundle), ("s1", flat))}
    assert set(runs["s0"]) == {"a-small", "b-small"} and set(runs["s1"]) == {"a-small"}
    out = tmp_path / "plot.png"
    assert plot_training_runs.main(["--runs", f"s0={bundle}", f"s1={flat}", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_named(tmp_path):
    with pytest.raises(SystemExit, match="--runs takes LABEL=FOLDER items.*got 'seed0'"):
        plot_training_runs.parse_runs(["seed0"])
    with pytest.raises(SystemExit, match=f"no training.json records in {tmp_path}"):
        plot_training_runs.read_run(tmp_path)
