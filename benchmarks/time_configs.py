"""GPU time of every launch config of chosen chunk kernels, on the inputs a real call gives them.

The autotuner keeps only its winner; this prints the whole spread, which says whether a kernel is bound by its
launch shape (warps, tile, register cap) or by its algorithm. One forward + backward of triton_chunk_gdn2 (bf16,
--heads 16 of --head-dim 128 by default, as bench_kernels.py) runs with each named kernel's launches recorded; then
each recorded launch is repeated under every config of that kernel (triton.testing.do_bench, median). Kernels that
update an argument in place (solve, exact_diag) are timed on the buffer their previous repeat left: the time is
right, the values are not.

    PYTHONUNBUFFERED=1 python benchmarks/time_configs.py --kernels bwd_dqkg,fwd_intra --B 8 --T 4096 --out results/bench
Writes <out>/configs-<card>-B<B>_T<T>.csv (kernel, config, ms) and prints it. --inference records the launches of
the no-grad forward instead (its plan, dispatch.py: at B=8 the wy kernel forming A and the state kernel applying A
and computing the output): configs-...-inference.csv.

--probe runs one config instead of timing: the named kernels pinned to --config, every other chunk kernel to its
first config, so nothing is autotuned; one process per config, under CUDA_LAUNCH_BLOCKING=1, tells which launch
config faults at a shape (without a GPU, under TRITON_INTERPRET=1, it is a dry run of the same launches in fp32):

    CUDA_LAUNCH_BLOCKING=1 python benchmarks/time_configs.py --probe --kernels bwd_dav --config BV=64,w4,s2 \
        --B 2 --T 512 --heads 2 --head-dim 32
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
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128, help="key and value width of a head")
    ap.add_argument("--probe", action="store_true",
                    help="with --config: run one forward + backward with the named kernels pinned to that config "
                         "(fits or not) and every other chunk kernel to its first config, no autotuning, then sync "
                         "(with CUDA_LAUNCH_BLOCKING=1 a fault names its launch); times nothing")
    args = ap.parse_args()
    names = args.kernels.split(",")
    unknown = [n for n in names if n not in CHUNK_KERNELS]
    if unknown:
        raise SystemExit(f"unknown kernel(s) {unknown}; choose from {sorted(CHUNK_KERNELS)}")
    if args.probe:
        return probe(names, args)
    modules = {n: importlib.import_module(CHUNK_KERNELS[n].fn.__module__) for n in names}
    recorders = {}
    for n in names:
        attr = CHUNK_KERNELS[n].fn.__name__
        recorders[n] = Recorder(getattr(modules[n], attr))
        setattr(modules[n], attr, recorders[n])
    q, k, v, g, b, w, _ = (x.requires_grad_() for x in inputs(args.B, args.T, seed=0, heads=args.heads,
                                                              key_dim=args.head_dim, value_dim=args.head_dim))
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


def probe(names: list[str], args) -> None:
    """One forward + backward at the given shape with the named kernels on the config named args.config and every
    other chunk kernel on its first config (a single config: the autotuner runs nothing), then a sync."""
    if args.config is None:
        raise SystemExit("--probe needs --config NAME (a config of the named kernels)")
    for n, kernel in CHUNK_KERNELS.items():
        configs = kernel.gpu_configs
        chosen = [c for c in configs if config_name(c) == args.config] if n in names else configs[:1]
        if not chosen:
            raise SystemExit(f"{n} has no config named {args.config}; its configs: {[config_name(c) for c in configs]}")
        pin_config(kernel, chosen[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"      # cpu: under TRITON_INTERPRET=1, fp32 (a dry run)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, g, b, w, _ = (x.requires_grad_() for x in inputs(args.B, args.T, seed=0, heads=args.heads,
                                                              key_dim=args.head_dim, value_dim=args.head_dim,
                                                              dtype=dtype, device=device))
    o, ht = triton_chunk_gdn2(q, k, v, g, b, w, output_final_state=True)
    torch.autograd.backward((o, ht), (torch.randn_like(o), torch.randn_like(ht)))
    if device == "cuda":
        torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(x.grad).all()) for x in (q, k, v, g, b, w))
    print(f"probe {','.join(names)} {args.config} B{args.B} T{args.T} heads {args.heads}x{args.head_dim}: "
          f"completed, gradients finite: {finite}", flush=True)


if __name__ == "__main__":
    main()
