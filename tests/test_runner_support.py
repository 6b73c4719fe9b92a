"""Fake tasks for the runner/CLI tests, importable by subprocess sweeps as `test_runner_support:<Name>` (the tests put
tests/ on PYTHONPATH). Each is a tiny EvalTask; none needs a real model output to score."""
from __future__ import annotations

import math
import os
import time

import torch

from harness.eval_task import Sample, SampleResult


class CountTask:
    """Deterministic fast task: score = 100 if the model's greedy next token after [index] is even, else 0.
    delay: seconds slept per sample (to kill a sweep mid-cell)."""

    uses_length = True

    def __init__(self, delay: float = 0.0, name: str = "count"):
        self.name = name
        self.delay = float(os.environ.get("FAKE_TASK_DELAY", delay))

    def config(self) -> dict:
        return {"name": self.name}

    def samples(self, model, length, num_samples, seed):
        return [Sample(index=i, payload={"input_ids": [1 + (seed + i) % 50, 2 + i % 7], "length": length})
                for i in range(num_samples)]

    def evaluate(self, model, sample):
        time.sleep(self.delay)
        lp, greedy = model.token_logprobs(sample.payload["input_ids"], score_from=1)
        next_id = model.generate_ids(sample.payload["input_ids"], 1)[0]
        return SampleResult(index=sample.index, score=100.0 if next_id % 2 == 0 else 0.0, prediction=str(next_id),
                            metrics={"logprob": float(lp.sum())}, record=dict(sample.payload))


def SlowTask():  # noqa: N802 - a factory named like the class it returns, for the "module:attribute" spec
    return CountTask(delay=0.15, name="slow")


class FailingTask(CountTask):
    """Raises on every sample (an exception row each, then the cell is abandoned)."""

    def __init__(self):
        super().__init__(name="failing")

    def evaluate(self, model, sample):
        raise RuntimeError(f"deliberate failure on sample {sample.index}")


class FlakyTask(CountTask):
    """Fails on odd indices only: failure rows interleaved with ok rows, the cell completes."""

    def __init__(self):
        super().__init__(name="flaky")

    def evaluate(self, model, sample):
        if sample.index % 2:
            raise ValueError(f"odd sample {sample.index}")
        return super().evaluate(model, sample)


class OOMTask(CountTask):
    """Out of memory while model.segment > fits_at; always when fits_at is 0."""

    def __init__(self, fits_at: int = 256, name: str = "oom"):
        super().__init__(name=name)
        self.fits_at = fits_at
        self.segments_seen: list[int] = []

    def evaluate(self, model, sample):
        self.segments_seen.append(model.segment)
        if self.fits_at == 0 or model.segment > self.fits_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fake)")
        return super().evaluate(model, sample)


class NaNLogitsTask(CountTask):
    """Makes the model's LM head return NaN, so EvalModel's finite check raises inside generation."""

    def __init__(self):
        super().__init__(name="nan_logits")

    def evaluate(self, model, sample):
        head = model.lm.get_output_embeddings()
        handle = head.register_forward_hook(lambda mod, inp, out: out * math.nan)
        try:
            return super().evaluate(model, sample)
        finally:
            handle.remove()


class NaNScoreTask(CountTask):
    def __init__(self):
        super().__init__(name="nan_score")

    def evaluate(self, model, sample):
        result = super().evaluate(model, sample)
        result.score = math.inf
        return result


class BrokenSamplesTask(CountTask):
    """Cannot even build its samples (a cell-level failure)."""

    def __init__(self):
        super().__init__(name="broken_samples")

    def samples(self, model, length, num_samples, seed):
        raise ValueError(f"cannot build samples at length {length}")
