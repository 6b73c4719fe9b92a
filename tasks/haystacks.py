"""Haystack text sources for the RULER tasks: noise, needle (distractors) and essay.

- noise: one fixed unit of filler sentences, repeated and joined with newlines (RULER's "noise").
- needle: distractor needles built by the task itself (see ruler/niah.py); only a name here.
- essay: natural English text split into words; RULER uses Paul Graham's essays (a download). Offline the default
  is John Milton's *Areopagitica* (1644, public domain; shipped as tasks/data/areopagitica.txt.gz, provenance in
  tasks/data/README.md). Any text file can replace it (``haystack_file=``, CLI ``--haystack-file``), e.g. RULER's own
  ``PaulGrahamEssays.json`` (a JSON object with a "text" field), a .txt or a .txt.gz. Results on the default text
  are not comparable to published RULER numbers; every sample records the haystack name and sha256.

Sentence splitting (RULER uses nltk's punkt, which needs a download) is a small rule: a sentence ends at a word
ending in . ! or ? (optionally followed by closing quotes or brackets) when the next word starts with a capital
letter, a digit, or an opening quote/bracket, unless the word is a common abbreviation.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

NOISE_UNIT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEFAULT_ESSAY_NAME = "milton-areopagitica"
DEFAULT_ESSAY_RESOURCE = "areopagitica.txt.gz"

_SENT_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*$")
_SENT_START = re.compile(r"[\"'\u2018\u201c(\[]*[A-Z0-9]")
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. st. mt. jr. sr. vs. etc. e.g. i.e. viz. cf. no. vol. ch. p. pp. ed. eds. fig.".split()
)


@dataclass(frozen=True)
class HaystackIdentity:
    """What a sample records about its haystack text."""

    name: str
    sha256: str
    source: str  # "builtin" or the user's path


@dataclass
class EssayText:
    """A long text as RULER sees it: whitespace-normalised words, cut into sentences on demand."""

    identity: HaystackIdentity
    words: list[str]
    _sentence_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_words(self) -> int:
        return len(self.words)

    def sentences(self, num_words: int) -> tuple[str, ...]:
        """Sentences of the first ``num_words`` words (the word list repeats when it is too short, as in RULER)."""
        if num_words < 1:
            raise ValueError(f"an essay haystack needs at least 1 word, got {num_words}")
        cached = self._sentence_cache.get(num_words)
        if cached is not None:
            return cached
        words = self.words
        if num_words <= len(words):
            words = words[:num_words]
        else:
            repeats = -(-num_words // len(words))
            words = (words * repeats)[:num_words]
        result = tuple(split_sentences(words))
        if len(self._sentence_cache) > 16:
            self._sentence_cache.clear()
        self._sentence_cache[num_words] = result
        return result


def split_sentences(words: list[str]) -> list[str]:
    """Group ``words`` into sentences (see the module docstring for the rule)."""
    sentences: list[str] = []
    start = 0
    last = len(words) - 1
    for i, word in enumerate(words):
        if i == last:
            break
        if _SENT_END.search(word) and word.lower() not in _ABBREVIATIONS and _SENT_START.match(words[i + 1]):
            sentences.append(" ".join(words[start : i + 1]))
            start = i + 1
    if start <= last:
        sentences.append(" ".join(words[start:]))
    return sentences


def read_text_file(path: str | Path) -> str:
    """Read .txt, .txt.gz, or a JSON object with a "text" field (RULER's PaulGrahamEssays.json)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"haystack file {str(p)!r} not found; pass a .txt, .txt.gz or a JSON file with a "
                                "'text' field (e.g. RULER's PaulGrahamEssays.json)")
    raw = p.read_bytes()
    if p.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"haystack file {str(p)!r} is not a readable .gz file ({err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"haystack file {str(p)!r} is not UTF-8 text (byte {err.start}: {err.reason}); pass a "
                         ".txt, .txt.gz or JSON file of UTF-8 text") from None
    if p.suffix == ".json" or p.name.endswith(".json.gz"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"haystack file {str(p)!r} is not valid JSON ({err})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{str(p)!r}: a JSON haystack must be an object with a string field 'text'")
        text = obj["text"]
    return text


def _essay_from_text(text: str, name: str, source: str) -> EssayText:
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    words = [w for w in words if w]
    if len(words) < 100:
        raise ValueError(f"haystack text {name!r} has only {len(words)} words; an essay haystack needs a long text")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return EssayText(HaystackIdentity(name=name, sha256=digest, source=source), words)


@lru_cache(maxsize=8)
def load_essay(haystack_file: str | None = None) -> EssayText:
    """The essay haystack: the built-in public-domain text, or ``haystack_file`` (cached per path)."""
    if haystack_file is None:
        raw = resources.files("tasks").joinpath("data", DEFAULT_ESSAY_RESOURCE).read_bytes()
        return _essay_from_text(gzip.decompress(raw).decode("utf-8"), DEFAULT_ESSAY_NAME, "builtin")
    p = Path(haystack_file)
    name = p.name
    for suffix in (".gz", ".json", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _essay_from_text(read_text_file(p), name, str(p.resolve()))


def noise_identity() -> HaystackIdentity:
    return HaystackIdentity("noise", hashlib.sha256(NOISE_UNIT.encode()).hexdigest(), "builtin")


def needle_identity() -> HaystackIdentity:
    return HaystackIdentity("needle", "", "builtin")
