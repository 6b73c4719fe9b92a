"""GPU time of every launch config of chosen chunk kernels, on the inputs a real call gives them.

The autotuner keeps only its winner; this prints the whole spread, which says whether a kernel is bound by its
launch shape (warps, tile, register cap) or by its algorithm. One forward + backward of triton_chunk_gdn2 (bf16,
H = 16, K = V = 128, as bench_kernels.py) runs with each named kernel's launches recorded; then each recorded launch
is repeated under every config of that kernel (triton.testing.do_bench, median). Kernels that update an argument in
place (solve, exact_diag) are timed on the buffer their previous repeat left: the time is right, the values are not.

    PYTHONUNBUFFERED=1 python benchmarks/time_configs.py --kernels bwd_dqkg,fwd_intra --B 8 --T 4096 --out results/bench
Writes <out>/configs-<card>-B<B>_T<T>.csv (kernel, config, ms) and prints it. --inference records the launches of
the no-grad forward instead (its plan, dispatch.py: at B=8 the wy kernel forming A and the state kernel applying A
and computing the output): configs-...-inference.csv.
"""
from __future__ import annotations

import argparse
import importlib
import os

import torch
import triton

from benchmarks.bench_kernels import inputs
from benchmarks.csv_rows import write_csv
from gdn2.ops.triton import triton_chunk_gdn2
from gdn2.ops.triton.chunk import CHUNK_KERNELS
from gdn2.ops.triton.utils import config_name, pin_config


class Recorder:
    """Stands in for a kernel's launcher in its module: launches it and keeps (grid, args, kwargs) of the call."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", required=True, help="comma-separated names from gdn2.ops.triton.chunk.CHUNK_KERNELS")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--inference", action="store_true", help="record the inference forward's launches (no grad)")
    ap.add_argument("--config", default=None, help="time only the config of this name (e.g. BK=32,w4,s2)")
    args = ap.parse_args()
    names = args.kernels.split(",")
    unknown = [n for n in names if n not in CHUNK_KERNELS]
    if unknown:
        raise SystemExit(f"unknown kernel(s) {unknown}; choose from {sorted(CHUNK_KERNELS)}")
    modules = {n: importlib.import_module(CHUNK_KERNELS[n].fn.__module__) for n in names}
    recorders = {}
    for n in names:
        attr = CHUNK_KERNELS[n].fn.__name__
        recorders[n] = Recorder(getattr(modules[n], attr))
        setattr(modules[n], attr, recorders[n])
    q, k, v, g, b, w, _ = (x.requires_grad_() for x in inputs(args.B, args.T, seed=0))
    h0 = torch.randn(args.B, q.shape[2], q.shape[3], v.shape[3], device="cuda", requires_grad=True)
    if args.inference:
        with torch.no_grad():
            triton_chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
    else:
        o, ht = triton_chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
        torch.autograd.backward((o, ht), (torch.randn_like(o), torch.randn_like(ht)))
    torch.cuda.synchronize()
    card = torch.cuda.get_device_name().replace(" ", "-")
    rows = []
    for n in names:
        kernel = recorders[n].kernel
        setattr(modules[n], kernel.fn.__name__, kernel)
        if not recorders[n].calls:
            print(f"{n}: not launched by this call (not in its ForwardPlan, dispatch.py); skipped")
            continue
        grid, a, kw = recorders[n].calls[0]
        named = {**dict(zip(kernel.fn.arg_names, a, strict=False)), **kw}
        fits_args = [named[x] for x in kernel.fits_args]
        for config in list(getattr(kernel, "_all_configs", kernel.configs)):
            if not kernel.fits(config, named[kernel.dtype_arg].dtype, named.get("K"), *fits_args):
                continue
            if args.config is not None and config_name(config) != args.config:
                continue
            pin_config(kernel, config)
            ms = triton.testing.do_bench(lambda: kernel[grid](*a, **kw), warmup=25, rep=100)
            rows.append(dict(card=card, kernel=n, config=config_name(config), ms=f"{ms:.4f}"))
            print(f"{n:16s} {config_name(config):28s} {ms:8.4f} ms", flush=True)
        pin_config(kernel, None)
    if not rows:
        raise SystemExit("no kernel was timed" + (f" (no config named {args.config} fits)" if args.config else ""))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"configs-{card}-B{args.B}_T{args.T}{'-inference' if args.inference else ''}.csv")
    write_csv(rows, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
