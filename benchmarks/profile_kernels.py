"""Per-kernel GPU time of one chunked GDN-2 call: ours vs fla chunk_gdn2 vs fla chunk_kda (torch.profiler).

Where bench_kernels.py says how long a call takes, this says which launch the time goes to. bf16 q, k, v, b, w,
fp32 g, H = 16, K = V = 128, initial state in, final state out (as bench_kernels.py). Each implementation is
warmed up (autotuning, compiles) outside the profiled region, then `--iters` calls of the inference forward, the
training forward and forward + backward are profiled; the table gives each kernel's GPU time per call. Ours runs the
launches gdn2/ops/triton/dispatch.py plans for each call.

    PYTHONUNBUFFERED=1 python benchmarks/profile_kernels.py --B 8 --T 4096 --out results/bench
Writes <out>/profile-<card>-B<B>_T<T>.csv (impl, mode, kernel, calls per iteration, ms per iteration) and prints it.
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_kernels import H, K, V, inputs, load_fla
from benchmarks.csv_rows import write_csv
from gdn2.ops.triton import triton_chunk_gdn2
from gdn2.ops.triton.chunk import CHUNK_KERNELS


def kernel_times(fn, iters: int) -> dict[str, tuple[int, float]]:
    """{kernel name: (launches per call, GPU ms per call)} over `iters` profiled calls of fn (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            acc[ev.name][0] += 1
            acc[ev.name][1] += ev.device_time_total / 1e3
    return {name: (n // iters, ms / iters) for name, (n, ms) in acc.items()}


def modes(call, args, do):
    """The profiled modes of call(*args) -> o: inference forward (no grad), training forward (inputs require grad,
    no backward) and forward + backward."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in args]

    def infer():
        with torch.no_grad():
            call(*args)

    def train_fwd():
        call(*leaves)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        call(*leaves).backward(do)
    return {"infer_fwd": infer, "train_fwd": train_fwd, "fwd_bwd": fwd_bwd}


def chosen_configs() -> dict[str, str]:
    """The autotuner's pick per kernel (after the warm-up), or 'fixed' without autotuning."""
    out = {}
    for name, kern in CHUNK_KERNELS.items():
        best = getattr(kern, "best_config", None)
        out[name] = str(best) if best is not None else "fixed (first fitting config)"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--skip-fla", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name().replace(" ", "-")
    q, k, v, g, b, w, beta = inputs(args.B, args.T, seed=0)
    do = torch.randn_like(v)
    h0 = torch.randn(args.B, H, K, V, device="cuda") * 0.1
    kw = dict(initial_state=h0, output_final_state=True)
    impls = {"ours": (lambda *a: triton_chunk_gdn2(*a, **kw)[0], (q, k, v, g, b, w))}
    fla_gdn2, fla_kda, _ = (None, None, None) if args.skip_fla else load_fla()
    if fla_gdn2 is not None:
        impls["fla_gdn2"] = (lambda *a: fla_gdn2(*a, **kw)[0], (q, k, v, g, b, w))
        impls["fla_kda"] = (lambda *a: fla_kda(*a, **kw)[0], (q, k, v, g, beta))
    rows = []
    for impl, (call, call_args) in impls.items():
        for mode, fn in modes(call, call_args, do).items():
            times = kernel_times(fn, args.iters)
            total = sum(ms for _, ms in times.values())
            print(f"\n{impl} {mode}: {total:.3f} ms GPU time per call (B={args.B}, T={args.T})")
            for name, (n, ms) in sorted(times.items(), key=lambda kv: -kv[1][1]):
                print(f"  {ms:8.3f} ms  {n:3d}x  {name[:90]}")
                rows.append(dict(card=card, impl=impl, mode=mode, kernel=name, launches=n, ms=round(ms, 4)))
            if impl == "ours" and mode == "fwd_bwd":
                for kname, cfg in chosen_configs().items():
                    print(f"  config {kname}: {cfg}")
        write_csv(rows, os.path.join(args.out, f"profile-{card}-B{args.B}_T{args.T}.csv"))


if __name__ == "__main__":
    main()
