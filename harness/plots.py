"""Plots of a results store (matplotlib, Agg; each figure as PNG and SVG).

- accuracy_vs_length_<task>: mean score vs context length, one line per model, 95% intervals as error bars;
- needle_heatmap_<model>_<task>: mean score by needle depth (where the queried needle sits, percent of the input)
  x context length, from the per-sample records (token_position_answer / input_tokens, else the first needle);
- perplexity_vs_position_<task>: per-position-bucket perplexity of the ppl:<corpus> tasks (their records hold
  bucket_nll / bucket_tokens and the bucket size), exp(summed nll / summed tokens) per bucket over the samples;
- accuracy_vs_state_size: mean score over the length-axis cells of each model vs its recurrent state per layer.

Every function returns the paths it wrote and writes nothing when the store has no data for it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from harness.report import NO_LENGTH, Results, _model_info, _safe, cell_stats, is_perplexity_task, length_label

DEPTH_BINS = 10


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    return paths


def accuracy_vs_length(results: Results, out: Path) -> list[Path]:
    plt = _plt()
    stats = cell_stats(results)
    written = []
    for task in sorted({t for (_, t, l) in stats if l != NO_LENGTH and not is_perplexity_task(t)}):
        fig, ax = plt.subplots(figsize=(6, 4))
        lengths_seen = set()
        for model in sorted({m for (m, t, _) in stats if t == task}):
            points = sorted((l, s) for (m, t, l), s in stats.items() if m == model and t == task and l != NO_LENGTH)
            xs = [l for l, _ in points]
            ys = [s.value for _, s in points]
            lo = [max(0.0, s.value - s.lo) if not math.isnan(s.lo) else 0 for _, s in points]   # >= 0: matplotlib
            hi = [max(0.0, s.hi - s.value) if not math.isnan(s.hi) else 0 for _, s in points]   # refuses negatives
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=model)
            lengths_seen.update(xs)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(lengths_seen), [length_label(x) for x in sorted(lengths_seen)])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written += _save(fig, out, f"accuracy_vs_length_{_safe(task)}")
    return written


def _depth_percent(record: dict) -> float | None:
    pos, total = record.get("token_position_answer"), record.get("input_tokens")
    if pos is not None and total:
        return 100.0 * pos / total
    depths = record.get("needle_depth_percent") or []
    return float(depths[0]) if depths else None


def needle_heatmaps(results: Results, out: Path) -> list[Path]:
    import numpy as np

    plt = _plt()
    df = results.samples
    if df.empty:
        return []
    ok = df[(df["status"] == "ok") & (df["length"] != NO_LENGTH)]
    written = []
    for (model, task), group in ok.groupby(["model", "task"]):
        cells: dict[tuple[int, int], list[float]] = {}
        for length, score, record in zip(group["length"], group["score"], group["record"]):
            depth = _depth_percent(json.loads(record or "{}"))
            if depth is None:
                continue
            b = min(int(depth // (100 / DEPTH_BINS)), DEPTH_BINS - 1)
            cells.setdefault((int(length), b), []).append(float(score))
        if not cells:
            continue
        lengths = sorted({l for l, _ in cells})
        grid = np.full((DEPTH_BINS, len(lengths)), np.nan)
        for (l, b), scores in cells.items():
            grid[b, lengths.index(l)] = sum(scores) / len(scores)
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 4.5))
        im = ax.imshow(grid, aspect="auto", origin="upper", cmap="RdYlGn", vmin=0, vmax=100)
        ax.set_xticks(range(len(lengths)), [length_label(l) for l in lengths])
        step = 100 / DEPTH_BINS
        ax.set_yticks(range(DEPTH_BINS), [f"{int(i * step)}–{int((i + 1) * step)}%" for i in range(DEPTH_BINS)])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{model}: {task}", fontsize=9)
        fig.colorbar(im, ax=ax, label="score (%)")
        written += _save(fig, out, f"needle_heatmap_{_safe(model)}_{_safe(task)}")
    return written


def perplexity_vs_position(results: Results, out: Path) -> list[Path]:
    plt = _plt()
    df = results.samples
    if df.empty:
        return []
    written = []
    ok = df[df["status"] == "ok"]
    for task, tgroup in ok.groupby("task"):
        fig, ax, drew = None, None, False
        for model, group in tgroup.groupby("model"):
            nll_sum: dict[int, float] = {}
            tok_sum: dict[int, float] = {}
            edges = None
            for metrics, record in zip(group["metrics"], group["record"]):
                data = {**json.loads(record or "{}"), **json.loads(metrics or "{}")}
                nll, toks = data.get("bucket_nll"), data.get("bucket_tokens")
                if not nll or not toks:
                    continue
                size = data.get("bucket")
                if size:
                    edges = [i * size for i in range(len(nll) + 1)]
                for i, (a, b) in enumerate(zip(nll, toks)):
                    if b:
                        nll_sum[i] = nll_sum.get(i, 0.0) + a
                        tok_sum[i] = tok_sum.get(i, 0.0) + b
            if not nll_sum:
                continue
            if fig is None:
                fig, ax = plt.subplots(figsize=(6, 4))
            idx = sorted(nll_sum)
            xs = [edges[i + 1] if edges and i + 1 < len(edges) else (i + 1) for i in idx]
            ax.plot(xs, [math.exp(nll_sum[i] / tok_sum[i]) for i in idx], marker="o", label=model)
            drew = True
        if drew:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("token position (bucket end)")
            ax.set_ylabel("perplexity")
            ax.set_title(f"{task}: perplexity vs position")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            written += _save(fig, out, f"perplexity_vs_position_{_safe(task)}")
    return written


def accuracy_vs_state_size(results: Results, out: Path) -> list[Path]:
    plt = _plt()
    stats = cell_stats(results)
    info = _model_info(results)
    points = []
    for model in sorted({m for (m, _, _) in stats}):
        values = [s.value for (m, t, l), s in stats.items()
                  if m == model and l != NO_LENGTH and not is_perplexity_task(t) and not math.isnan(s.value)]
        state = info.get(model, {}).get("state_floats_per_layer")
        if values and state is not None and not (isinstance(state, float) and math.isnan(state)) and state > 0:
            points.append((model, float(state), sum(values) / len(values)))
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, state, acc in points:
        ax.scatter([state], [acc], s=40)
        ax.annotate(model, (state, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recurrent state per layer (floats)")
    ax.set_ylabel("mean score over length-axis cells (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    return _save(fig, out, "accuracy_vs_state_size")


def make_plots(results: Results, out: str | Path) -> list[Path]:
    out = Path(out)
    written = []
    for fn in (accuracy_vs_length, needle_heatmaps, perplexity_vs_position, accuracy_vs_state_size):
        written += fn(results, out)
    return written
