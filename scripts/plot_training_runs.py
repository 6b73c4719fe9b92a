"""Plot the training records (training.json, written by scripts/train_small.py) of several runs of the same models:
one panel per model, the training loss and the needle checks of each run against the step, so runs that learned
retrieval and runs that did not are told apart at a glance.

    python scripts/plot_training_runs.py --runs seed0=harness/bundled seed1=results/small-models/seed1 \
        --out results/small-models/two-seeds-training.png

A run is LABEL=FOLDER; FOLDER holds either <model>-small/training.json (a bundle) or <model>-small.training.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHECK = "single_noise@1024"      # the needle-check set at the whole training context (noise haystack)


def read_run(folder: Path) -> dict[str, dict]:
    """{model name: training record} of every record in folder (either layout)."""
    paths = sorted(folder.glob("*/training.json")) + sorted(folder.glob("*.training.json"))
    records = {}
    for path in paths:
        record = json.loads(path.read_text())
        records[record["name"]] = record
    if not records:
        raise SystemExit(f"error: no training.json records in {folder} (expected <model>/training.json or "
                         "<model>.training.json)")
    return records


def parse_runs(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"error: --runs takes LABEL=FOLDER items, e.g. seed0=harness/bundled; got {item!r}")
        runs[label] = Path(folder)
    return runs


def plot(runs: dict[str, dict[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = sorted(set.intersection(*(set(records) for records in runs.values())))
    if not models:
        raise SystemExit("error: the runs share no model name")
    cols = 4
    rows = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    twins = []
    for ax, model in zip(axes.flat, models, strict=False):
        checks_ax = ax.twinx()
        twins.append(checks_ax)
        for i, (label, records) in enumerate(runs.items()):
            result = records[model]["result"]
            steps, losses = zip(*result["losses"], strict=True)              # [[step, loss], ...]
            ax.plot(steps, losses, color=colors[i], lw=0.8, alpha=0.6, label=f"{label} loss")
            checks = result.get("needle_checks") or []
            checks_ax.plot([s for s, _ in checks], [100 * c.get(CHECK, float("nan")) for _, c in checks],
                           color=colors[i], lw=1.8, ls="--", label=f"{label} needles")
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("training loss", fontsize=8)
        checks_ax.set_ylim(-3, 103)
        checks_ax.set_ylabel(f"needle check {CHECK} (%)", fontsize=8)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    lines, labels = axes.flat[0].get_legend_handles_labels()
    twin_lines, twin_labels = twins[0].get_legend_handles_labels()
    fig.legend(lines + twin_lines, labels + twin_labels, loc="upper center", ncol=2 * len(runs), fontsize=8,
               bbox_to_anchor=(0.5, 0.975))
    fig.suptitle("Training loss (solid) and needle checks (dashed, 40 held-out training-style documents) per run",
                 fontsize=10, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=FOLDER")
    p.add_argument("--out", required=True, type=Path, help="PNG path")
    args = p.parse_args(argv)
    runs = {label: read_run(folder) for label, folder in parse_runs(args.runs).items()}
    plot(runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
