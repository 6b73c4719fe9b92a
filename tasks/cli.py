"""`generate`: write a task's samples as JSON lines (RULER's record format plus our fields), for inspection or for
another harness.

    python run_eval.py generate --task niah_single_1 --length 2048 --samples 20 --tokenizer PATH --out F.jsonl

--tokenizer takes a tokenizer.json, a SentencePiece .model, a folder AutoTokenizer loads, or one of the offline
tokenizers ``offline:mistral``, ``offline:gpt-neox``, ``offline:bpe``. MQAR (``--task mqar``) needs no tokenizer:
give --vocab-size (or a tokenizer, whose vocabulary size is used).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def parse_length(value: int | str | None) -> int | None:
    """4096 | "4096" | "4k" | "4K" | "1.5k" -> tokens (k = 1024); None -> None (no length axis). The one parser of
    context lengths (this command, run --lengths, suite files); ValueError unless a positive whole number of tokens."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        tokens = float(value)
    else:
        text = str(value).strip().lower()
        try:
            tokens = float(text[:-1]) * 1024 if text.endswith("k") else float(int(text))
        except ValueError:
            raise ValueError(f"context length {value!r} is neither an integer nor a number with a k suffix "
                             "(e.g. 4096, 4k)") from None
    if tokens <= 0 or not tokens.is_integer():
        raise ValueError(f"context length {value!r} is {tokens:g} tokens; it must be a positive whole number")
    return int(tokens)


def _length_argument(text: str) -> int:
    try:
        return parse_length(text)
    except ValueError as err:   # argparse shows an ArgumentTypeError's message as it is
        raise argparse.ArgumentTypeError(str(err)) from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--task", required=True, help="task name or alias (e.g. niah_single_1, s_niah_1, vt, mqar)")
    parser.add_argument("--length", required=True, type=_length_argument,
                        help="context length in tokens: prompt + answer prefix + generation budget (e.g. 4096, 4k)")
    parser.add_argument("--samples", type=int, default=500, help="number of samples (RULER default 500)")
    parser.add_argument("--tokenizer", default=None,
                        help="the evaluated model's tokenizer: tokenizer.json, .model, a folder, or offline:NAME")
    parser.add_argument("--seed", type=int, default=42, help="random seed (RULER default 42)")
    parser.add_argument("--haystack-file", default=None,
                        help="text for the essay haystack (.txt, .txt.gz, or RULER's PaulGrahamEssays.json); "
                             "default: the built-in public-domain substitute")
    parser.add_argument("--vocab-size", type=int, default=None, help="MQAR only: vocabulary size")
    parser.add_argument("--num-kv-pairs", type=int, default=None, help="MQAR only: key-value pairs per sequence")
    parser.add_argument("--out", default="-", help="output .jsonl path ('-' = stdout)")
    return parser


def _load_tokenizer(spec: str):
    if spec.startswith("offline:"):
        from .offline_tokenizers import OFFLINE_TOKENIZERS

        name = spec.split(":", 1)[1]
        if name not in OFFLINE_TOKENIZERS:
            raise ValueError(f"unknown offline tokenizer {name!r}; choose from {sorted(OFFLINE_TOKENIZERS)}")
        return OFFLINE_TOKENIZERS[name]()
    from .tokenization import load_tokenizer

    return load_tokenizer(spec)


def run_generate(args: argparse.Namespace) -> int:
    from . import UnknownTaskError, get_task

    try:
        task = get_task(args.task)
    except UnknownTaskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        if getattr(task, "kind", "generate") == "token":
            vocab_size = args.vocab_size or (len(tokenizer) if tokenizer is not None else None)
            if not vocab_size:
                print("error: MQAR needs --vocab-size (or --tokenizer)", file=sys.stderr)
                return 2
            samples = task.build_samples(vocab_size=vocab_size, length=args.length, num_samples=args.samples,
                                         seed=args.seed, num_kv_pairs=args.num_kv_pairs)
        else:
            if tokenizer is None:
                print(f"error: task {task.name} needs --tokenizer (lengths are counted with the model's tokenizer)",
                      file=sys.stderr)
                return 2
            samples = task.build_samples(tokenizer, args.length, args.samples, seed=args.seed,
                                         haystack_file=args.haystack_file, progress=True)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")
    try:
        for sample in samples:
            out.write(json.dumps(sample.to_record(), ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    lengths = [s.length for s in samples]
    span = f", lengths {min(lengths)}..{max(lengths)}" if lengths else ""
    print(f"{task.name}: {len(samples)} samples at {args.length} tokens in {elapsed:.1f}s{span} -> {args.out}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_generate_arguments(argparse.ArgumentParser(prog="python -m tasks.cli", description=__doc__,
                                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_generate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
