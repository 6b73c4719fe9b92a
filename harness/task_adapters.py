"""EvalTask adapters for the tasks of tasks/ (RULER, MQAR), and the one lookup the CLI and runner use for every kind
of task name.

    task = resolve_task("niah_single_1")                # RULER (also the paper's names: s_niah_1, mk_niah_1, ...)
    task = resolve_task("mqar")                         # token-level MQAR (tasks.mqar)
    task = resolve_task("lm_eval:piqa")                 # lm-eval and perplexity tasks (harness.lm_eval_tasks)
    task = resolve_task("my_pkg.tasks:MyTask", {...})   # any EvalTask: "module:attribute" (class, factory or object)

An adapter turns the task's records into harness Samples (payload = the task's flat record, so the store keeps the
input, references, needle depths in tokens and length of every sample) and scores one sample per evaluate(), or
several together per evaluate_batch() (what the runner calls when --batch-size > 1).
"""
from __future__ import annotations

import importlib
import json
from typing import Any

from harness.eval_task import EvalTask, Sample, SampleResult
from harness.model import EvalModel
from harness.registry import UnknownNameError, unknown_name

LM_EVAL_PREFIXES = ("lm_eval:", "ppl:")   # what harness.lm_eval_tasks.lm_eval_task resolves


class RulerEvalTask:
    """A RULER row of tasks.ruler.task.RULER_TASKS behind the EvalTask contract: greedy generation of
    max_new_tokens after input + answer_prefix, RULER post-processing and metric, score in percent."""

    uses_length = True

    def __init__(self, ruler_task: Any, haystack_file: str | None = None):
        self.ruler = ruler_task
        self.name = ruler_task.name
        self.haystack_file = haystack_file
        self.metric_name = ruler_task.metric

    def config(self) -> dict:
        """What makes this task's samples what they are (part of a cell's identity in the store)."""
        return {"kind": "ruler", "name": self.name, "family": self.ruler.family, "knobs": repr(self.ruler.knobs),
                "metric": self.ruler.metric, "max_new_tokens": self.ruler.max_new_tokens,
                "haystack_file": self.haystack_file}

    def samples(self, model: EvalModel, length: int | None, num_samples: int, seed: int) -> list[Sample]:
        if length is None:
            raise ValueError(f"{self.name} needs a context length (--lengths)")
        built = self.ruler.build_samples(model.tokenizer, length=length, num_samples=num_samples, seed=seed,
                                         haystack_file=self.haystack_file)
        return [Sample(index=s.index, payload=s.to_record()) for s in built]

    def evaluate(self, model: EvalModel, sample: Sample) -> SampleResult:
        return self.evaluate_batch(model, [sample], batch_size=1)[0]

    def evaluate_batch(self, model: EvalModel, samples: list[Sample],
                       batch_size: int | None = None) -> list[SampleResult]:
        """evaluate() of each sample, batch_size (None: model.batch_size) of them decoded together."""
        # As RULER's HF wrapper: the prompt gets the tokenizer's default special tokens (BOS for Llama-style
        # tokenizers, none for GPT-NeoX; a spec's bos= overrides); the length window is counted without them.
        prompts = [model.encode_input(s.payload["input"] + s.payload["answer_prefix"]) for s in samples]
        eos = model.tokenizer.eos_token_id
        max_new = {s.payload["max_new_tokens"] for s in samples}
        if len(max_new) != 1:
            raise ValueError(f"{self.name}: samples of one batch must share max_new_tokens; got {sorted(max_new)}")
        outputs = model.generate_ids_many(prompts, max_new.pop(), stop_ids=[eos] if eos is not None else [],
                                          batch_size=batch_size)
        results = []
        for sample, prompt_ids, generated in zip(samples, prompts, outputs, strict=False):
            prediction = model.decode(generated)
            results.append(SampleResult(index=sample.index, score=self.ruler.score(prediction, sample.payload),
                                        prediction=prediction,
                                        metrics={"prompt_tokens": len(prompt_ids), "generated_tokens": len(generated)},
                                        record=sample.payload))
        return results


class MqarEvalTask:
    """The token-level MQAR task (tasks.mqar; Zoology's multi-query associative recall) behind the EvalTask
    contract. Its samples are token-id sequences; the score is the percent of queried values the model predicts
    greedily (teacher-forced, one forward pass with the recurrent state carried)."""

    uses_length = True

    OPTIONS = ("num_kv_pairs", "power_a")    # what a suite cell's options may set (tasks.mqar build_samples)

    def __init__(self, mqar_task: Any, **options: Any):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"task {getattr(mqar_task, 'name', 'mqar')!r}: unknown option(s) {unknown}; "
                             f"known: {list(self.OPTIONS)}")
        if hasattr(mqar_task, "check_options"):
            mqar_task.check_options(**options)
        self.mqar = mqar_task
        self.name = getattr(mqar_task, "name", "mqar")
        self.options = options

    def config(self) -> dict:
        cfg = getattr(self.mqar, "config", None)
        cfg = cfg() if callable(cfg) else cfg
        return {"kind": "mqar", "name": self.name, "config": repr(cfg), "options": self.options}

    def samples(self, model: EvalModel, length: int | None, num_samples: int, seed: int) -> list[Sample]:
        """One sequence per index (tasks.mqar draws sample i from its own seed, so a resumed cell with more
        samples keeps the samples already stored)."""
        if length is None:
            raise ValueError(f"{self.name} needs a sequence length (--lengths)")
        built = self.mqar.build_samples(vocab_size=_vocab_size(model), length=length, num_samples=num_samples,
                                        seed=seed, **self.options)
        return [Sample(index=s.index, payload=s.to_record()) for s in built]

    def evaluate(self, model: EvalModel, sample: Sample) -> SampleResult:
        return self.evaluate_batch(model, [sample], batch_size=1)[0]

    def evaluate_batch(self, model: EvalModel, samples: list[Sample],
                       batch_size: int | None = None) -> list[SampleResult]:
        """evaluate() of each sample, batch_size (None: model.batch_size) sequences per forward pass."""
        predictions = model.next_token_argmax_many([list(s.payload["input_ids"]) for s in samples],
                                                   batch_size=batch_size)
        results = []
        for sample, predicted_next in zip(samples, predictions, strict=False):
            record = sample.payload
            score, detail = self.mqar.score(predicted_next, record)
            results.append(SampleResult(index=sample.index, score=float(score),
                                        prediction=json.dumps(detail.get("predicted", [])),
                                        metrics={"correct": detail.get("correct"),
                                                 "num_queries": detail.get("num_queries"),
                                                 "tokens": len(record["input_ids"])},
                                        record=record))
        return results


def _vocab_size(model: EvalModel) -> int:
    config = getattr(model.lm, "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if size else len(model.tokenizer)


# ---------------------------------------------------------------------------------------------------- lookup
def _ruler_adapter(canonical: str, task: Any, options: dict) -> EvalTask:
    kind = getattr(task, "kind", "generate")
    if kind == "token":
        return MqarEvalTask(task, **options)
    return RulerEvalTask(task, **options)


def resolve_task(name: str, options: dict | None = None, offline: bool = True) -> EvalTask:
    """The EvalTask for a task name (see the module docstring); UnknownNameError with the nearest known name."""
    options = dict(options or {})
    if ":" in name and not name.startswith(LM_EVAL_PREFIXES):
        module_name, attr = name.split(":", 1)
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UnknownNameError(
                f"task {name!r}: cannot import {attr!r} from module {module_name!r} ({err})") from err
        task = obj(**options) if callable(obj) and not isinstance(obj, EvalTask) else obj
        return task
    if name.startswith(LM_EVAL_PREFIXES) or f"lm_eval:{name}" in _lm_eval_names():
        lm_eval_task = _lm_eval_factory()
        if lm_eval_task is None:
            raise UnknownNameError(f"task {name!r} needs harness.lm_eval_tasks (lm-eval and perplexity tasks), which "
                                   "is not importable in this checkout; install the eval extra: "
                                   "pip install -e '.[eval]'")
        return lm_eval_task(name, offline=offline, **options)
    import tasks

    try:
        canonical = tasks.resolve_name(name)
    except tasks.UnknownTaskError:
        raise unknown_name("task", name, list_task_names()) from None
    return _ruler_adapter(canonical, tasks.get_task(canonical), options)


def _lm_eval_factory():
    try:
        from harness.lm_eval_tasks import lm_eval_task
    except ImportError:
        return None
    return lm_eval_task


def _lm_eval_names() -> list[str]:
    """lm-eval paper-table tasks (lm_eval:<key>) and perplexity corpora (ppl:<corpus>), when their modules exist."""
    names = []
    try:
        from harness.lm_eval_tasks import CATALOG

        names += [f"lm_eval:{key}" for key in CATALOG]
    except ImportError:
        pass
    try:
        from tasks.perplexity import CORPORA

        names += [f"ppl:{corpus}" for corpus in CORPORA]
    except ImportError:
        pass
    return names


def list_task_names() -> list[str]:
    import tasks

    return sorted(tasks.list_tasks()) + sorted(_lm_eval_names())


def describe_tasks() -> list[dict]:
    """One row per task for `list tasks`: name, aliases, kind, description."""
    import tasks

    rows = []
    for name, aliases in tasks.list_tasks().items():
        try:
            task = tasks.get_task(name)
            kind = getattr(task, "kind", "generate")
            description = getattr(task, "description", "") or ""
        except Exception as err:  # a task module still missing: say so instead of failing the listing
            kind, description = "?", f"(not loadable: {type(err).__name__}: {err})"
        rows.append({"task": name, "aliases": ", ".join(aliases), "kind": kind, "length axis": "yes",
                     "description": description})
    for name in _lm_eval_names():
        description, kind, axis = "", "lm-eval", "no"
        if name.startswith("lm_eval:"):
            from harness.lm_eval_tasks import CATALOG

            spec = CATALOG[name.split(":", 1)[1]]
            columns = ", ".join(c for c, _ in spec.columns)
            offline = spec.offline_source or f"not offline: {spec.missing_why}"
            description = f"paper {spec.table} ({columns}); offline: {offline}"
        else:
            kind, axis = "perplexity", "yes"
            description = "token/word perplexity of consecutive sequences of the length, per-position buckets"
        rows.append({"task": name, "aliases": "", "kind": kind, "length axis": axis, "description": description})
    return rows
