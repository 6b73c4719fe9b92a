"""Length targeting with the model's tokenizer.

A family generator turns (random stream, haystack size n) into a Draft. For a context length L and a generation
budget G, a sample is accepted when

    0.9 * L <= tokens(input + answer_prefix) + G <= L          (tokens without special tokens)

1. Probe: the smallest haystack (n_min) must fit, else LengthTargetError (L is too small for this task).
2. Binary search, once per call, for the largest n whose probe drafts (two fixed random streams) fit; the
   tokens-per-unit slope from the search gives the step for step 3.
3. Every sample is drafted at that n and all are encoded in batches. A sample outside the window is redrafted with
   fresh needles (next attempt's random stream) and n moved by the estimated overshoot; at most ``max_attempts``
   times, then LengthTargetError. (RULER steps down by 500 words / 25 lines, which can fall below 0.9 L at short
   lengths, and retries forever.)
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..tokenization import Encoded, TokenCounter

LOWER_FRACTION = 0.9
PROBES = 2
BATCH = 32


class LengthTargetError(ValueError):
    """A context length cannot be met (too small for the task, or the fitting loop ran out of attempts)."""


@dataclass
class Draft:
    """A generated sample before length checking. Offsets are character offsets into ``input``."""

    input: str
    answer_prefix: str
    outputs: list[str]
    needle_chars: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix


class Family(Protocol):
    """What length targeting needs from a task family."""

    unit: str  # what one haystack unit is ("word", "line", ...), for messages

    def min_units(self) -> int: ...

    def draft(self, rng: random.Random, num_units: int) -> Draft: ...


@dataclass
class Fitted:
    draft: Draft
    encoded: Encoded
    num_units: int
    attempts: int


def window(length: int, max_new_tokens: int) -> tuple[int, int]:
    """(lowest, highest) allowed prompt token counts for context length ``length``."""
    return math.ceil(LOWER_FRACTION * length) - max_new_tokens, length - max_new_tokens


def find_num_units(family: Family, counter: TokenCounter, length: int, max_new_tokens: int,
                   probe_rng: Callable[[int], random.Random], task: str = "") -> tuple[int, float]:
    """Largest haystack size whose probe drafts fit ``length``; returns (n, tokens per unit)."""
    _, budget = window(length, max_new_tokens)

    def tokens_at(n: int) -> int:
        drafts = [family.draft(probe_rng(j), n) for j in range(PROBES)]
        return max(counter.count([d.prompt for d in drafts]))

    n_min = family.min_units()
    t_min = tokens_at(n_min)
    if t_min > budget:
        raise LengthTargetError(
            f"context length {length} is too small for task {task!r} with tokenizer {counter.name}: the prompt with "
            f"the smallest haystack ({n_min} {family.unit}s) is {t_min} tokens, plus {max_new_tokens} to generate "
            f"makes {t_min + max_new_tokens} > {length}. Use a length above {t_min + max_new_tokens} (a real haystack "
            f"needs several times that)."
        )
    # Slope from a second probe, then bracket the answer and bisect.
    n_probe = n_min + max(8, (budget - t_min) // 8)
    t_probe = tokens_at(n_probe)
    slope = max((t_probe - t_min) / (n_probe - n_min), 1e-3)
    lo, t_lo = (n_probe, t_probe) if t_probe <= budget else (n_min, t_min)
    hi = max(lo + 1, n_min + int((budget - t_min) / slope * 1.05) + 1)
    for _ in range(40):
        t_hi = tokens_at(hi)
        if t_hi > budget:
            break
        lo, t_lo = hi, t_hi
        hi = lo + max(1, int((hi - n_min) * 0.5))
    else:
        raise LengthTargetError(f"task {task!r}: the prompt does not grow with the haystack size; check the task")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        t_mid = tokens_at(mid)
        if t_mid <= budget:
            lo, t_lo = mid, t_mid
        else:
            hi = mid
    if lo > n_min:
        slope = max((t_lo - t_min) / (lo - n_min), 1e-3)
    return lo, slope


def fit_samples(family: Family, counter: TokenCounter, length: int, max_new_tokens: int, num_samples: int,
                sample_rng: Callable[[int, int], random.Random], probe_rng: Callable[[int], random.Random],
                task: str = "", max_attempts: int = 12, progress: bool = False):
    """Yield one Fitted per sample index, in order (see the module docstring)."""
    low, budget = window(length, max_new_tokens)
    n_star, slope = find_num_units(family, counter, length, max_new_tokens, probe_rng, task)
    n_min = family.min_units()
    bar = _progress(num_samples, task, length) if progress else None
    for start in range(0, num_samples, BATCH):
        indices = list(range(start, min(start + BATCH, num_samples)))
        drafts = [family.draft(sample_rng(i, 0), n_star) for i in indices]
        encs = counter.encode([d.prompt for d in drafts])
        for i, draft, enc in zip(indices, drafts, encs, strict=True):
            n, attempt = n_star, 0
            while not (low <= enc.num_tokens <= budget):
                attempt += 1
                if attempt >= max_attempts:
                    raise LengthTargetError(
                        f"task {task!r}, sample {i}: no fit in [{low + max_new_tokens}, {length}] tokens after "
                        f"{max_attempts} attempts (last: {enc.num_tokens + max_new_tokens} tokens with {n} "
                        f"{family.unit}s). The length may be too small for this task and tokenizer."
                    )
                if enc.num_tokens > budget:
                    n -= max(1, math.ceil((enc.num_tokens - budget) / slope))
                else:
                    n += max(1, int((budget - enc.num_tokens) / slope) - 1)
                n = max(n, n_min)
                draft = family.draft(sample_rng(i, attempt), n)
                enc = counter.encode([draft.prompt])[0]
            yield Fitted(draft, enc, n, attempt)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


def _progress(total: int, task: str, length: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=f"{task} @ {length}", leave=False, disable=total < 50)
