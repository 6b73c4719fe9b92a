"""The sweep runner: a plan of cells (model x task x context length) -> one committed row per scored sample.

    plan = Plan(models=["gdn2-tiny-random"], cells=[CellPlan("niah_single_1", [1024, 2048])], samples=4)
    summary = run_plan(plan, ResultsStore("runs/x"))

Per model: load it once (skipped when every cell is already complete), then per cell: the task generates the
cell's samples with the model's tokenizer (seeded), the cell's identity (seed, tokenizer hash, haystack, task
config, model source, dtype) is checked against the store, stored samples are skipped, and each remaining sample is
evaluated and committed in its own transaction. Under torchrun each rank evaluates the samples it owns
(index % world_size == rank).

Failures never stop the sweep: a sample that runs out of memory is retried with the segment halved (down to
MIN_SEGMENT) and then stored as a failure row (error_kind "oom"); NaN/Inf logits or a non-finite score give a
"nonfinite" row; any other exception an "exception" row. After MAX_CONSECUTIVE_FAILURES failures in a row the rest of
the cell is abandoned (the cell is marked failed; its unattempted samples are retried by the next run). A cell that
cannot even produce its samples, or a model that cannot load, marks its cells failed and the sweep moves on.
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from harness.distributed import DistContext
from harness.eval_task import Sample, SampleResult
from harness.store import NO_LENGTH, CellIdentityError, FolderBusyError, ResultsStore, RunLock, SampleRow, dumps
from tasks.cli import parse_length

SUITES_DIR = Path(__file__).resolve().parent / "suites"
REPO_ROOT = Path(__file__).resolve().parent.parent
MIN_SEGMENT = 64
MAX_CONSECUTIVE_FAILURES = 3
DEFAULT_SAMPLES = 100        # per-sample tasks when neither the suite nor --samples says (lm-eval: the full set)
PACKAGES = ("torch", "triton", "transformers", "tokenizers", "lm_eval", "flash-linear-attention", "mamba-ssm",
            "wonderwords", "numpy", "pandas", "gdn2-harness")


# ------------------------------------------------------------------------------------------------ plans
@dataclass
class CellPlan:
    """One task of a plan and its lengths (None: the task has no length axis)."""

    task: str
    lengths: list[int | None] = field(default_factory=lambda: [None])
    samples: int | None = None          # None: the plan's default
    options: dict = field(default_factory=dict)


@dataclass
class Plan:
    models: list[str]
    cells: list[CellPlan]
    samples: int | None = None          # default samples per cell (None: DEFAULT_SAMPLES; lm-eval: the full set)
    seed: int = 0
    limit: int | None = None            # cap on samples per cell (lm-eval --limit semantics)
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1
    name: str = "custom"
    paper_rows: dict[str, str] = field(default_factory=dict)   # model name -> "setting:Paper Model"
    retry_failed: bool = False
    allow_longer_context: bool = False
    offline: bool = True                # lm-eval tasks: the offline data copies (tasks/lm_eval_yaml)
    tokenizer: str | None = None        # tokenizer for models whose spec names none (--tokenizer)

    def expand(self) -> list[tuple[str, int | None, int | None, dict]]:
        """(task, length, num_samples, options) for every cell, in plan order."""
        out = []
        for cell in self.cells:
            n = cell.samples if cell.samples is not None else self.samples
            if self.limit is not None:
                n = self.limit if n is None else min(n, self.limit)
            for length in cell.lengths or [None]:
                out.append((cell.task, length, n, cell.options))
        return out

    def to_dict(self) -> dict:
        return asdict(self)


SUITE_KEYS = {"description", "models", "samples", "seed", "report", "cells", "allow_longer_context"}
CELL_KEYS = {"task", "lengths", "samples", "options"}


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str) -> dict:
    """A suite file (harness/suites/<name>.yaml, or a path) as a dict, validated as a whole (see
    harness/suites/README.md): ValueError naming the file and every problem found."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        from harness.registry import unknown_name

        raise unknown_name("suite", name_or_path, suite_names())
    try:
        suite = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"suite {path} is not valid YAML: {err}") from None
    problems = suite_problems(suite)
    if problems:
        raise ValueError(f"suite {path}: " + ("; ".join(problems) if len(problems) == 1 else
                                              "\n  - " + "\n  - ".join(problems)))
    suite["name"] = path.stem
    suite["path"] = str(path)
    return suite


def suite_problems(suite: Any) -> list[str]:
    """Everything wrong with a parsed suite file (empty: fine). Task names are checked later, with the plan."""
    if not isinstance(suite, dict):
        return [f"the top level must be a mapping of {sorted(SUITE_KEYS)}, got {type(suite).__name__}"]
    problems = []
    bad = set(suite) - SUITE_KEYS
    if bad:
        problems.append(f"unknown key(s) {sorted(bad)}; a suite has {sorted(SUITE_KEYS)}")
    models = suite.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        problems.append(f"'models' must be a list of model specs, got {models!r}")
    if _bad_count(suite.get("samples")):
        problems.append(f"'samples' must be a whole number >= 1, got {suite.get('samples')!r}")
    seed = suite.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"'seed' must be a whole number >= 0, got {seed!r}")
    cells = suite.get("cells")
    if not isinstance(cells, list) or not cells:
        problems.append(f"'cells' must be a non-empty list of {{task: ..., lengths: [...]}}, got {cells!r}")
        return problems
    for i, cell in enumerate(cells):
        where = f"cells[{i}]"
        if not isinstance(cell, dict) or not isinstance(cell.get("task"), str):
            problems.append(f"{where} must be a mapping with a 'task' name, got {cell!r}")
            continue
        where += f" ({cell['task']})"
        bad = set(cell) - CELL_KEYS
        if bad:
            problems.append(f"{where} has unknown key(s) {sorted(bad)}; a cell has {sorted(CELL_KEYS)}")
        if _bad_count(cell.get("samples")):
            problems.append(f"{where}: 'samples' must be a whole number >= 1, got {cell.get('samples')!r}")
        lengths = cell.get("lengths")
        if lengths is not None:
            if not isinstance(lengths, list):
                problems.append(f"{where}: 'lengths' must be a list (e.g. [1024, 4k]), got {lengths!r}")
            else:
                for x in lengths:
                    try:
                        parse_length(x)
                    except ValueError as err:
                        problems.append(f"{where}: {err}")
        if not isinstance(cell.get("options") or {}, dict):
            problems.append(f"{where}: 'options' must be a mapping, got {cell.get('options')!r}")
    if not isinstance(suite.get("allow_longer_context", False), bool):
        problems.append(f"'allow_longer_context' must be true or false, got {suite['allow_longer_context']!r}")
    return problems


def plan_from_suite(suite: dict, **overrides: Any) -> Plan:
    """A Plan from a suite dict; overrides (models, samples, seed, lengths, ...) win when not None."""
    cells = []
    for cell in suite.get("cells") or []:
        lengths = [parse_length(x) for x in (cell.get("lengths") or [None])]
        cells.append(CellPlan(task=cell["task"], lengths=lengths, samples=cell.get("samples"),
                              options=dict(cell.get("options") or {})))
    plan = Plan(models=list(suite.get("models") or []), cells=cells, samples=suite.get("samples"),
                seed=int(suite.get("seed", 0)), name=suite.get("name", "custom"),
                allow_longer_context=bool(suite.get("allow_longer_context", False)))
    lengths = overrides.pop("lengths", None)
    if lengths:
        for cell in plan.cells:
            if cell.lengths != [None]:
                cell.lengths = [parse_length(x) for x in lengths]
    if overrides.get("samples") is not None:   # the command line wins over per-cell suite values too
        for cell in plan.cells:
            cell.samples = None
    for key, value in overrides.items():
        if value is not None:
            setattr(plan, key, value)
    return plan


class PlanError(ValueError):
    """Bad input in a plan (counts, lengths, models, device); the message lists every problem found."""


def _bad_count(value: Any) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1)


def validate_plan(plan: Plan, check_models: bool = True) -> None:
    """Refuse a plan that cannot run as asked, before any model loads or anything is stored: counts and lengths
    must be whole numbers >= 1, the seed a whole number >= 0, model specs and the tokenizer must name things that
    exist (unless check_models is False: a caller's own loader resolves them), the device and dtype must be
    available here."""
    from harness.registry import UnknownNameError, check_spec, resolve_device, resolve_dtype

    problems = []
    for what, value in (("--samples", plan.samples), ("--limit", plan.limit)):
        if _bad_count(value):
            problems.append(f"{what} must be a whole number >= 1, got {value!r}")
    if isinstance(plan.seed, bool) or not isinstance(plan.seed, int) or plan.seed < 0:
        problems.append(f"--seed must be a whole number >= 0 (numpy's seed sequences take no negatives), "
                        f"got {plan.seed!r}")
    if not plan.models:
        problems.append("no models: pass --models SPEC ... (see `run_eval.py list models`)")
    if not plan.cells:
        problems.append("no cells: pass --tasks T ... or a suite with cells (see harness/suites/README.md)")
    for cell in plan.cells:
        lm_eval_fraction = (cell.task.startswith("lm_eval:") and isinstance(cell.samples, float)
                            and 0 < cell.samples < 1)     # --limit 0 < f < 1 passed on to lm-eval (cli)
        if _bad_count(cell.samples) and not lm_eval_fraction:
            problems.append(f"task {cell.task}: samples must be a whole number >= 1, got {cell.samples!r}")
        bad = [x for x in cell.lengths or [None] if x is not None and _bad_count(x)]
        if bad:
            problems.append(f"task {cell.task}: lengths must be whole numbers >= 1, got {bad}")
    for spec in plan.models if check_models else ():
        try:
            check_spec(spec, plan.tokenizer)
        except (UnknownNameError, ValueError, FileNotFoundError) as err:
            problems.append(str(err))
    try:
        resolve_dtype(plan.dtype, resolve_device(plan.device))
    except (ValueError, RuntimeError) as err:
        problems.append(f"--device {plan.device} --dtype {plan.dtype}: {err}")
    if problems:
        raise PlanError("; ".join(problems) if len(problems) == 1 else
                        "the plan cannot run:\n  - " + "\n  - ".join(problems))


def resolve_tasks(plan: Plan) -> dict[tuple[str, str], Any]:
    """(task name, options JSON) -> EvalTask for every cell. Unknown names raise UnknownNameError (lm-eval names
    are checked against lm-eval's registry); a known task that cannot run here (an lm-eval task without offline
    data) becomes an UnavailableTask whose cells are recorded as failed."""
    from harness.task_adapters import resolve_task

    tasks: dict[tuple[str, str], Any] = {}
    for task_name, _, _, options in plan.expand():
        key = (task_name, json.dumps(options, sort_keys=True))
        if key in tasks:
            continue
        if task_name.startswith("lm_eval:"):
            check_lm_eval_name(task_name[len("lm_eval:"):], plan.offline)
        try:
            tasks[key] = resolve_task(task_name, options, offline=plan.offline)
        except KeyError:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. an lm-eval task without offline data: its cells fail
            if not task_name.startswith(("lm_eval:", "ppl:")):     # bad options of our own tasks: bad input
                raise PlanError(f"task {task_name}" + (f" with options {options}" if options else "")
                                + f": {err}") from None
            tasks[key] = UnavailableTask(task_name, f"{type(err).__name__}: {err}",
                                         uses_length=not task_name.startswith("lm_eval:"))
    return tasks


def check_lm_eval_name(name: str, offline: bool) -> None:
    try:
        from harness.lm_eval_names import check_lm_eval_task
        from harness.lm_eval_tasks import CATALOG
    except ImportError:       # without lm-eval, resolve_task says what to install
        return
    check_lm_eval_task(name, offline=offline, catalog=tuple(CATALOG))


# ------------------------------------------------------------------------------------------------ identity
def tokenizer_sha(tokenizer: Any) -> str:
    """Hash of what the tokenizer does: its serialized rules and vocabulary (not its file path)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    elif hasattr(tokenizer, "to_str"):
        text = tokenizer.to_str()
    elif hasattr(tokenizer, "serialized_model_proto"):
        return hashlib.sha256(tokenizer.serialized_model_proto()).hexdigest()[:16]
    elif hasattr(tokenizer, "get_vocab"):
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        text = repr(tokenizer)
    extra = json.dumps([getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")])
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def haystack_identity(samples: list[Sample]) -> list[list[str]]:
    """The distinct (haystack name, sha256) of a cell's sample records (empty when the task has no haystack)."""
    seen = set()
    for s in samples:
        p = s.payload if isinstance(s.payload, dict) else {}
        if "haystack" in p or "haystack_sha256" in p:
            seen.add((str(p.get("haystack")), str(p.get("haystack_sha256", ""))))
    return [list(x) for x in sorted(seen)]


def sample_sha(sample: Sample) -> str:
    return hashlib.sha256(dumps(sample.payload).encode()).hexdigest()[:16]


def model_identity(model: Any) -> dict:
    """The model's part of a cell's identity: source, dtype, and a BOS rule set by the spec (bos=...; the default,
    the tokenizer's own rule, adds no key, so cells stored before the option existed keep their identity)."""
    out = {"model_source": model.source, "dtype": str(model.dtype).replace("torch.", "")}
    if getattr(model, "add_bos", None) is not None:
        out["bos"] = bool(model.add_bos)
    return out


def task_config(task: Any) -> Any:
    cfg = getattr(task, "config", None)
    if callable(cfg):
        cfg = cfg()
    return cfg if cfg is not None else {"name": getattr(task, "name", type(task).__name__)}


# ------------------------------------------------------------------------------------------------ run metadata
def git_state() -> tuple[str | None, int | None]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head, int(bool(dirty)) if head else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_metadata(plan: Plan, argv: list[str] | None) -> dict:
    head, dirty = git_state()
    return {"argv": argv if argv is not None else sys.argv, "plan": plan.to_dict(), "git_hash": head,
            "git_dirty": dirty, "packages": package_versions(), "host": platform.node(), "device": plan.device,
            "dtype": plan.dtype, "seed": plan.seed}


# ------------------------------------------------------------------------------------------------ evaluation
def is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or isinstance(err, MemoryError))


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _nonfinite(result: SampleResult) -> str | None:
    values = {"score": result.score, **{k: v for k, v in (result.metrics or {}).items() if isinstance(v, float)}}
    bad = [k for k, v in values.items() if v is None and k == "score" or isinstance(v, float) and not math.isfinite(v)]
    return f"non-finite value(s) in the result: {', '.join(bad)}" if bad else None


def evaluate_with_retries(fn: Callable[[], Any], model: Any) -> tuple[Any, str | None, str | None]:
    """Run fn() (one sample or one batch); returns (result, error_kind, error). Out of memory: halve the model's
    segment and retry, down to MIN_SEGMENT; NaN/Inf logits: 'nonfinite'; anything else: 'exception'."""
    from harness.model import NonFiniteLogitsError

    original = getattr(model, "segment", None)
    try:
        while True:
            try:
                return fn(), None, None
            except (KeyboardInterrupt, SystemExit):
                raise
            except NonFiniteLogitsError as err:
                return None, "nonfinite", str(err)
            except BaseException as err:  # noqa: BLE001 - every failure becomes a row
                if is_oom(err):
                    free_memory()
                    segment = getattr(model, "segment", None)
                    if segment is not None and segment // 2 >= MIN_SEGMENT:
                        model.segment = segment // 2
                        continue
                    return None, "oom", f"out of memory at segment {segment} (retried down from {original}): {err}"
                if isinstance(err, FloatingPointError):
                    return None, "nonfinite", str(err)
                tb = traceback.format_exception(type(err), err, err.__traceback__)
                return None, "exception", f"{type(err).__name__}: {err}\n{''.join(tb[-6:])}"
    finally:
        if original is not None:
            model.segment = original


@dataclass
class CellSummary:
    model: str
    task: str
    length: int | None
    planned: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    failed_before: int = 0              # failure rows stored by earlier runs and kept (--retry-failed retries them)
    status: str = "done"
    error: str | None = None
    seconds: float = 0.0


@dataclass
class RunSummary:
    run_id: str
    output: str
    cells: list[CellSummary] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed_cells(self) -> list[CellSummary]:
        return [c for c in self.cells if c.status == "failed" or c.failed]


def merge_rank_cells(per_rank: list[list[CellSummary]]) -> list[CellSummary]:
    """One CellSummary per cell from every rank's (ranks run the same plan in the same order): counts summed,
    failed if any rank's share failed. What rank 0 prints under torchrun, so the totals cover every rank."""
    merged = []
    for shares in zip(*per_rank, strict=False):
        first = shares[0]
        cell = CellSummary(first.model, first.task, first.length, status=first.status, error=first.error,
                           seconds=max(c.seconds for c in shares))
        for c in shares:
            cell.planned += c.planned
            cell.skipped += c.skipped
            cell.ok += c.ok
            cell.failed += c.failed
            cell.failed_before += c.failed_before
            if c.status == "failed" and cell.status != "failed":
                cell.status, cell.error = "failed", c.error
        merged.append(cell)
    return merged


class Progress:
    """A tqdm bar per cell: samples done / planned, samples/s, tokens/s and ETA; silent when disabled."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        self.tokens = 0
        self.start = time.time()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="sample", dynamic_ncols=True,
                            leave=True, file=sys.stderr, mininterval=0.5)

    def update(self, tokens: int, failed: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.time() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s" + (f", {failed} failed" if failed else ""), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tokens_of(result: SampleResult | None, sample: Sample) -> int:
    p = sample.payload if isinstance(sample.payload, dict) else {}
    if result is not None and result.metrics:
        t = result.metrics.get("prompt_tokens", 0) + result.metrics.get("generated_tokens", 0)
        if t:
            return int(t)
        if "tokens" in result.metrics:
            return int(result.metrics["tokens"])
    return int(p.get("length") or 0)


def model_row(model: Any, spec: str, paper_row: str | None, tokenizer_hash: str) -> dict:
    describe = model.describe()
    config = getattr(model.lm, "config", None)
    setting, paper_model = None, None
    paper_row = paper_row or describe.get("paper_row")
    if paper_row:
        setting, _, paper_model = paper_row.partition(":")
    return {
        "model": model.name, "spec": spec, "family": model.family, "source": model.source, "backend": model.backend,
        "device": str(model.device), "dtype": describe.get("dtype"),
        "state_floats_per_layer": model.state_floats_per_layer(),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_params_non_embedding": model.num_params(True), "num_params": model.num_params(False),
        "tokenizer_sha": tokenizer_hash,
        "tokenizer_name": str(getattr(model.tokenizer, "name_or_path", "") or ""),
        "paper_setting": setting or None, "paper_model": paper_model or None,
        "random_init": int("bundled" in describe and "random" in str(describe.get("bundled", "")).lower()),
        "describe": describe,
    }


class SweepRunner:
    """Runs a Plan into a ResultsStore (see the module docstring)."""

    def __init__(self, plan: Plan, store: ResultsStore, dist: DistContext | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, loader: Callable[..., Any] | None = None,
                 argv: list[str] | None = None):
        self.plan = plan
        self.store = store
        self.dist = dist or DistContext()
        self.progress = progress and self.dist.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.loader = loader
        self.argv = argv
        self.run_id = ""
        self.tokenizer_hash = ""
        self.cell_identity: str | None = None     # identity_sha of the cell being evaluated (checked per row)

    def _say(self, msg: str) -> None:
        if self.dist.is_main:
            self.log(msg)

    # -------------------------------------------------------------------------------------------- top level
    def run(self) -> RunSummary:
        start = time.time()
        # bad input is refused before anything is loaded or stored; a caller's loader resolves its own model names
        validate_plan(self.plan, check_models=self.loader is None)
        cells = self.plan.expand()
        tasks = resolve_tasks(self.plan)
        lock = self._lock()
        status = "failed"
        try:
            self.run_id = self.dist.broadcast(time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
            summary = RunSummary(run_id=self.run_id, output=str(self.store.folder))
            self.store.start_run(self.run_id, self.dist.rank, self.dist.world_size,
                                 run_metadata(self.plan, self.argv))
            try:
                for spec in self.plan.models:
                    summary.cells.extend(self._run_model(spec, cells, tasks))
                status = "done"
            finally:
                summary.seconds = time.time() - start
                self.store.finish_run(self.run_id, self.dist.rank, status if status == "done" else "interrupted",
                                      {"cells": [asdict(c) for c in summary.cells], "seconds": summary.seconds})
            self.dist.barrier()                   # the lock covers every rank's writes
        finally:
            if lock is not None:
                lock.release()
        return summary

    def _lock(self) -> RunLock | None:
        """Rank 0 takes the output folder's lock (FolderBusyError on every rank when another run holds it) and marks
        runs left 'running' by killed processes as 'killed'."""
        lock, error = None, None
        if self.dist.is_main:
            lock = RunLock(self.store.folder)
            try:
                lock.acquire(sys.argv)             # the command line of the process that holds it
                stale = self.store.mark_stale_runs()
                if stale:
                    self._say(f"{stale} run row(s) of {self.store.path} were left 'running' by a killed process; "
                              "marked 'killed' (their stored samples are kept)")
            except FolderBusyError as err:
                lock, error = None, str(err)
        error = self.dist.broadcast(error)
        if error:
            raise FolderBusyError(error)
        return lock

    def _load(self, spec: str):
        if self.loader is not None:
            return self.loader(spec)
        from harness.registry import load_model

        return load_model(spec, device=self.dist.device(self.plan.device), dtype=self.plan.dtype,
                          tokenizer=self.plan.tokenizer, allow_longer_context=self.plan.allow_longer_context)

    def _cell_key(self, task: Any, length: int | None) -> int:
        return length if (getattr(task, "uses_length", True) and length is not None) else NO_LENGTH

    def _complete_without_loading(self, name: str, cells, tasks) -> bool:
        """Whether every cell of this model already has all its (owned) samples stored, so loading can be skipped."""
        for task_name, length, n, options in cells:
            task = tasks[(task_name, json.dumps(options, sort_keys=True))]
            if isinstance(task, UnavailableTask):
                return False
            if is_whole_cell(task):
                if not self.dist.is_main:
                    continue
                if not _whole_cell_covered(self.store.cell(name, task.name, NO_LENGTH), n):
                    return False
                continue
            n = DEFAULT_SAMPLES if n is None else n
            row = self.store.cell(name, task.name, self._cell_key(task, length))
            if row is None or row["seed"] != self.plan.seed:    # a different seed must reach the identity check
                return False
            stored = self.store.stored_samples(name, task.name, self._cell_key(task, length))
            owned = [i for i in range(n) if self.dist.owns(i)]
            if any(i not in stored or (self.plan.retry_failed and stored[i][0] == "error") for i in owned):
                return False
        return True

    def _run_model(self, spec: str, cells, tasks) -> list[CellSummary]:
        known_name = self.store.model_name_for_spec(spec)
        if known_name and self._complete_without_loading(known_name, cells, tasks):
            self._say(f"[{known_name}] every cell is already stored in {self.store.path}; nothing to run")
            out = []
            for task_name, length, n, options in cells:
                task = tasks[(task_name, json.dumps(options, sort_keys=True))]
                key = self._cell_key(task, length)
                stored = self.store.stored_samples(known_name, task.name, key)
                if is_whole_cell(task):
                    owned = list(stored) if self.dist.is_main else []
                    planned = list(stored)
                else:
                    planned = list(range(DEFAULT_SAMPLES if n is None else n))
                    owned = [i for i in planned if self.dist.owns(i)]
                cell = CellSummary(known_name, task.name, length, planned=len(owned), skipped=len(owned),
                                   failed_before=sum(stored[i][0] == "error" for i in owned))
                self._settle_complete_cell(cell, key, stored, planned)
                out.append(cell)
            return out
        self._say(f"[{spec}] loading (device {self.dist.device(self.plan.device)}, dtype {self.plan.dtype})")
        try:
            model = self._load(spec)
        except Exception as err:  # noqa: BLE001 - a model that cannot load fails its cells, not the sweep
            # Nothing is stored: its cells keep what they hold (a complete cell stays complete) and a spec that
            # never loaded leaves no row in the reports; the run's summary and exit status say it failed.
            message = f"model {spec!r} failed to load: {type(err).__name__}: {err}"
            self._say(f"FAILED {message}")
            return [CellSummary(known_name or spec, tasks[(t, json.dumps(o, sort_keys=True))].name, length,
                                planned=n or 0, status="failed", error=message) for t, length, n, o in cells]
        model.check_finite = True
        model.batch_size = self.plan.batch_size
        _threads_for(model)
        self._say(f"[{spec}] {model.name}: {model.family}, {model.backend} on {model.device}, "
                  f"{str(model.dtype).replace('torch.', '')}")
        self.tokenizer_hash = tokenizer_sha(model.tokenizer)      # once per model: serialising a vocab is not free
        self.store.put_model(model_row(model, spec, self.plan.paper_rows.get(model.name)
                                       or self.plan.paper_rows.get(spec), self.tokenizer_hash))
        out = []
        try:
            for task_name, length, n, options in cells:
                task = tasks[(task_name, json.dumps(options, sort_keys=True))]
                out.append(self._run_cell(model, task, length, n))
        finally:
            del model
            free_memory()
        return out

    # -------------------------------------------------------------------------------------------- one cell
    def _run_cell(self, model: Any, task: Any, length: int | None, n: int | None) -> CellSummary:
        t0 = time.time()
        uses_length = getattr(task, "uses_length", True)
        length = length if uses_length else None
        key = self._cell_key(task, length)
        cell = CellSummary(model.name, task.name, length)
        label = f"{model.name} | {task.name}" + (f" @ {length}" if length else "")
        if isinstance(task, UnavailableTask):
            cell.status, cell.error = "failed", f"task unavailable: {task.error}"
            self._finish_cell(cell, key, t0)
            return cell
        if n is None and not is_whole_cell(task):
            n = DEFAULT_SAMPLES
        if is_whole_cell(task):
            return self._run_whole_cell(model, task, n, cell, label, t0)
        try:
            samples = task.samples(model, length, n, self.plan.seed)[:n]
        except Exception as err:  # noqa: BLE001
            cell.status, cell.error = "failed", f"could not build samples: {type(err).__name__}: {err}"
            self._say(f"FAILED {label}: {cell.error}")
            if self.dist.is_main:
                self.store.set_cell_status(model.name, task.name, key, "failed", cell.error, self.run_id)
            return cell
        identity = {"task": task.name, "task_config": task_config(task), "seed": self.plan.seed,
                    "tokenizer_sha": self.tokenizer_hash, "haystack": haystack_identity(samples),
                    **model_identity(model)}
        identity_sha = hashlib.sha256(dumps(identity).encode()).hexdigest()[:16]
        self.store.begin_cell(model.name, task.name, key, identity, identity_sha, len(samples), self.run_id)
        self.cell_identity = identity_sha
        mine = [s for s in samples if self.dist.owns(s.index)]
        if self.plan.retry_failed:   # only this rank's rows: another rank may have stored its retries already
            self.store.delete_failed(model.name, task.name, key, [s.index for s in mine])
        stored = self.store.stored_samples(model.name, task.name, key)
        by_index = {s.index: s for s in samples}
        changed = [i for i, (_, sha) in stored.items() if sha and i in by_index and sample_sha(by_index[i]) != sha]
        if changed:
            raise CellIdentityError(
                f"cell ({model.name}, {task.name}, {key}): {len(changed)} stored sample(s) (e.g. index {changed[0]}) "
                "differ from the ones generated now although the configuration matches (a generator changed?). "
                "Use a new --output folder.")
        todo = [s for s in mine if s.index not in stored]
        cell.planned, cell.skipped = len(mine), len(mine) - len(todo)
        cell.failed_before = sum(stored[s.index][0] == "error" for s in mine if s.index in stored)
        if not todo:
            self._settle_complete_cell(cell, key, stored, [s.index for s in samples])
            cell.seconds = time.time() - t0
            return cell
        bar = Progress(self.progress, total=len(mine), initial=cell.skipped, desc=label)
        try:
            self._evaluate_each(model, task, todo, key, cell, bar)
        finally:
            bar.close()
        self._finish_cell(cell, key, t0)
        return cell

    def _settle_complete_cell(self, cell: CellSummary, key: int, stored: dict, planned: list[int]) -> None:
        """A cell with a row for every planned sample is done, or failed when every row is a failure (nothing
        scored); its stored status is corrected either way (a label left by an earlier run does not stick)."""
        if planned and all(i in stored and stored[i][0] == "error" for i in planned):
            first = (self.store.first_error(cell.model, cell.task, key) or "").strip().splitlines()
            cell.status = "failed"
            cell.error = (f"all {len(planned)} samples failed (stored by earlier runs; --retry-failed retries them)"
                          + (f". First: {first[0]}" if first else ""))
        if self.dist.is_main:
            row = self.store.cell(cell.model, cell.task, key)
            if row is not None and (row["status"], row["error"]) != (cell.status, cell.error):
                self.store.set_cell_status(cell.model, cell.task, key, cell.status, cell.error, self.run_id)

    def _finish_cell(self, cell: CellSummary, key: int, t0: float) -> None:
        cell.seconds = time.time() - t0
        if self.dist.is_main or cell.status == "failed":
            self.store.set_cell_status(cell.model, cell.task, key, cell.status, cell.error, self.run_id)
        if cell.status == "failed":
            where = f" @ {cell.length}" if cell.length else ""
            self._say(f"FAILED {cell.model} | {cell.task}{where}: {cell.error}")

    def _row(self, model, task, key, sample: Sample, result: SampleResult | None, kind, error, elapsed) -> SampleRow:
        if result is not None:
            record = result.record or (sample.payload if isinstance(sample.payload, dict) else {})
            return SampleRow(model.name, task.name, key, sample.index, "ok", float(result.score), result.prediction,
                             metrics=result.metrics, record=record, sample_sha=sample_sha(sample),
                             seed=self.plan.seed, elapsed_s=elapsed, run_id=self.run_id, rank=self.dist.rank)
        record = sample.payload if isinstance(sample.payload, dict) else {}
        return SampleRow(model.name, task.name, key, sample.index, "error", None, "", error_kind=kind, error=error,
                         record=record, sample_sha=sample_sha(sample), seed=self.plan.seed, elapsed_s=elapsed,
                         run_id=self.run_id, rank=self.dist.rank)

    def _commit(self, model, task, key, sample, result, kind, error, elapsed, cell: CellSummary, bar) -> bool:
        if result is not None:
            problem = _nonfinite(result)
            if problem:
                result, kind, error = None, "nonfinite", problem
        self.store.add_sample(self._row(model, task, key, sample, result, kind, error, elapsed), self.cell_identity)
        if result is None:
            cell.failed += 1
        else:
            cell.ok += 1
        bar.update(_tokens_of(result, sample), cell.failed)
        return result is not None

    def _evaluate_each(self, model, task, todo: list[Sample], key: int, cell: CellSummary, bar: Progress,
                       batched: bool = True) -> None:
        if batched and self.plan.batch_size > 1 and callable(getattr(task, "evaluate_batch", None)):
            return self._evaluate_batches(model, task, todo, key, cell, bar)
        streak, last_error = 0, None
        for sample in todo:
            t = time.time()
            result, kind, error = evaluate_with_retries(lambda sample=sample: task.evaluate(model, sample), model)
            ok = self._commit(model, task, key, sample, result, kind, error, time.time() - t, cell, bar)
            streak, last_error = (0, None) if ok else (streak + 1, error)
            if streak >= MAX_CONSECUTIVE_FAILURES:
                cell.status = "failed"
                cell.error = (f"{streak} failures in a row; rest of the cell abandoned. A rerun continues it; "
                              "add --retry-failed to retry the failed samples too. "
                              f"Last: {(last_error or '').splitlines()[0]}")
                return

    def _evaluate_batches(self, model, task, todo: list[Sample], key: int, cell: CellSummary, bar: Progress) -> None:
        """batch_size samples per task.evaluate_batch call, each stored as its own row; a batch that fails (out of
        memory included) is run again one sample at a time, with the per-sample retries, so each failure row is its
        own sample's."""
        for i in range(0, len(todo), self.plan.batch_size):
            batch = todo[i:i + self.plan.batch_size]
            t = time.time()
            try:
                results = task.evaluate_batch(model, batch)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # noqa: BLE001 - the samples are retried one by one below
                results = None
                if is_oom(err):
                    free_memory()
            if results is None:
                self._evaluate_each(model, task, batch, key, cell, bar, batched=False)
            else:
                for sample, result in zip(batch, results, strict=False):
                    self._commit(model, task, key, sample, result, None, None, (time.time() - t) / len(batch), cell,
                                 bar)
            if cell.status == "failed":
                return

    def _run_whole_cell(self, model, task, n: int | None, cell: CellSummary, label: str, t0: float) -> CellSummary:
        """A task whose engine scores a whole cell at once (lm-eval: evaluate_cell(model, limit, seed) -> rows,
        aggregate, meta). Runs on rank 0 only; its rows are committed together when the engine returns, so an
        interrupted lm-eval cell reruns from its start (stored rows are never duplicated: INSERT OR IGNORE)."""
        key = NO_LENGTH
        if not self.dist.is_main:
            cell.status = "skipped (rank 0 runs whole-cell tasks)"
            return cell
        stored_cell = self.store.cell(model.name, task.name, key)
        if _whole_cell_covered(stored_cell, n):
            cell.skipped = len(self.store.stored_samples(model.name, task.name, key))
            cell.planned = cell.skipped
            return cell
        identity = {"task": task.name, "task_config": task_config_whole(task), "seed": self.plan.seed,
                    "tokenizer_sha": self.tokenizer_hash, "haystack": [], **model_identity(model)}
        identity_sha = hashlib.sha256(dumps(identity).encode()).hexdigest()[:16]
        self.store.begin_cell(model.name, task.name, key, identity, identity_sha, n, self.run_id)
        self.cell_identity = identity_sha
        self._say(f"{label}: evaluating the whole cell at once ({'all' if n is None else n} samples; "
                  "the engine shows its own progress)")
        result, kind, error = evaluate_with_retries(
            lambda: task.evaluate_cell(model, limit=n, seed=self.plan.seed), model)
        if result is None:
            cell.status, cell.error = "failed", f"{kind}: {error}"
            self._finish_cell(cell, key, t0)
            return cell
        rows = list(getattr(result, "rows", result))
        silent = Progress(False, total=len(rows), initial=0, desc=label)
        elapsed = (time.time() - t0) / max(len(rows), 1)
        for r in rows:
            self._commit(model, task, key, Sample(index=r.index, payload=r.record), r, None, None, elapsed, cell,
                         silent)
        cell.planned = len(rows)
        self.store.set_cell_aggregate(model.name, task.name, key, getattr(result, "aggregate", {}) or {},
                                      getattr(result, "meta", {}) or {}, n)
        self._finish_cell(cell, key, t0)
        return cell


@dataclass
class UnavailableTask:
    """A task name that resolved but cannot run here (e.g. no offline data); its cells are recorded as failed."""

    name: str
    error: str
    uses_length: bool = True


SMALL_CPU_MODEL = 20_000_000


def _threads_for(model: Any) -> None:
    """Tiny models on the CPU run single-threaded: at d=128 intra-op threads cost more than they give, and on a busy
    machine they spin (measured: 0.6 s vs 2-12 s per 2K-token RULER sample on 2 shared cores). OMP_NUM_THREADS wins."""
    import torch

    if (getattr(model, "device", None) is not None and model.device.type == "cpu"
            and "OMP_NUM_THREADS" not in os.environ and model.num_params(False) < SMALL_CPU_MODEL):
        torch.set_num_threads(1)


def is_whole_cell(task: Any) -> bool:
    """Tasks evaluated a cell at a time (lm-eval) expose evaluate_cell(model, limit=, seed=)."""
    return callable(getattr(task, "evaluate_cell", None))


def _whole_cell_covered(row: Any, n: int | None) -> bool:
    """Whether a stored whole-cell task cell already covers a request for n samples (None: the full set)."""
    if row is None or row["status"] != "done":
        return False
    stored = row["num_samples"]
    return stored is None or (n is not None and n <= stored)


def task_config_whole(task: Any) -> dict:
    return {"name": task.name, "lm_eval_task": getattr(task, "lm_eval_name", None),
            "source": getattr(task, "source", None), "offline": getattr(task, "offline", None),
            "truncate_input_to": getattr(task, "truncate_input_to", None)}


def run_plan(plan: Plan, store: ResultsStore, dist: DistContext | None = None, progress: bool = True,
             argv: list[str] | None = None, **kwargs: Any) -> RunSummary:
    return SweepRunner(plan, store, dist, progress=progress, argv=argv, **kwargs).run()


def default_output() -> Path:
    return Path(os.environ.get("GDN2_RUNS", "runs")) / "default"
