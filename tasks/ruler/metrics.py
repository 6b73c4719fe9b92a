"""RULER post-processing and its two metrics (NVIDIA/RULER scripts/eval/evaluate.py, eval/synthetic/constants.py).

- postprocess_pred: strip, replace control characters [\\x00-\\x1f] by a newline, strip again.
- string_match_all (niah, vt, cwe, fwe): per sample, the fraction of references found in the prediction
  (case-insensitive substring); the task score is the mean over samples x 100, rounded to 2 decimals.
- string_match_part (qa): per sample, 1 if any reference is found; mean x 100. (lm-eval's port returns a fraction;
  RULER returns percent, as here.)
"""
from __future__ import annotations

import re
from typing import Sequence

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """RULER's post-processing of a model continuation."""
    prediction = prediction.strip()
    return _CONTROL_CHARS.sub("\n", prediction).strip()


def match_all_fraction(prediction: str, references: Sequence[str]) -> float:
    """Fraction (0..1) of ``references`` that occur in ``prediction``, case-insensitive."""
    if not references:
        raise ValueError("a sample needs at least one reference to be scored")
    pred = prediction.lower()
    return sum(1.0 for ref in references if ref.lower() in pred) / len(references)


def match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any of ``references`` occurs in ``prediction`` (case-insensitive), else 0.0."""
    if not references:
        raise ValueError("a sample needs at least one reference to be scored")
    pred = prediction.lower()
    return 1.0 if any(ref.lower() in pred for ref in references) else 0.0


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_all over a task: mean of per-sample fractions x 100, rounded to 2 decimals.
    ``predictions`` are expected post-processed (see postprocess_pred)."""
    _check_lengths(predictions, references)
    total = sum(match_all_fraction(p, r) for p, r in zip(predictions, references, strict=True))
    return round(total / len(predictions) * 100, 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_part over a task: percent of samples where any reference is found, 2 decimals."""
    _check_lengths(predictions, references)
    total = sum(match_part(p, r) for p, r in zip(predictions, references, strict=True))
    return round(total / len(predictions) * 100, 2)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}
PER_SAMPLE = {"string_match_all": match_all_fraction, "string_match_part": match_part}


def score_prediction(prediction: str, references: Sequence[str], metric: str = "string_match_all") -> float:
    """Per-sample score in percent (0..100): post-process, then the metric's per-sample rule. The mean of these
    over a task equals the task-level metric (before its rounding)."""
    try:
        rule = PER_SAMPLE[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(PER_SAMPLE)}") from None
    return rule(postprocess_pred(prediction), references) * 100.0


def _check_lengths(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
