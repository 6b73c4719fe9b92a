"""Plots of a results store (matplotlib, Agg; each figure as PNG and SVG). Every figure says what it averages, what
its error bars are and over how many samples (title, legend or caption).

- accuracy_vs_length_<task>: mean score vs context length, one line per model; error bars are the 95% interval of
  the mean (Wilson for 0/100 scores, normal approximation otherwise); the legend gives each model's n per point;
- needle_heatmap_<task>: mean score by needle depth (where the queried needle sits, percent of the input) x context
  length, the models side by side on one colour scale, from the per-sample records (token_position_answer /
  input_tokens, else the first needle); bins without samples are grey and hatched, distinct from any score;
- perplexity_vs_position_<task>: per-position-bucket perplexity of the ppl:<corpus> tasks (their records hold
  bucket_nll / bucket_tokens and the bucket size), exp(summed nll / summed tokens) per bucket over the samples;
- accuracy_vs_state_size: mean score over the length-axis cells of each model vs its recurrent state per layer; a
  model without a fixed-size state (a Transformer) spans its KV cache per layer at the shortest and longest
  evaluated length when the store records its size per token, else it is a horizontal line at its score.

Every function returns the paths it wrote and writes nothing when the store has no data for it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.results import (
    NO_LENGTH,
    Results,
    cell_stats,
    is_perplexity_task,
    length_label,
    model_info,
    safe_name,
)

DEPTH_BINS = 10
HEATMAPS_PER_ROW = 4
DODGE = 0.04          # log2 offset between the models' points at one length
NO_SAMPLES_COLOUR = "0.85"
NO_SAMPLES_HATCH = "///"
INTERVAL_CAPTION = "error bars: 95% interval of the mean (Wilson for 0/100 scores, normal approximation otherwise)"


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


def _n_label(counts: list[int]) -> str:
    """'n=5' when every point has 5 samples, 'n=3–5' when they differ."""
    lo, hi = min(counts), max(counts)
    return f"n={lo}" if lo == hi else f"n={lo}–{hi}"


def binary_label(n: float) -> str:
    """Floats in binary units as state sizes are quoted: 65536 -> '64K', 3 * 2**20 -> '3M', 96 -> '96'."""
    for unit, size in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _caption(fig, text: str) -> None:
    fig.text(0.01, -0.01, text, fontsize=7, ha="left", va="top", wrap=True)


# ------------------------------------------------------------------------------------------------ vs length
def accuracy_vs_length(results: Results, out: Path) -> list[Path]:
    plt = _plt()
    stats = cell_stats(results)
    written = []
    for task in sorted({t for (_, t, length) in stats if length != NO_LENGTH and not is_perplexity_task(t)}):
        fig, ax = plt.subplots(figsize=(6, 4))
        lengths_seen = set()
        models = sorted({m for (m, t, _) in stats if t == task})
        for i, model in enumerate(models):
            points = sorted((length, s) for (m, t, length), s in stats.items()
                            if m == model and t == task and length != NO_LENGTH)
            xs = [length for length, _ in points]
            ys = [s.value for _, s in points]
            lo = [max(0.0, s.value - s.lo) if not math.isnan(s.lo) else 0 for _, s in points]   # >= 0: matplotlib
            hi = [max(0.0, s.hi - s.value) if not math.isnan(s.hi) else 0 for _, s in points]   # refuses negatives
            dodge = 2 ** (DODGE * (i - (len(models) - 1) / 2))      # side by side, so the bars do not overlap
            ax.errorbar([x * dodge for x in xs], ys, yerr=[lo, hi], marker="o", capsize=3,
                        label=f"{model} ({_n_label([s.n for _, s in points])})")
            lengths_seen.update(xs)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(lengths_seen), [length_label(x) for x in sorted(lengths_seen)])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("mean score (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="model (samples per point)", title_fontsize=8)
        _caption(fig, INTERVAL_CAPTION)
        written += _save(fig, out, f"accuracy_vs_length_{safe_name(task)}")
    return written


# ------------------------------------------------------------------------------------------------ heatmaps
def _depth_percent(record: dict) -> float | None:
    pos, total = record.get("token_position_answer"), record.get("input_tokens")
    if pos is not None and total:
        return 100.0 * pos / total
    depths = record.get("needle_depth_percent") or []
    return float(depths[0]) if depths else None


def depth_grids(results: Results, task: str) -> dict[str, tuple[list[int], Any, Any]]:
    """model -> (lengths, mean score [DEPTH_BINS, len(lengths)], sample count of the same shape) for one task.
    A bin without samples has count 0 and a masked mean (never a number)."""
    import numpy as np

    df = results.samples
    if df.empty:
        return {}
    ok = df[(df["status"] == "ok") & (df["length"] != NO_LENGTH) & (df["task"] == task)]
    grids = {}
    for model, group in ok.groupby("model"):
        cells: dict[tuple[int, int], list[float]] = {}
        for length, score, record in zip(group["length"], group["score"], group["record"], strict=True):
            depth = _depth_percent(json.loads(record or "{}"))
            if depth is None:
                continue
            b = min(int(depth // (100 / DEPTH_BINS)), DEPTH_BINS - 1)
            cells.setdefault((int(length), b), []).append(float(score))
        if not cells:
            continue
        lengths = sorted({length for length, _ in cells})
        total = np.zeros((DEPTH_BINS, len(lengths)))
        count = np.zeros((DEPTH_BINS, len(lengths)), dtype=int)
        for (length, b), scores in cells.items():
            total[b, lengths.index(length)] = sum(scores)
            count[b, lengths.index(length)] = len(scores)
        mean = np.ma.masked_array(np.divide(total, np.maximum(count, 1)), mask=count == 0)
        grids[str(model)] = (lengths, mean, count)
    return grids


def needle_heatmap_figure(task: str, grids: dict):
    """The models' depth x length grids side by side on one colour scale; empty bins grey and hatched."""
    from matplotlib.patches import Patch

    plt = _plt()
    models = sorted(grids)
    ncols = min(len(models), HEATMAPS_PER_ROW)
    nrows = math.ceil(len(models) / ncols)
    widest = max(len(grids[m][0]) for m in models)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.0 + ncols * max(2.2, 0.6 + 0.55 * widest), 0.8 + 4.2 * nrows),
                             squeeze=False, sharey=True)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad=(0, 0, 0, 0))   # empty bins show the hatched background
    step = 100 / DEPTH_BINS
    image = None
    for ax, model in zip(axes.flat, models, strict=False):
        lengths, mean, count = grids[model]
        ax.patch.set_facecolor(NO_SAMPLES_COLOUR)
        ax.patch.set_hatch(NO_SAMPLES_HATCH)
        ax.patch.set_edgecolor("0.6")
        image = ax.imshow(mean, aspect="auto", origin="upper", cmap=cmap, vmin=0, vmax=100)
        ax.set_xticks(range(len(lengths)), [length_label(length) for length in lengths])
        ax.set_yticks(range(DEPTH_BINS), [f"{int(i * step)}–{int((i + 1) * step)}%" for i in range(DEPTH_BINS)])
        ax.set_xlabel("context length")
        ax.set_title(f"{model}\nn={int(count.sum())}", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("needle depth")
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="mean score (%)")
    fig.legend(handles=[Patch(facecolor=NO_SAMPLES_COLOUR, hatch=NO_SAMPLES_HATCH, edgecolor="0.6",
                              label="no samples")], loc="upper right", bbox_to_anchor=(1.0, 0.0), fontsize=8,
               frameon=False)
    fig.suptitle(f"{task}: mean score by needle depth and context length", fontsize=10)
    _caption(fig, "each bin: mean of its samples' scores; n = scored samples of the model with a needle depth")
    return fig


def needle_heatmaps(results: Results, out: Path) -> list[Path]:
    df = results.samples
    if df.empty:
        return []
    written = []
    for task in sorted(set(df["task"])):
        grids = depth_grids(results, task)
        if grids:
            written += _save(needle_heatmap_figure(task, grids), out, f"needle_heatmap_{safe_name(task)}")
    return written


# ------------------------------------------------------------------------------------------------ perplexity
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
            samples = 0
            for metrics, record in zip(group["metrics"], group["record"], strict=True):
                data = {**json.loads(record or "{}"), **json.loads(metrics or "{}")}
                nll, toks = data.get("bucket_nll"), data.get("bucket_tokens")
                if not nll or not toks:
                    continue
                samples += 1
                size = data.get("bucket")
                if size:
                    edges = [i * size for i in range(len(nll) + 1)]
                for i, (a, b) in enumerate(zip(nll, toks, strict=True)):
                    if b:
                        nll_sum[i] = nll_sum.get(i, 0.0) + a
                        tok_sum[i] = tok_sum.get(i, 0.0) + b
            if not nll_sum:
                continue
            if fig is None:
                fig, ax = plt.subplots(figsize=(6, 4))
            idx = sorted(nll_sum)
            xs = [edges[i + 1] if edges and i + 1 < len(edges) else (i + 1) for i in idx]
            ax.plot(xs, [math.exp(nll_sum[i] / tok_sum[i]) for i in idx], marker="o",
                    label=f"{model} (n={samples})")
            drew = True
        if drew:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("token position (bucket end)")
            ax.set_ylabel("perplexity")
            ax.set_title(f"{task}: perplexity vs position")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title="model (samples)", title_fontsize=8)
            _caption(fig, "each point: exp(summed nll / summed tokens) of the bucket over all samples")
            written += _save(fig, out, f"perplexity_vs_position_{safe_name(task)}")
    return written


# ------------------------------------------------------------------------------------------------ state size
def _number(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def state_size_points(results: Results) -> list[dict]:
    """One entry per model with length-axis accuracy cells: model, score (mean over those cells), cells, lengths
    and either state (floats per layer) or, for a model without a fixed-size state, kv_per_token (KV-cache floats
    per token per layer, None when the store does not record it)."""
    stats = cell_stats(results)
    info = model_info(results)
    points = []
    for model in sorted({m for (m, _, _) in stats}):
        cells = {(t, length): s.value for (m, t, length), s in stats.items()
                 if m == model and length != NO_LENGTH and not is_perplexity_task(t) and not math.isnan(s.value)}
        if not cells:
            continue
        entry = {"model": model, "score": sum(cells.values()) / len(cells), "cells": len(cells),
                 "lengths": sorted({length for _, length in cells})}
        state = _number(info.get(model, {}).get("state_floats_per_layer"))
        if state:
            entry["state"] = state
        else:
            try:
                describe = json.loads(info.get(model, {}).get("describe") or "{}")
            except (TypeError, json.JSONDecodeError):
                describe = {}
            entry["kv_per_token"] = _number(describe.get("kv_cache_floats_per_token_per_layer"))
        points.append(entry)
    return points


def accuracy_vs_state_size_figure(points: list[dict]):
    """Recurrent models as points, KV-cache models as a segment over their evaluated lengths (or a line)."""
    from matplotlib.ticker import FuncFormatter

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^vP*Xh"
    for i, p in enumerate(points):
        style = dict(marker=markers[i % len(markers)], markersize=7, color=f"C{i % 10}")
        cells = f"{p['cells']} cells"
        if "state" in p:
            ax.plot([p["state"]], [p["score"]], linestyle="none",
                    label=f"{p['model']}: state {binary_label(p['state'])} ({cells})", **style)
        elif p.get("kv_per_token"):
            lo, hi = p["lengths"][0], p["lengths"][-1]
            ax.plot([p["kv_per_token"] * lo, p["kv_per_token"] * hi], [p["score"]] * 2, linestyle="-", **style,
                    label=f"{p['model']}: KV cache at {length_label(lo)}–{length_label(hi)} tokens ({cells})")
        else:
            ax.axhline(p["score"], linestyle="--", color=style["color"],
                       label=f"{p['model']}: no fixed-size state, KV size not recorded ({cells})")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: binary_label(x)))
    ax.set_xlabel("state per layer (floats); KV cache per layer for attention models")
    ax.set_ylabel("mean score over length-axis cells (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("accuracy vs state size")
    _caption(fig, "score: unweighted mean over the model's (task, length) cells outside perplexity tasks; "
                  "a model's cells may differ from another's")
    return fig


def accuracy_vs_state_size(results: Results, out: Path) -> list[Path]:
    points = state_size_points(results)
    if not any("state" in p or p.get("kv_per_token") for p in points):
        return []
    return _save(accuracy_vs_state_size_figure(points), out, "accuracy_vs_state_size")


def make_plots(results: Results, out: str | Path) -> list[Path]:
    out = Path(out)
    written = []
    for fn in (accuracy_vs_length, needle_heatmaps, perplexity_vs_position, accuracy_vs_state_size):
        written += fn(results, out)
    return written
