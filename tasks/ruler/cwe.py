"""RULER common words extraction (cwe), after NVIDIA/RULER scripts/data/synthetic/common_words_extraction.py.

- Vocabulary: the sorted set of wonderwords nouns + adjectives + verbs, shuffled once with Random(seed).
- An example draws n distinct words; the first num_cw are "common" and repeated freq_cw times, the rest freq_ucw
  times; the list is shuffled with Random(seed) (RULER's fixed-seed shuffle) and numbered "1. w 2. w ...".
- num_fewshot worked examples precede the question, "\\n"-joined, each the full prompt plus its answer.
- Below 4K tokens: example (20 words, 3/1 repeats) and question repeats 6/1; from 4K: example (40 words, 10/3)
  and question freq_cw/freq_ucw (30/3).
- references: the num_cw common words.
RULER switches to a larger English word list (its english_words.json) when n exceeds the wonderwords vocabulary
(only past ~100K tokens); here the vocabulary is then extended with the distinct lower-case words of the essay text.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .constants import CWE_ANSWER_PREFIX, CWE_TEMPLATE
from .length import Draft
from .words import cwe_words


@dataclass(frozen=True)
class CWEKnobs:
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    num_fewshot: int = 1


class CWEFamily:
    unit = "word"

    def __init__(self, knobs: CWEKnobs, length: int, seed: int, extra_words: list[str] | None = None):
        self.knobs = knobs
        self.length = length
        self.seed = seed
        words = list(cwe_words())
        random.Random(seed).shuffle(words)
        self.words = words
        self._extra_words = extra_words or []
        self._big_vocab: list[str] | None = None

    def min_units(self) -> int:
        return self.knobs.num_cw + 1

    def _vocab(self, num_words: int) -> list[str]:
        if num_words <= len(self.words):
            return self.words
        if self._big_vocab is None:
            seen = set(self.words)
            extra = []
            for w in self._extra_words:
                w = w.lower()
                if re.fullmatch(r"[a-z]+", w) and w not in seen:
                    seen.add(w)
                    extra.append(w)
            self._big_vocab = self.words + extra
        if num_words > len(self._big_vocab):
            raise ValueError(f"cwe needs {num_words} distinct words at this length but only {len(self._big_vocab)} "
                             "are available (wonderwords lists + essay words); use a shorter length")
        return self._big_vocab

    def _example(self, rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int):
        chosen = rng.sample(self._vocab(num_words), num_words)
        common, uncommon = chosen[:self.knobs.num_cw], chosen[self.knobs.num_cw:]
        word_list = common * common_repeats + uncommon * uncommon_repeats
        random.Random(self.seed).shuffle(word_list)
        context = " ".join(f"{i + 1}. {word}" for i, word in enumerate(word_list))
        return context, common

    def draft(self, rng: random.Random, num_units: int) -> Draft:
        k = self.knobs
        short = self.length < 4096
        shots = []
        for _ in range(k.num_fewshot):
            if short:
                context, answer = self._example(rng, 20, 3, 1)
            else:
                context, answer = self._example(rng, 40, 10, 3)
            shots.append(CWE_TEMPLATE.format(context=context) + CWE_ANSWER_PREFIX + " "
                         + " ".join(f"{i + 1}. {word}" for i, word in enumerate(answer)))
        if short:
            context, answer = self._example(rng, num_units, 6, 1)
        else:
            context, answer = self._example(rng, num_units, k.freq_cw, k.freq_ucw)
        text = "\n".join(shots) + "\n" + CWE_TEMPLATE.format(context=context)
        return Draft(text, CWE_ANSWER_PREFIX, answer, [], {"haystack_units": num_units})
