"""A built wheel works on its own: installed into an empty folder and run from outside the source tree (so the
checkout cannot shadow it), the `gdn2-eval` script runs a RULER cell on the bundled model with the bundled tokenizer
and the shipped haystack text, and reports a store beside the paper's numbers (shipped in the package)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_report import build_known_store

REPO = Path(__file__).resolve().parent.parent
# What the wheel is built from: the project's metadata and its packages (not results, tests, docs or local state).
SOURCES = ["pyproject.toml", "README.md", "gdn2", "harness", "baselines", "tasks"]


def build_and_install(tmp: Path) -> Path:
    """Build the wheel from a clean copy of the sources (no stale build/ can leak into it); install it into tmp/site."""
    src = tmp / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp / "dist")],
                   check=True, cwd=tmp, capture_output=True)
    wheel = next((tmp / "dist").glob("gdn2_harness-*.whl"))
    subprocess.run(pip + ["install", "-q", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, cwd=tmp, capture_output=True)
    return tmp / "site"


def run_installed(site: Path, cwd: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([str(site / "bin" / "gdn2-eval"), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    site = build_and_install(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import harness, tasks; print(harness.__file__, tasks.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where      # the installed copy, not the checkout

    run_installed(site, work, "run", "--models", "gdn2-tiny-random", "--tasks", "niah_single_2", "--lengths", "1k",
                  "--samples", "1", "--device", "cpu", "--output", "r", "--no-report", "--no-progress")
    assert (work / "r" / "results.sqlite").is_file()

    store = build_known_store(tmp_path / "known")
    report = run_installed(site, work, "report", str(store))
    assert "Table 3 (RULER" in report and "paper: Gated DeltaNet-2" in report
    assert (store / "report" / "plots" / "accuracy_vs_length_niah_single_1.png").is_file()
