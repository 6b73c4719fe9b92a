"""Perplexity beyond lm-eval: corpus perplexity of any text, and position-bucketed perplexity (length extrapolation).

    corpus_perplexity(model, text)                              -> PerplexityResult (token, word, byte level)
    bucketed_perplexity(model, text_or_ids, bucket=512, max_length=8192)
                                                                -> PerplexityResult with per-bucket nll / tokens

Both score with EvalModel.token_logprobs: the sequence runs in segments (model.segment tokens, 2048 by default) with
the recurrent state / KV cache carried, and only one segment's logits (and their log-softmax) exist at a time, so
memory is O(segment x vocab) whatever the length; the per-token log-probabilities kept are float64 [T] on the CPU.

Conventions
- Every sequence is conditioned on the model's prefix token (BOS, else EOS), so all its tokens are scored, as lm-eval
  does for the first window of a document. A corpus_perplexity over a text equals a bucketed_perplexity of the same
  tokens with one bucket (tested).
- Word perplexity = exp(total nll / words), words = the whitespace-separated words of the text scored (lm-eval's
  wikitext count, len(re.split(r"\\s+", doc)), is the same except that it also counts an empty string at a leading
  or trailing whitespace). A text cut into consecutive token sequences counts each word once, in the sequence where
  it starts (words_in_span), so the sequences' words add up to the text's. Bits per byte = total nll / ln 2 / UTF-8
  bytes of the text scored.
- bucketed_perplexity cuts the token stream into consecutive sequences of max_length tokens (a last, shorter piece is
  dropped unless it is the only one) and sums the nll of position p (0-based in its sequence) into bucket
  p // bucket; bucket perplexity = exp(bucket nll / bucket tokens). Past the training length the buckets show
  whether the model extrapolates.
"""
from __future__ import annotations

import gzip
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

DATA = Path(__file__).resolve().parent / "data"

# Named corpora (ppl:<name>); any other name is read as a path to a .txt or .txt.gz file.
CORPORA: dict[str, tuple[str, ...]] = {
    "shakespeare": ("shakespeare_hamlet.txt.gz", "shakespeare_macbeth.txt.gz"),   # held out from bpe-4k
    "hamlet": ("shakespeare_hamlet.txt.gz",),
    "macbeth": ("shakespeare_macbeth.txt.gz",),
    "areopagitica": ("areopagitica.txt.gz",),   # Milton; NOT held out from bpe-4k (it was in its training text)
}


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return fh.read()


def corpus_text(corpus: str) -> str:
    """Text of a named corpus (CORPORA; documents joined by a blank line) or of a text file path."""
    if corpus in CORPORA:
        return "\n\n".join(read_text(DATA / f) for f in CORPORA[corpus])
    path = Path(corpus)
    if path.is_file():
        return read_text(path)
    raise FileNotFoundError(f"unknown corpus {corpus!r}: use one of {', '.join(sorted(CORPORA))} or a path to a "
                            ".txt / .txt.gz file")


def count_words(text: str) -> int:
    """Whitespace-separated words of text."""
    return len(text.split())


def words_in_span(model, ids: Sequence[int], start: int, end: int) -> int:
    """Words that start within tokens [start, end) of ids: the words of the decoded prefix ids[:end] minus those of
    ids[:start] (a word cut at `start` belongs to the span before). Consecutive spans add up to the text's count."""
    return count_words(model.decode(list(ids[:end]))) - (count_words(model.decode(list(ids[:start]))) if start else 0)


@dataclass
class PerplexityResult:
    nll_sum: float                 # -sum log p (nats) over the scored tokens
    tokens: int
    words: int
    bytes: int
    bucket: int | None = None
    bucket_nll: list[float] = field(default_factory=list)
    bucket_tokens: list[int] = field(default_factory=list)
    sequences: int = 1

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.words) if self.words else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else float("nan")

    def bucket_perplexity(self) -> list[float]:
        pairs = zip(self.bucket_nll, self.bucket_tokens, strict=True)
        return [math.exp(n / t) if t else float("nan") for n, t in pairs]

    def as_dict(self) -> dict:
        return {"nll_sum": self.nll_sum, "tokens": self.tokens, "words": self.words, "bytes": self.bytes,
                "token_perplexity": self.token_perplexity, "word_perplexity": self.word_perplexity,
                "bits_per_byte": self.bits_per_byte, "bucket": self.bucket, "bucket_nll": self.bucket_nll,
                "bucket_tokens": self.bucket_tokens, "bucket_perplexity": self.bucket_perplexity(),
                "sequences": self.sequences}


def sequence_logprobs(model, ids: Sequence[int], segment: int | None = None) -> torch.Tensor:
    """log p of every token of ids, conditioned on the prefix token: float64 [len(ids)] (memory: one segment)."""
    logprobs, _ = model.token_logprobs([model.prefix_token_id] + list(ids), score_from=1, segment=segment)
    return logprobs


def corpus_perplexity(model, text: str, segment: int | None = None) -> PerplexityResult:
    """Perplexity of a whole text in one pass (state carried across segments of `segment` tokens)."""
    ids = model.encode(text)
    if not ids:
        raise ValueError("corpus_perplexity of an empty text")
    logprobs = sequence_logprobs(model, ids, segment)
    nll = -float(logprobs.sum())
    return PerplexityResult(nll_sum=nll, tokens=len(ids), words=count_words(text), bytes=len(text.encode("utf-8")),
                            bucket=len(ids), bucket_nll=[nll], bucket_tokens=[len(ids)])


def bucketed_perplexity(model, text_or_ids: str | Sequence[int], bucket: int = 512, max_length: int | None = None,
                        num_sequences: int | None = None, segment: int | None = None) -> PerplexityResult:
    """Per-position-bucket perplexity over consecutive sequences of max_length tokens (see the module docstring).

    bucket: bucket width in tokens (512 or 2048 usually); max_length: sequence length (None: the whole input as one
    sequence); num_sequences: at most this many sequences (None: all that fit).
    """
    if bucket < 1:
        raise ValueError(f"bucket must be a positive number of tokens; got {bucket}")
    if num_sequences is not None and num_sequences < 1:
        raise ValueError(f"num_sequences must be at least 1 (or None: all that fit); got {num_sequences}")
    ids = model.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    if not ids:
        raise ValueError("bucketed_perplexity of an empty input")
    length = max_length or len(ids)
    starts = list(range(0, max(len(ids) - length, 0) + 1, length))
    if num_sequences is not None:
        starts = starts[:num_sequences]
    n_buckets = math.ceil(min(length, len(ids)) / bucket)
    bucket_nll, bucket_tokens = [0.0] * n_buckets, [0] * n_buckets
    for start in starts:
        seq = ids[start:start + length]
        logprobs = sequence_logprobs(model, seq, segment)
        for b in range(n_buckets):
            part = logprobs[b * bucket:(b + 1) * bucket]
            bucket_nll[b] += -float(part.sum())
            bucket_tokens[b] += int(part.numel())
    scored = model.decode(ids[:starts[-1] + length])           # the sequences tile the input from its start
    return PerplexityResult(nll_sum=sum(bucket_nll), tokens=sum(bucket_tokens), words=count_words(scored),
                            bytes=len(scored.encode("utf-8")),
                            bucket=bucket, bucket_nll=bucket_nll, bucket_tokens=bucket_tokens, sequences=len(starts))
