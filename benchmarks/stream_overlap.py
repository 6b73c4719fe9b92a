"""Probe of what bounds the inference forward: does it get faster when independent parts of the batch run side by side?

Our inference forward is two launches, the merged wy kernel then the walk, and each runs well under the copy bandwidth
(docs/kernels.md, "What bounds the inference forward"). If the limit is latency inside each launch (serial phases,
few programs per SM) rather than memory traffic, splitting the batch into parts on separate CUDA streams lets one
part's walk overlap another part's wy kernel, and the whole gets faster. If the limit is memory traffic, it does not.

Rows (bf16, H = 16, K = V = 128, B = 8, T = 4096, initial and final state, no grad), each for the walk applying A
and for the merged kernel alone (forced, since a part has fewer walks than APPLY_A_MIN_WALKS):
  whole        one call over the batch (what the library does)
  serial/N     N calls over B/N sequences each, one after another on one stream
  streams/N    the same N calls, each on its own stream
Timing: triton.testing.do_bench, median, after a first call that autotunes.

    PYTHONPATH=$PWD python benchmarks/stream_overlap.py --out results/bench
"""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks.bench_kernels import H, K, V, bench, inputs
from benchmarks.csv_rows import write_csv
from gdn2.ops.triton import triton_chunk_gdn2
from gdn2.ops.triton.chunk_infer import forced


def parts_call(args, h0, n_parts, streams):
    """A function running triton_chunk_gdn2 over n_parts equal slices of the batch, slice i on streams[i] (or all on
    the current stream when streams is None). args: q, k, v, g, b, w [B, T, .]; h0 [B, H, K, V]."""
    B = h0.shape[0]
    step = B // n_parts
    slices = [(tuple(x[i:i + step] for x in args), h0[i:i + step]) for i in range(0, B, step)]

    def run_one(part_args, part_h0):
        return triton_chunk_gdn2(*part_args, initial_state=part_h0, output_final_state=True)[0]

    def call():
        if streams is None:
            return [run_one(*s) for s in slices]
        main = torch.cuda.current_stream()
        outs = []
        for stream, s in zip(streams, slices):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(run_one(*s))
        for stream, out in zip(streams, outs):
            main.wait_stream(stream)
            out.record_stream(main)
        return outs
    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args()
    B, T = args.batch, args.seq_len
    q, k, v, g, b, w, _ = inputs(B, T, seed=0)
    h0 = torch.randn(B, H, K, V, device="cuda") * 0.1
    card = torch.cuda.get_device_name().replace(" ", "-")
    rows = []
    for variant, switches in (("apply_a", dict(merged=True, infer_fused=True, walk_applies_a=True)),
                              ("merged", dict(merged=True, infer_fused=True, walk_applies_a=False))):
        with forced(**switches), torch.no_grad():
            whole = parts_call((q, k, v, g, b, w), h0, 1, None)
            ref = whole()[0]
            cases = [("whole", whole)]
            for n in (2, 4):
                if B % n == 0:
                    streams = [torch.cuda.Stream() for _ in range(n)]
                    cases += [(f"serial/{n}", parts_call((q, k, v, g, b, w), h0, n, None)),
                              (f"streams/{n}", parts_call((q, k, v, g, b, w), h0, n, streams))]
            for name, call in cases:
                got = torch.cat(call())
                torch.cuda.synchronize()
                same = torch.equal(got, ref)                          # the same kernels on the same rows
                ms = bench(call)
                rows.append(dict(card=card, B=B, T=T, variant=variant, split=name, ms=round(ms, 4),
                                 same_output=same))
                print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_csv(rows, os.path.join(args.out, f"stream-overlap-{card}-B{B}_T{T}.csv"))


if __name__ == "__main__":
    main()
