"""Reports from a results store: tables in the paper's layout (Markdown, LaTeX, CSV) and exports.

    tables = build_tables("runs/default")            # {"all": Table, "table3": Table, ...}
    print(tables["all"].markdown())
    write_report("runs/default")                     # <output>/report/*.md|.tex|.csv, plots, exports

Every table cell is the mean per-sample score of the stored rows with status 'ok' (percent for accuracies). A cell
with fewer than FEW_SAMPLES samples also shows its 95% interval (Wilson for 0/100 scores, normal approximation for
fractional ones; harness/results.py). A model that maps to a row of the paper (models.paper_setting / paper_model,
set with --paper-row MODEL=setting:Paper Model) gets the paper's row and the difference (ours - paper) right below
it. Rows are grouped as in the paper: recurrent, hybrid, then everything else. The paper's numbers are read from
harness/paper/ (shipped with the package).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from harness.plots import make_plots
from harness.results import (
    NO_LENGTH,
    CellStat,
    Results,
    cell_aggregates,
    cell_stats,
    human,
    interval95,
    length_label,
    load_results,
    model_info,
    safe_name,
)

SETTINGS = ("recurrent", "hybrid")
PAPER_FILES = {"table2": "table2_lm_commonsense.csv", "table3": "table3_ruler_niah.csv",
               "table4": "table4_retrieval.csv", "table5": "table5_ablation.csv"}

# Table 3: our task name -> the paper's column prefix.
TABLE3_TASKS = {"niah_single_1": "s_niah_1", "niah_single_2": "s_niah_2", "niah_single_3": "s_niah_3",
                "niah_multikey_1": "mk_niah_1"}
# Table 2: paper column -> (task name patterns, metric key; "score" = the row's score). ppl columns aggregate
# exp(sum nll / sum count) from per-sample metrics when the task stores them, else the mean of 'score'.
TABLE2_COLUMNS = {
    "wiki_ppl": (("wikitext",), "word_perplexity"),
    "lambada_ppl": (("lambada_openai", "lambada"), "perplexity"),
    "lambada_acc": (("lambada_openai", "lambada"), "acc"),
    "piqa_acc": (("piqa",), "acc"),
    "hellaswag_acc_norm": (("hellaswag",), "acc_norm"),
    "winogrande_acc": (("winogrande",), "acc"),
    "arc_e_acc": (("arc_easy", "arc_e"), "acc"),
    "arc_c_acc": (("arc_challenge", "arc_c"), "acc"),
    "obqa_acc": (("openbookqa", "obqa"), "acc"),
    "siqa_acc": (("social_iqa", "siqa"), "acc"),
    "boolq_acc": (("boolq",), "acc"),
}
TABLE2_AVG = [c for c in TABLE2_COLUMNS if c.endswith(("_acc", "_acc_norm"))]
TABLE4_COLUMNS = {"swde": ("swde",), "squad": ("squad",), "fda": ("fda",), "triviaqa": ("triviaqa",),
                  "nq": ("nq",), "drop": ("drop",)}


# ------------------------------------------------------------------------------------------------ paper
def paper_table(name: str) -> Any:
    """The paper's table (table2 | table3 | table4 | table5) from harness/paper/ as a DataFrame."""
    import pandas as pd

    with resources.files("harness").joinpath("paper", PAPER_FILES[name]).open("rb") as f:
        return pd.read_csv(f)


# ------------------------------------------------------------------------------------------------ statistics
def _metric_stat(group: Any, metric: str) -> CellStat:
    """A paper metric over a cell's ok rows: perplexities from summed nll/counts when stored, accuracies from
    metrics[metric] (fractions become percent) or the score."""
    ok = group[group["status"] == "ok"]
    failed = int((group["status"] != "ok").sum())
    metrics = [json.loads(m or "{}") for m in ok["metrics"]]
    if metric.endswith("perplexity"):
        count_key = {"word_perplexity": "words", "byte_perplexity": "bytes"}.get(metric, "tokens")
        nll = [m.get("nll_sum", m.get("nll")) for m in metrics]
        counts = [m.get(count_key) for m in metrics]
        if metrics and all(v is not None for v in nll) and all(c for c in counts):
            return CellStat(math.exp(sum(nll) / sum(counts)), len(metrics), failed)
        values = [m[metric] for m in metrics if metric in m] or ok["score"].astype(float).tolist()
        return CellStat(sum(values) / len(values) if values else math.nan, len(values), failed)
    values = [m[metric] for m in metrics if metric in m and m[metric] is not None]
    if len(values) == len(metrics) and values:
        scale = 100.0 if all(0.0 <= v <= 1.0 for v in values) else 1.0
        scores = [v * scale for v in values]
    else:
        scores = ok["score"].astype(float).tolist()
    mean = sum(scores) / len(scores) if scores else math.nan
    lo, hi = interval95(scores)
    return CellStat(mean, len(scores), failed, lo, hi)


# ------------------------------------------------------------------------------------------------ tables
@dataclass
class Row:
    label: str
    setting: str
    cells: dict[str, CellStat | float | None]
    state: int | None = None
    params: int | None = None
    kind: str = "ours"          # ours | paper | delta


@dataclass
class Table:
    """A report table: columns (in the paper's order), rows grouped by setting. Renders to md / tex / csv."""

    name: str
    title: str
    columns: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    digits: int = 1

    def _value(self, row: Row, col: str) -> str:
        v = row.cells.get(col)
        if v is None:
            return "–"
        if isinstance(v, CellStat):
            return v.text(self.digits)
        if isinstance(v, float) and math.isnan(v):
            return "–"
        return f"{v:+.{self.digits}f}" if row.kind == "delta" else f"{v:.{self.digits}f}"

    def header(self) -> list[str]:
        return ["setting", "model", "state/layer", "params", "n"] + self.columns

    def grid(self) -> list[list[str]]:
        out = []
        for row in self.rows:
            ns = [c.n for c in row.cells.values() if isinstance(c, CellStat) and c.n]
            n = (str(min(ns)) if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}") if ns else ""
            out.append([row.setting, row.label, human(row.state), human(row.params), n if row.kind == "ours" else ""]
                       + [self._value(row, c) for c in self.columns])
        return out

    def markdown(self) -> str:
        head = self.header()
        lines = [f"### {self.title}", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        for cells in self.grid():
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        head = self.header()[1:]
        esc = _latex_escape
        lines = [f"% {self.title}", "\\begin{tabular}{l" + "r" * (len(head) - 1) + "}", "\\toprule",
                 " & ".join(esc(h) for h in head) + " \\\\", "\\midrule"]
        current = None
        for cells in self.grid():
            if cells[0] != current:
                if current is not None:
                    lines.append("\\midrule")
                current = cells[0]
                lines.append(f"\\multicolumn{{{len(head)}}}{{l}}{{\\textit{{{esc(current)}}}}} \\\\")
            lines.append(" & ".join(esc(c) for c in cells[1:]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"

    def csv_rows(self) -> list[dict]:
        """Long form for CSV: one line per (row, column) with value, n, failed and the interval."""
        out = []
        for row in self.rows:
            for col in self.columns:
                v = row.cells.get(col)
                stat = v if isinstance(v, CellStat) else CellStat(v if v is not None else math.nan)
                out.append({"table": self.name, "setting": row.setting, "model": row.label, "kind": row.kind,
                            "column": col, "value": _round(stat.value), "n": stat.n, "failed": stat.failed,
                            "ci95_low": _round(stat.lo), "ci95_high": _round(stat.hi),
                            "state_floats_per_layer": row.state, "num_params_non_embedding": row.params})
        return out

    def csv(self) -> str:
        import io

        import pandas as pd

        buf = io.StringIO()
        frame = pd.DataFrame(self.csv_rows())
        if not frame.empty:
            frame = frame.astype({"state_floats_per_layer": "Int64", "num_params_non_embedding": "Int64"})
        frame.to_csv(buf, index=False, lineterminator="\n")
        return buf.getvalue()


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) and not math.isnan(v) else (None if isinstance(v, float) else v)


def _latex_escape(text: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"),
                 ("–", "--"), ("−", "$-$"), ("Δ", "$\\Delta$"), ("↳", "")):
        text = text.replace(a, b)
    return text


def _setting_of(info: dict) -> str:
    setting = info.get("paper_setting")
    if setting in SETTINGS:
        return setting
    try:
        describe = json.loads(info.get("describe") or "{}")
    except (TypeError, json.JSONDecodeError):
        describe = {}
    setting = describe.get("setting")
    return setting if setting in SETTINGS else "other"


def _ordered_models(results: Results, models: list[str]) -> list[str]:
    info = model_info(results)
    order = {s: i for i, s in enumerate(SETTINGS + ("other",))}
    return sorted(models, key=lambda m: (order[_setting_of(info.get(m, {}))], m))


def _as_int(v: Any) -> int | None:
    try:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
    except (TypeError, ValueError):
        return None


def _paper_rows_for(results: Results, table: Table, paper: Any, model: str, ours: Row,
                    paper_columns: dict[str, str]) -> list[Row]:
    """The paper row and the delta row for a model that maps to one (else [])."""
    info = model_info(results).get(model, {})
    setting, paper_model = info.get("paper_setting"), info.get("paper_model")
    if not setting or not paper_model:
        return []
    match = paper[(paper["setting"] == setting) & (paper["model"] == paper_model)]
    if match.empty:
        table.notes.append(f"{model} maps to paper row ({setting}, {paper_model}), which the paper does not have")
        return []
    prow = match.iloc[0]
    paper_cells, delta_cells = {}, {}
    for col in table.columns:
        pcol = paper_columns.get(col)
        if pcol is None or pcol not in prow or _isnan(prow[pcol]):
            continue
        paper_cells[col] = float(prow[pcol])
        ours_v = ours.cells.get(col)
        if isinstance(ours_v, CellStat) and not _isnan(ours_v.value):
            delta_cells[col] = ours_v.value - float(prow[pcol])
    return [Row(f"↳ paper: {paper_model}", ours.setting, paper_cells, kind="paper"),
            Row("↳ Δ (ours − paper)", ours.setting, delta_cells, kind="delta")]


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _base_row(results: Results, model: str) -> Row:
    info = model_info(results).get(model, {})
    return Row(model, _setting_of(info), {}, _as_int(info.get("state_floats_per_layer")),
               _as_int(info.get("num_params_non_embedding")))


def table_all(results: Results) -> Table:
    """Every stored cell: one column per (task, length), one row per model."""
    stats = cell_stats(results)
    cols: dict[str, tuple[str, int]] = {}
    for (_, task, length) in sorted(stats, key=lambda k: (k[1], k[2])):
        cols[f"{task}@{length_label(length)}" if length != NO_LENGTH else task] = (task, length)
    table = Table("all", "All cells (accuracy: mean per-sample score in percent, 95% interval where samples are few; "
                         "ppl: corpus perplexity)", list(cols))
    models = sorted({m for (m, _, _) in stats} | set(results.cells["model"]) if not results.cells.empty
                    else {m for (m, _, _) in stats})
    failed_cells = _failed_cells(results)
    for model in _ordered_models(results, list(models)):
        row = _base_row(results, model)
        for col, (task, length) in cols.items():
            if (model, task, length) in stats:
                row.cells[col] = stats[(model, task, length)]
        table.rows.append(row)
    for (model, task, length), error in failed_cells.items():
        where = f"{task}@{length_label(length)}" if length != NO_LENGTH else task
        table.notes.append(f"cell failed: {model} {where}: {error.splitlines()[0][:200]}")
    return table


def _failed_cells(results: Results) -> dict[tuple[str, str, int], str]:
    if results.cells.empty:
        return {}
    bad = results.cells[results.cells["status"] == "failed"]
    return {(r["model"], r["task"], int(r["length"])): r["error"] or "" for r in bad.to_dict("records")}


def table3(results: Results) -> Table:
    """RULER needle tasks in Table 3's layout: s_niah_1@1k ... mk_niah_1@4k (columns we have data for)."""
    paper = paper_table("table3")
    stats = cell_stats(results)
    columns = []
    for col in paper.columns[2:]:
        prefix, _, k = col.partition("@")
        if any(TABLE3_TASKS.get(t) == prefix and length_label(length) == k for (_, t, length) in stats):
            columns.append(col)
    table = Table("table3", "Table 3 (RULER needle-in-a-haystack, accuracy %)", columns)
    if not columns:
        return table
    models = sorted({m for (m, t, _) in stats if t in TABLE3_TASKS})
    for model in _ordered_models(results, models):
        row = _base_row(results, model)
        for col in columns:
            prefix, _, k = col.partition("@")
            for (m, t, length), stat in stats.items():
                if m == model and TABLE3_TASKS.get(t) == prefix and length_label(length) == k:
                    row.cells[col] = stat
        table.rows.append(row)
        table.rows.extend(_paper_rows_for(results, table, paper, model, row, {c: c for c in columns}))
    substitutes = _substituted_essays(results)
    if substitutes:
        table.notes.append(f"essay haystack {', '.join(substitutes)} is not Paul Graham's essays (RULER's text): "
                           "S-NIAH-2/3 and MK-NIAH-1 are not directly comparable to the paper's numbers")
    return table


def _substituted_essays(results: Results) -> list[str]:
    """Names of the essay haystacks of Table 3 cells that are not RULER's PaulGrahamEssays text (the noise and
    needle haystacks are RULER's own)."""
    if results.cells.empty or "haystack" not in results.cells:
        return []
    names = set()
    for task, haystack in zip(results.cells["task"], results.cells["haystack"], strict=True):
        if task not in TABLE3_TASKS or not isinstance(haystack, str) or not haystack:
            continue
        for name, _sha in json.loads(haystack):
            if name not in ("noise", "needle") and "paulgraham" not in re.sub(r"[^a-z]", "", name.lower()):
                names.add(name)
    return sorted(names)


def _task_matches(task: str, patterns: Sequence[str]) -> bool:
    base = re.sub(r"^(lm_eval|ppl):", "", task.lower())
    return any(base == p or base.startswith(p + "_") or base.endswith("_" + p) or base == f"{p}_ppl" for p in patterns)


def _metric_table(results: Results, name: str, title: str, spec: dict[str, tuple], avg_columns: list[str],
                  digits: int = 2) -> Table:
    paper = paper_table(name)
    df = results.samples
    columns, values = [], {}
    for (model, task, _), (aggregate, meta) in cell_aggregates(results).items():   # lm-eval: its own aggregate
        group = df[(df["model"] == model) & (df["task"] == task)] if not df.empty else df
        n_ok = int((group["status"] == "ok").sum()) if not group.empty else 0
        n_failed = len(group) - n_ok
        for col in (meta.get("paper_columns") or {}):
            if col in spec and aggregate.get(col) is not None:
                primary = col == next(iter(meta.get("paper_columns") or {}))
                lo, hi = (math.nan, math.nan)
                if primary and "ppl" not in col:   # the rows' score is the primary column's per-sample value
                    lo, hi = interval95(group[group["status"] == "ok"]["score"].astype(float).tolist())
                values[(model, col)] = CellStat(float(aggregate[col]), n_ok, n_failed, lo, hi)
                if col not in columns:
                    columns.append(col)
    for col, (patterns, metric) in spec.items():
        for (model, task), group in (df.groupby(["model", "task"]) if not df.empty else []):
            if _task_matches(task, patterns) and (model, col) not in values:
                values[(model, col)] = _metric_stat(group, metric)
                if col not in columns:
                    columns.append(col)
    columns = [c for c in spec if c in columns]
    if columns and avg_columns and all(c in columns for c in avg_columns):
        columns.append("avg")
    table = Table(name, title, columns, digits=digits)
    models = sorted({m for (m, _) in values})
    for model in _ordered_models(results, models):
        row = _base_row(results, model)
        for col in columns:
            if (model, col) in values:
                row.cells[col] = values[(model, col)]
        if "avg" in columns:
            parts = [row.cells.get(c) for c in avg_columns]
            if all(isinstance(p, CellStat) and not _isnan(p.value) for p in parts):
                row.cells["avg"] = CellStat(sum(p.value for p in parts) / len(parts))
        table.rows.append(row)
        table.rows.extend(_paper_rows_for(results, table, paper, model, row, {c: c for c in columns}))
    return table


def table2(results: Results) -> Table:
    return _metric_table(results, "table2", "Table 2 (zero-shot LM and commonsense; ppl lower is better)",
                         TABLE2_COLUMNS, TABLE2_AVG)


def table4(results: Results) -> Table:
    spec = {c: (p, "score") for c, p in TABLE4_COLUMNS.items()}
    return _metric_table(results, "table4", "Table 4 (real-world recall, inputs truncated to 2K)", spec,
                         list(TABLE4_COLUMNS))


def build_tables(folder_or_results: str | Path | Results) -> dict[str, Table]:
    """All tables with data: "all" always; table2/3/4 when the store has cells for them."""
    results = folder_or_results if isinstance(folder_or_results, Results) else load_results(folder_or_results)
    tables = {"all": table_all(results)}
    for name, fn in (("table2", table2), ("table3", table3), ("table4", table4)):
        t = fn(results)
        if t.columns:
            tables[name] = t
    random_models = [r["model"] for r in results.models.to_dict("records") if r.get("random_init")]
    if random_models:
        tables["all"].notes.insert(0, f"{', '.join(random_models)}: random-init weights (plumbing check); "
                                      "scores are chance-level by construction")
    return tables


# ------------------------------------------------------------------------------------------------ exports
def export_cells(results: Results, out: Path, parquet: bool = True) -> list[Path]:
    """One CSV (and Parquet) per cell: <out>/<model>/<task>[@<length>].csv with every sample row."""
    written = []
    df = results.samples
    if df.empty:
        return written
    for (model, task, length), group in df.groupby(["model", "task", "length"]):
        folder = out / safe_name(model)
        folder.mkdir(parents=True, exist_ok=True)
        stem = safe_name(task) + (f"@{int(length)}" if int(length) != NO_LENGTH else "")
        group = group.sort_values("sample_index").drop(columns=["id"], errors="ignore")
        group.to_csv(folder / f"{stem}.csv", index=False)
        written.append(folder / f"{stem}.csv")
        if parquet:
            try:
                group.to_parquet(folder / f"{stem}.parquet", index=False)
                written.append(folder / f"{stem}.parquet")
            except ImportError:   # pyarrow is in the eval extra; CSV is always written
                parquet = False
    return written


def lm_eval_json(results: Results) -> dict:
    """lm-eval-style results: {"results": {task[@length]: {metric,none: v, metric_stderr,none: se}}, "configs", ...}
    per model (lm-eval files are per model)."""
    stats = cell_stats(results)
    runs = results.runs.to_dict("records")
    last = runs[-1] if runs else {}
    out = {}
    for model in sorted({m for (m, _, _) in stats}):
        res, n_samples = {}, {}
        for (m, task, length), stat in stats.items():
            if m != model:
                continue
            key = task if length == NO_LENGTH else f"{task}@{length}"
            res[key] = {"alias": key, "score,none": _round(stat.value),
                        "score_stderr,none": "N/A" if _isnan(stat.stderr) else _round(stat.stderr),
                        "n,none": stat.n, "failed,none": stat.failed}
            n_samples[key] = {"original": stat.n + stat.failed, "effective": stat.n}
        info = model_info(results).get(model, {})
        out[model] = {
            "results": res, "n-samples": n_samples,
            "config": {"model": model, "model_args": info.get("spec"), "family": info.get("family"),
                       "dtype": info.get("dtype"), "device": info.get("device"),
                       "state_floats_per_layer": _as_int(info.get("state_floats_per_layer")),
                       "num_params_non_embedding": _as_int(info.get("num_params_non_embedding"))},
            "git_hash": last.get("git_hash"), "packages": json.loads(last.get("packages") or "{}"),
            "date": last.get("finished_at") or last.get("started_at"),
        }
    return out


def write_report(folder: str | Path, out: str | Path | None = None, plots: bool = True,
                 exports: bool = True) -> dict[str, Any]:
    """Write tables (md, tex, csv), plots and exports for a store; returns {"tables": ..., "files": [...]}."""
    results = load_results(folder)
    out = Path(out) if out else results.folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(results)
    files: list[Path] = []
    md = []
    for name, table in tables.items():
        for ext, text in (("md", table.markdown()), ("tex", table.latex()), ("csv", table.csv())):
            path = out / f"{name}.{ext}"
            path.write_text(text)
            files.append(path)
        md.append(table.markdown())
    (out / "report.md").write_text("\n".join(md))
    files.append(out / "report.md")
    if exports:
        files += export_cells(results, results.folder / "exports")
        for model, data in lm_eval_json(results).items():
            path = results.folder / "exports" / safe_name(model) / "results.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2, default=str))
            files.append(path)
    if plots:
        files += make_plots(results, out / "plots")
    return {"tables": tables, "files": files, "out": out}
