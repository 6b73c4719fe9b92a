"""RULER frequent words extraction (fwe), after NVIDIA/RULER scripts/data/synthetic/freq_words_extraction.py.

- A fresh coded vocabulary per sample: vocab_size random strings of coded_wordlen lower-case letters (distinct),
  sorted, shuffled with Random(seed); rank 1 is replaced by "..." (noise).
- Word of rank k appears int(n * k^-alpha / zeta(alpha)) times (alpha = 2.0); the words are shuffled with
  Random(seed) and joined with spaces.
- vocab_size = (L - max_new_tokens) // 50 when not given, as in RULER.
- references: the words of ranks 2, 3, 4.
RULER finds n with a linear search; we use the common binary search (same target: the largest n that fits).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

import numpy as np

from .constants import FWE_ANSWER_PREFIX, FWE_TEMPLATE
from .length import Draft


@dataclass(frozen=True)
class FWEKnobs:
    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int = -1


def riemann_zeta(s: float) -> float:
    """zeta(s) for s > 1 (Euler-Maclaurin after 1000 terms; error far below float64 rounding for s >= 1.1)."""
    if s <= 1:
        raise ValueError(f"zeta(s) diverges for s <= 1; alpha must be > 1, got {s}")
    n = 1000
    k = np.arange(1, n, dtype=np.float64)
    head = float(np.sum(k ** -s))
    tail = n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s / 12 * n ** (-s - 1) - s * (s + 1) * (s + 2) / 720 * n ** (-s - 3)
    return head + tail


class FWEFamily:
    unit = "word"

    def __init__(self, knobs: FWEKnobs, length: int, max_new_tokens: int, seed: int):
        self.knobs = knobs
        self.seed = seed
        self.vocab_size = (length - max_new_tokens) // 50 if knobs.vocab_size == -1 else knobs.vocab_size
        if self.vocab_size < 5:
            raise ValueError(f"fwe needs a vocabulary of at least 5 coded words; length {length} gives "
                             f"{self.vocab_size} (vocab_size = (length - {max_new_tokens}) // 50)")
        ranks = np.arange(1, self.vocab_size + 1)
        self._weights = ranks ** -knobs.alpha / riemann_zeta(knobs.alpha)

    def min_units(self) -> int:
        # enough words that ranks 2..5 get strictly decreasing, non-zero counts
        return int(np.ceil(2.0 / (self._weights[3] - self._weights[4]))) + 1

    def _vocab(self, rng: random.Random) -> list[str]:
        size, wl = self.vocab_size, self.knobs.coded_wordlen
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=wl)) for _ in range(size)]
        while len(set(vocab)) < size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=wl)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."
        return vocab

    def draft(self, rng: random.Random, num_units: int) -> Draft:
        vocab = self._vocab(rng)
        counts = (num_units * self._weights).astype(int)
        words = [w for w, c in zip(vocab, counts.tolist(), strict=True) for _ in range(c)]
        random.Random(self.seed).shuffle(words)
        text = FWE_TEMPLATE.format(context=" ".join(words))
        return Draft(text, FWE_ANSWER_PREFIX, vocab[1:4], [], {"haystack_units": num_units})
