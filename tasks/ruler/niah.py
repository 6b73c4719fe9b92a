"""RULER needle in a haystack (all eight niah variants and our natural-language multi-key row).

A draft, as in NVIDIA/RULER scripts/data/synthetic/niah.py:
- num_needle_k = max(k, q) keys of type_needle_k, each with num_needle_v values of type_needle_v; one needle
  "One of the special magic {type_v} for {key} is: {value}." per (key, value); needles shuffled.
- essay: the first n words of the text, cut into sentences; needles go in at sentence index
  int(num_sentences * depth / 100) for depths drawn without replacement from DEPTHS; pieces joined with " ".
- noise / needle: n lines (the noise unit, or n distractor needles with fresh random keys and values); the needles
  are inserted at line indices drawn without replacement; lines joined with "\\n".
- q of the keys are queried ("a, b, and c"); the references are all values of the queried keys.
- Wording is singular when q x v == 1.
Our only changes: keys within a sample are distinct, and distractor keys never equal a real key (RULER does not
check; a collision would make the answer ambiguous and is vanishingly rare).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ..haystacks import NOISE_UNIT, EssayText
from .constants import (
    DEPTHS,
    NIAH_ANSWER_PREFIX,
    NIAH_ANSWER_PREFIX_SINGULAR,
    NIAH_NEEDLE,
    NIAH_TEMPLATE,
    NIAH_TEMPLATE_SINGULAR,
)
from .length import Draft
from .words import random_atom


@dataclass(frozen=True)
class NiahKnobs:
    """One row of the niah table (RULER scripts/synthetic.yaml)."""

    type_haystack: str  # "noise" | "essay" | "needle"
    type_needle_k: str  # "words" | "numbers" | "uuids"
    type_needle_v: str  # "words" | "numbers" | "uuids"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1

    def __post_init__(self):
        if self.type_haystack not in ("noise", "essay", "needle"):
            raise ValueError(f"type_haystack must be noise, essay or needle, got {self.type_haystack!r}")
        if min(self.num_needle_k, self.num_needle_v, self.num_needle_q) < 1:
            raise ValueError(f"needle counts must be >= 1: {self}")

    @property
    def num_keys(self) -> int:
        return max(self.num_needle_k, self.num_needle_q)

    @property
    def singular(self) -> bool:
        return self.num_needle_q * self.num_needle_v == 1


def join_query(queries: list[str]) -> str:
    """RULER's query list: "a", or "a, b, and c" (also "a, and b" for two)."""
    return queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]


class NiahFamily:
    unit = "word"

    def __init__(self, knobs: NiahKnobs, essay: EssayText | None = None,
                 draw_atom: Callable[[random.Random, str], str] = random_atom):
        """draw_atom(rng, kind) draws keys and values (RULER's random_atom; the training mix passes its own, whose
        word keys come from a list disjoint from RULER's)."""
        self.knobs = knobs
        self.essay = essay
        self.draw_atom = draw_atom
        if knobs.type_haystack == "essay" and essay is None:
            raise ValueError("an essay haystack needs its text (tasks.haystacks.load_essay)")
        self.unit = "word" if knobs.type_haystack == "essay" else "line"
        type_v = knobs.type_needle_v
        if knobs.singular:
            self.template = NIAH_TEMPLATE_SINGULAR
            self.answer_prefix = NIAH_ANSWER_PREFIX_SINGULAR
            self.type_v_prompt = type_v[:-1]
        else:
            self.template = NIAH_TEMPLATE
            self.answer_prefix = NIAH_ANSWER_PREFIX
            self.type_v_prompt = type_v
        self.context_offset = len(self.template.split("{context}")[0].format(type_needle_v=self.type_v_prompt))

    def min_units(self) -> int:
        k = self.knobs
        return 1 if k.type_haystack == "essay" else k.num_keys * k.num_needle_v

    def draft(self, rng: random.Random, num_units: int) -> Draft:
        k = self.knobs
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        for _ in range(k.num_keys):
            key = self.draw_atom(rng, k.type_needle_k)
            while key in keys:
                key = self.draw_atom(rng, k.type_needle_k)
            keys.append(key)
            vals = []
            for _ in range(k.num_needle_v):
                vals.append(self.draw_atom(rng, k.type_needle_v))
                needles.append(NIAH_NEEDLE.format(type_needle_v=k.type_needle_v, key=key, value=vals[-1]))
            values.append(vals)
        rng.shuffle(needles)

        if k.type_haystack == "essay":
            context, needle_chars = self._essay_context(rng, num_units, needles)
        else:
            context, needle_chars = self._line_context(rng, num_units, needles, set(keys))

        indices = rng.sample(range(k.num_keys), k.num_needle_q)
        query = join_query([keys[i] for i in indices])
        answers = [a for i in indices for a in values[i]]
        text = self.template.format(type_needle_v=self.type_v_prompt, context=context, query=query)
        prefix = self.answer_prefix.format(type_needle_v=self.type_v_prompt, query=query)
        return Draft(text, prefix, answers, [self.context_offset + c for c in needle_chars],
                     {"haystack_units": num_units})

    def _essay_context(self, rng: random.Random, num_words: int, needles: list[str]) -> tuple[str, list[int]]:
        sents = self.essay.sentences(num_words)
        depths = rng.sample(DEPTHS, len(needles))
        positions = [0] + sorted(int(len(sents) * (d / 100)) for d in depths) + [len(sents)]
        pieces: list[str] = []
        needle_pieces: list[int] = []
        for i in range(1, len(positions)):
            pieces.append(" ".join(sents[positions[i - 1]:positions[i]]))
            if i - 1 < len(needles):
                needle_pieces.append(len(pieces))
                pieces.append(needles[i - 1])
        return _join_tracking(" ", pieces, needle_pieces)

    def _line_context(self, rng: random.Random, num_lines: int, needles: list[str],
                      real_keys: set[str]) -> tuple[str, list[int]]:
        k = self.knobs
        if k.type_haystack == "noise":
            lines = [NOISE_UNIT] * num_lines
        else:
            lines = []
            for _ in range(num_lines):
                key = self.draw_atom(rng, k.type_needle_k)
                while key in real_keys:
                    key = self.draw_atom(rng, k.type_needle_k)
                lines.append(NIAH_NEEDLE.format(type_needle_v=k.type_needle_v, key=key,
                                                value=self.draw_atom(rng, k.type_needle_v)))
        marks = [False] * len(lines)
        indexes = sorted(rng.sample(range(num_lines), len(needles)), reverse=True)
        for index, needle in zip(indexes, needles, strict=True):
            lines.insert(index, needle)
            marks.insert(index, True)
        return _join_tracking("\n", lines, [i for i, m in enumerate(marks) if m])


def _join_tracking(sep: str, pieces: list[str], tracked: list[int]) -> tuple[str, list[int]]:
    """``sep.join(pieces)`` and the character offsets of the pieces at indices ``tracked`` (ascending)."""
    offsets = []
    pos = 0
    want = iter(tracked)
    nxt = next(want, None)
    for i, piece in enumerate(pieces):
        if i == nxt:
            offsets.append(pos)
            nxt = next(want, None)
            if nxt is None:
                break
        pos += len(piece) + len(sep)
    return sep.join(pieces), offsets
