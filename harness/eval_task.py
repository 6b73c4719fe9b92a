"""The contract between the sweep runner and every kind of task (RULER, MQAR, perplexity, lm-eval suites).

A sweep cell is (model, task, length). The runner asks the task for the cell's samples, evaluates them one at a
time and commits each result row as soon as it exists, so a killed sweep resumes at the next unscored sample.

    class EvalTask(Protocol):
        name: str                       # registry name, e.g. "niah_single_1", "wikitext_ppl", "lm_eval:piqa"
        uses_length: bool               # whether the context length axis applies (RULER: yes; piqa: no)
        def samples(model, length, num_samples, seed) -> list[Sample]
        def evaluate(model, sample) -> SampleResult

Tasks whose engine evaluates a whole cell at once (lm-eval) implement evaluate_cell instead and return all rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from harness.model import EvalModel


@dataclass
class Sample:
    """One unit of evaluation. index is stable across reruns of the same (task, length, seed, tokenizer)."""

    index: int
    payload: dict[str, Any]


@dataclass
class SampleResult:
    """What the store keeps per scored sample. score: percent (0..100) for accuracies, or the task's metric."""

    index: int
    score: float
    prediction: str = ""
    metrics: dict[str, float] = field(default_factory=dict)   # extra metrics (e.g. acc_norm, nll, tokens)
    record: dict[str, Any] = field(default_factory=dict)      # input, references, length, needle depths, ...


@runtime_checkable
class EvalTask(Protocol):
    name: str
    uses_length: bool

    def samples(self, model: EvalModel, length: int | None, num_samples: int, seed: int) -> list[Sample]: ...

    def evaluate(self, model: EvalModel, sample: Sample) -> SampleResult: ...
