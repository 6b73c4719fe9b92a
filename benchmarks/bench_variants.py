"""Which output variant is faster where the default has not been measured: fp32 inputs and K = 256.

Our chunked forward computes the output either inside the sequential walk ("fused") or in a chunk-parallel kernel
after it ("split": the walk stores the per-chunk states). gdn2/ops/triton/chunk_infer.py picks fused for 16-bit inputs
with K <= 128, where bench_kernels.py timed both. This times both variants of the inference forward, the training
forward and forward + backward (bench_kernels.time_modes: triton.testing.do_bench, median, after warm-up) on the
other dtypes and head sizes, with the initial state in and the final state out, and says which one the default picks.

    PYTHONUNBUFFERED=1 python benchmarks/bench_variants.py --out results/bench [--cases bf16-K256,fp32-K128]
Writes <out>/variants-<card>.csv and prints it.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch

from benchmarks.bench_kernels import inputs, print_rows, time_modes
from benchmarks.csv_rows import write_csv
from gdn2.ops.triton import triton_chunk_gdn2
from gdn2.ops.triton.chunk_infer import forced, use_fused_output, use_fused_output_in_training

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# name -> (dtype, heads, K = V, B, T): the same model width (heads x K = 2048) as bench_kernels.py's H=16, K=128
CASES = {
    "bf16-K256": ("bf16", 8, 256, 8, 4096),
    "fp32-K128": ("fp32", 16, 128, 8, 4096),
    "fp16-K128": ("fp16", 16, 128, 8, 4096),
    "bf16-K256-B1": ("bf16", 8, 256, 1, 65536),
}


def time_variant(fused: bool, args, do, h0):
    """(infer_fwd, train_fwd, fwd_bwd) ms with the output forced into the walk (fused) or after it (split) in both
    inference and training; the other switches keep their defaults."""
    with forced(infer_fused=fused, train_fused=fused):
        return time_modes(lambda *a: triton_chunk_gdn2(*a, initial_state=h0, output_final_state=True)[0], args, do)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--cases", default="bf16-K256,fp32-K128,fp16-K128", help=f"comma-separated, from {list(CASES)}")
    args = ap.parse_args()
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name().replace(" ", "-")
    path = os.path.join(args.out, f"variants-{card}.csv")
    rows = []
    for i, name in enumerate(names):
        dname, heads, dim, B, T = CASES[name]
        dtype = DTYPES[dname]
        q, k, v, g, b, w, _ = inputs(B, T, seed=i, heads=heads, key_dim=dim, value_dim=dim, dtype=dtype)
        do = torch.randn_like(v)
        h0 = torch.randn(B, heads, dim, dim, device="cuda") * 0.1
        split = time_variant(False, (q, k, v, g, b, w), do, h0)
        fused = time_variant(True, (q, k, v, g, b, w), do, h0)
        default = dict(infer_fwd=use_fused_output(dtype, dim), train_fwd=use_fused_output_in_training(dtype, dim),
                       fwd_bwd=use_fused_output_in_training(dtype, dim))
        for mode in ("infer_fwd", "train_fwd", "fwd_bwd"):
            rows.append(dict(card=card, date=datetime.date.today().isoformat(), case=name, dtype=dname, H=heads,
                             K=dim, V=dim, B=B, T=T, mode=mode, split_ms=round(split[mode], 4),
                             fused_ms=round(fused[mode], 4), fused_over_split=round(fused[mode] / split[mode], 3),
                             default="fused" if default[mode] else "split"))
            print_rows(rows[-1:])
        write_csv(rows, path)                                   # after every case: a run cut short keeps the rest
        del q, k, v, g, b, w, do, h0
        torch.cuda.empty_cache()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
