"""CPU benchmark: time to generate RULER samples with a real 32K tokenizer (Mistral-7B SentencePiece, offline).

    .venv/bin/python benchmarks/bench_ruler_generate.py [--samples 500] [--length 8192]

Writes results/bench/ruler-generate-cpu.csv (one row per task) and prints the rows. The time covers everything
build_samples does: the binary search for the haystack size, drafting every sample, and counting each sample's
tokens (one batched encode per 32 samples) plus needle depths in tokens. Tokenizer loading is timed apart.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--tasks", default="niah_single_2,niah_single_1,niah_multikey_3,vt,cwe")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "ruler-generate-cpu.csv"))
    args = parser.parse_args()

    from benchmarks.csv_rows import write_csv
    from tasks import get_task
    from tasks.offline_tokenizers import mistral

    t0 = time.perf_counter()
    tokenizer = mistral()
    load_s = time.perf_counter() - t0
    rows = []
    for name in args.tasks.split(","):
        task = get_task(name)
        t0 = time.perf_counter()
        samples = task.build_samples(tokenizer, args.length, args.samples, seed=42)
        elapsed = time.perf_counter() - t0
        lengths = [s.length for s in samples]
        total_tokens = sum(s.input_tokens for s in samples)
        rows.append({
            "task": task.name, "length": args.length, "samples": len(samples), "seconds": round(elapsed, 2),
            "samples_per_s": round(len(samples) / elapsed, 1), "prompt_tokens_per_s": int(total_tokens / elapsed),
            "min_length": min(lengths), "max_length": max(lengths),
            "tokenizer": "mistral-7b sentencepiece 32000 (LlamaTokenizer, Rust backend)",
            "tokenizer_load_s": round(load_s, 2),
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default"),
            "cpu": f"{platform.machine()} x{os.cpu_count()}", "date": datetime.date.today().isoformat(),
        })
        print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
