"""Counting tokens with the evaluated model's own tokenizer, fast, without special tokens.

``TokenCounter(tokenizer)`` accepts
- a Hugging Face tokenizer with a Rust backend (``backend_tokenizer``; any PreTrainedTokenizerFast / v5 tokenizer),
- a ``tokenizers.Tokenizer``,
- a ``sentencepiece.SentencePieceProcessor``,
- a plain callable ``text -> list[token]`` (slow path: needle depths are found by encoding prefixes),
- a path (see ``load_tokenizer``).

It encodes whole batches in one call, and maps a character offset to the index of the token that contains it
(needle depth in tokens) from the same encoding, so a sample costs one encode.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass
class Encoded:
    """Token count of one text and a way to map character offsets to token indices."""

    num_tokens: int
    _char_to_token: Callable[[int], int] = field(repr=False)

    def token_index(self, char_pos: int) -> int:
        """Index of the token that contains character ``char_pos`` (0-based)."""
        return self._char_to_token(char_pos)


class TokenCounter:
    """Wraps a tokenizer; ``count``/``encode`` never add special tokens (RULER counts the text only)."""

    def __init__(self, tokenizer: Any):
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.name = describe_tokenizer(tokenizer)
        self._backend = None
        self._spm = None
        self._callable = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        rust_tokenizer = type(tokenizer).__module__.startswith("tokenizers") and hasattr(tokenizer, "encode_batch")
        if backend is None and rust_tokenizer:
            backend = tokenizer
        if backend is not None:
            self._backend = backend
        elif hasattr(tokenizer, "EncodeAsIds") or type(tokenizer).__name__ == "SentencePieceProcessor":
            self._spm = tokenizer
        elif callable(tokenizer):
            self._callable = tokenizer
        else:
            raise TypeError(
                f"cannot count tokens with {type(tokenizer).__name__}: pass a Hugging Face fast tokenizer, a "
                "tokenizers.Tokenizer, a sentencepiece.SentencePieceProcessor, a callable text -> tokens, or a path"
            )

    # -- counting --------------------------------------------------------------------------------------------------
    def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts of ``texts`` (one batched call where the backend allows)."""
        return [e.num_tokens for e in self.encode(texts, need_offsets=False)]

    def encode(self, texts: Sequence[str], need_offsets: bool = True) -> list[Encoded]:
        texts = list(texts)
        if not texts:
            return []
        if self._backend is not None:
            encs = self._backend.encode_batch(texts, add_special_tokens=False)
            return [Encoded(len(e.ids), _backend_char_to_token(e)) for e in encs]
        if self._spm is not None:
            # sentencepiece gives offsets only through protobuf (not a dependency): a needle's depth is then the
            # token count of the text before it (RULER's own definition of token_position_answer).
            spm_tok = self._spm
            return [Encoded(len(ids), (lambda t: lambda pos: len(spm_tok.encode(t[:pos])))(text))
                    for text, ids in zip(texts, spm_tok.encode(texts), strict=True)]
        out = []
        for text in texts:
            n = len(self._callable(text))
            out.append(Encoded(n, (lambda t: lambda pos: len(self._callable(t[:pos])))(text)))
        return out


def _backend_char_to_token(enc) -> Callable[[int], int]:
    def char_to_token(pos: int) -> int:
        tok = enc.char_to_token(pos)
        if tok is not None:
            return tok
        # A character that maps to no token (e.g. a space merged away): use the next token that starts after it.
        offsets = enc.offsets
        starts = [s for s, _ in offsets]
        return min(bisect.bisect_left(starts, pos), len(starts) - 1)

    return char_to_token


def describe_tokenizer(tokenizer: Any) -> str:
    """A short human-readable identity for records (name_or_path where the object has one)."""
    for attr in ("name_or_path", "_name_or_path", "_ruler_name"):
        value = getattr(tokenizer, attr, None)
        if value:
            return str(value)
    return type(tokenizer).__name__


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load a tokenizer from a path, offline.

    - ``tokenizer.json`` (any file ending in .json): a Rust ``tokenizers.Tokenizer``.
    - a SentencePiece ``.model`` file (or a name ending in ``.model.v1`` etc.): ``SentencePieceProcessor``.
    - a folder: transformers' AutoTokenizer; if that fails and the folder holds ``tokenizer.model``, SentencePiece.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {str(p)!r} does not exist; pass a tokenizer.json, a SentencePiece "
                                ".model file or a folder that AutoTokenizer can load")
    if p.is_file() and p.suffix == ".json":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(p))
        return _named(tok, str(p))
    if p.is_file() and (".model" in p.name):
        import sentencepiece as spm

        return _named(spm.SentencePieceProcessor(model_file=str(p)), str(p))
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            try:
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(str(p))
            except Exception:  # a bare tokenizer.json folder without a config
                return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(p))
        except Exception as exc:
            if (p / "tokenizer.model").exists():
                import sentencepiece as spm

                return _named(spm.SentencePieceProcessor(model_file=str(p / "tokenizer.model")), str(p))
            raise ValueError(f"could not load a tokenizer from folder {str(p)!r}: {exc}") from exc
    raise ValueError(f"do not know how to load a tokenizer from {str(p)!r}")


def _named(tok: Any, name: str) -> Any:
    try:
        tok._ruler_name = name
    except (AttributeError, TypeError):
        pass
    return tok
