"""Random atoms of the RULER tasks: 7-digit numbers, UUIDs, "adjective-noun" keys, and word lists.

Word lists are the files shipped in the wonderwords 3.0.1 package (adjectivelist.txt, nounlist.txt,
verblist.txt), read with importlib.resources (not wonderwords' private API).
"""
from __future__ import annotations

import random
import uuid
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def wonderwords_list(filename: str) -> tuple[str, ...]:
    """One wonderwords list file, one word per line, trailing whitespace stripped, empty lines dropped."""
    try:
        text = resources.files("wonderwords").joinpath("assets", filename).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(
            f"the RULER word lists come from the wonderwords package (file assets/{filename}); "
            "install it with `pip install wonderwords==3.0.1`"
        ) from exc
    return tuple(w for w in (line.rstrip() for line in text.splitlines()) if w)


@lru_cache(maxsize=None)
def key_word_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns): RULER's keys are f"{adjective}-{noun}" over all pairs."""
    adjectives = tuple(sorted(set(wonderwords_list("adjectivelist.txt"))))
    return adjectives, tuple(sorted(set(wonderwords_list("nounlist.txt"))))


@lru_cache(maxsize=None)
def cwe_words() -> tuple[str, ...]:
    """RULER's common-words vocabulary: sorted set of nouns + adjectives + verbs."""
    words = wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt") + wonderwords_list("verblist.txt")
    return tuple(sorted(set(words)))


def random_number(rng: random.Random, num_digits: int = 7) -> str:
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def random_word_key(rng: random.Random) -> str:
    """A uniformly drawn "adjective-noun" pair (RULER draws from the materialised sorted set of all pairs; the
    handful of pairs whose strings coincide aside, the distribution is the same, without a 6M-entry list)."""
    adjectives, nouns = key_word_parts()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_atom(rng: random.Random, kind: str) -> str:
    """A random key or value of ``kind``: "numbers", "words" or "uuids"."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_word_key(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle type {kind!r}; expected 'numbers', 'words' or 'uuids'")
