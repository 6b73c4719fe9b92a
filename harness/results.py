"""Results of a store and their per-cell statistics, shared by the report tables and the plots.

    results = load_results("runs/default")          # Results: samples, models, cells, runs as DataFrames
    stats = cell_stats(results)                      # (model, task, length) -> CellStat (value, n, 95% interval)

A cell's value is the mean per-sample score of its rows with status 'ok' (percent for accuracies); perplexity rows
aggregate exp(sum nll / sum tokens), and cells a whole-cell engine scored (lm-eval) take its aggregate. The 95%
interval is Wilson's for 0/100 scores and the normal approximation for fractional ones.
"""
from __future__ import annotations

import json
import math
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from harness.store import DB_NAME, NO_LENGTH

FEW_SAMPLES = 100
Z95 = 1.959963984540054


@dataclass
class Results:
    """The rows of one store as pandas DataFrames (samples with metrics/record parsed lazily)."""

    folder: Path
    samples: Any          # DataFrame: model, task, length, sample_index, status, score, prediction, error_kind, ...
    models: Any           # DataFrame: model, family, state_floats_per_layer, num_params_non_embedding, paper_*, ...
    cells: Any            # DataFrame: model, task, length, status, error, identity, ...
    runs: Any             # DataFrame: run_id, rank, git_hash, packages, ...


def load_results(folder: str | Path) -> Results:
    import pandas as pd

    folder = Path(folder)
    path = folder / DB_NAME if folder.is_dir() else folder
    if not path.is_file():
        raise FileNotFoundError(f"no results store at {path}; pass the --output folder of a run (it holds {DB_NAME})")
    # a read-only folder cannot hold WAL's shared-memory file: read the file as is (store.check_readable first)
    conn = sqlite3.connect(f"file:{path}?mode=ro" + ("" if os.access(path.parent, os.W_OK) else "&immutable=1"),
                           uri=True)
    try:
        frames = {t: pd.read_sql_query(f"SELECT * FROM {t}", conn) for t in ("samples", "models", "cells", "runs")}
    finally:
        conn.close()
    return Results(folder=path.parent, **frames)


def interval95(scores: Sequence[float]) -> tuple[float, float]:
    """95% interval of the mean of per-sample percent scores: Wilson when every score is 0 or 100, else normal."""
    n = len(scores)
    if n == 0:
        return (math.nan, math.nan)
    mean = sum(scores) / n
    if all(s in (0.0, 100.0) for s in scores):
        return binomial_interval95(sum(s == 100.0 for s in scores), n)
    if n == 1:
        return (math.nan, math.nan)
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    half = Z95 * math.sqrt(var / n)
    return (max(0.0, mean - half), min(100.0, mean + half))


def binomial_interval95(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of successes / n in percent (scipy's binomtest), clipped to [0, 100] and to
    contain the observed percentage (rounding can put a bound a hair past it at 0% or 100%)."""
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    observed = 100.0 * successes / n
    return (min(max(100.0 * ci.low, 0.0), observed), max(min(100.0 * ci.high, 100.0), observed))


def standard_error(scores: Sequence[float]) -> float:
    """Standard error of the mean of per-sample scores (sample standard deviation / sqrt(n)); NaN below 2 samples."""
    n = len(scores)
    if n < 2:
        return math.nan
    mean = sum(scores) / n
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)


@dataclass
class CellStat:
    """One table cell: the value, its sample count, interval and standard error (NaN when not applicable)."""

    value: float
    n: int = 0
    failed: int = 0
    lo: float = math.nan
    hi: float = math.nan
    stderr: float = math.nan

    def text(self, digits: int = 1, few: int = FEW_SAMPLES) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "–" if not self.failed else f"failed ({self.failed})"
        out = f"{self.value:.{digits}f}"
        if 0 < self.n < few and not math.isnan(self.lo):
            out += f" [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"
        if self.failed:
            out += f" ({self.failed} failed)"
        return out


def cell_aggregates(results: Results) -> dict[tuple[str, str, int], tuple[dict, dict]]:
    """(model, task, length) -> (aggregate, meta) of cells a whole-cell engine (lm-eval) scored."""
    out = {}
    if results.cells.empty or "aggregate" not in results.cells:
        return out
    for r in results.cells.to_dict("records"):
        if isinstance(r.get("aggregate"), str) and r["aggregate"]:
            meta = r["meta"] if isinstance(r.get("meta"), str) else "{}"
            out[(r["model"], r["task"], int(r["length"]))] = (json.loads(r["aggregate"]), json.loads(meta))
    return out


def cell_stats(results: Results) -> dict[tuple[str, str, int], CellStat]:
    """(model, task, length) -> CellStat over the cell's ok rows: the mean score, except perplexity rows (metrics
    nll_sum and tokens: exp(sum nll / sum tokens)) and whole-cell engine cells (their first paper column)."""
    out: dict[tuple[str, str, int], CellStat] = {}
    df = results.samples
    if df.empty:
        return out
    aggregates = cell_aggregates(results)
    for (model, task, length), group in df.groupby(["model", "task", "length"], sort=True):
        ok_rows = group[group["status"] == "ok"]
        ok = ok_rows["score"].astype(float).tolist()
        failed = int((group["status"] != "ok").sum())
        key = (model, task, int(length))
        metrics = [json.loads(m or "{}") for m in ok_rows["metrics"]]
        if metrics and all("nll_sum" in m and m.get("tokens") for m in metrics):
            value = math.exp(sum(m["nll_sum"] for m in metrics) / sum(m["tokens"] for m in metrics))
            out[key] = CellStat(value, len(ok), failed)
            continue
        if key in aggregates:
            aggregate, meta = aggregates[key]
            columns = list((meta.get("paper_columns") or {}))
            if columns and aggregate.get(columns[0]) is not None:
                value = float(aggregate[columns[0]])
                if "ppl" in columns[0]:
                    out[key] = CellStat(value, len(ok), failed)
                else:
                    out[key] = CellStat(value, len(ok), failed, *interval95(ok), standard_error(ok))
                continue
        mean = sum(ok) / len(ok) if ok else math.nan
        out[key] = CellStat(mean, len(ok), failed, *interval95(ok), standard_error(ok))
    return out


def is_perplexity_task(task: str) -> bool:
    return task.startswith("ppl:") or task.endswith("wikitext")


def human(n: Any) -> str:
    """1536 -> '1.5K', 1_300_000_000 -> '1.3B'; '' for missing."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}"


def length_label(length: int) -> str:
    if length == NO_LENGTH:
        return ""
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def model_info(results: Results) -> dict[str, dict]:
    info = {}
    for rec in results.models.to_dict("records"):
        info[rec["model"]] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
    return info


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@=-]+", "_", str(name))
