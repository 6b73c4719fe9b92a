"""Compile every launch config of our GDN-2 chunk kernels for sm_90 (H100) WITHOUT a GPU and report resources.

For each kernel, config, input dtype (bf16, fp32) and key width K (128, 256; V = 128, H = Hv = 16, every optional
input present), Triton compiles for GPUTarget("cuda", 90, 32) on the CPU; we print the shared memory the launch will
ask for (metadata.shared) and, from the bundled ptxas -v on the generated PTX, registers per thread and spill bytes.
A config that needs more than 232,448 B of shared memory (the H100's per-block opt-in maximum) cannot launch; the
script lists those, and each kernel's ``fits`` (fwd_*.py / chunk_bwd.py) must exclude them (checked at the end).

    .venv/bin/python benchmarks/compile_check_sm90.py [--kernels state,dstate] [--K 128,256] [--csv out.csv]

Needs no CUDA driver (the interpreter must be OFF: do not set TRITON_INTERPRET). Takes minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
# the repository root, for benchmarks.*; appended, so that a gdn2 copy on PYTHONPATH still comes first
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.csv_rows import write_csv  # noqa: E402
from gdn2.ops.triton.chunk import CHUNK_KERNELS  # noqa: E402
from gdn2.ops.triton.utils import SERIAL_PRECISION, block_sizes, config_name, dot_precision, solve_precision  # noqa: E402

SMEM_LIMIT = 232_448
TARGET = GPUTarget("cuda", 90, 32)
# Builds beyond one per chunk kernel: each extra name is a kernel of CHUNK_KERNELS with the variant constexprs a
# ForwardPlan (dispatch.py) launches it with. The state kernel's (FUSE_OUTPUT, STORE_STATES, APPLY_A), its fits()
# flags: states stored for the output kernel (fp32, K > 128), the output inside (16-bit inference), the output inside
# with the states stored (16-bit training), applying A (16-bit inference from APPLY_A_MIN_WALKS walks). The wy
# kernel's (SOLVE_A, COUNT_EXACT, APPLY_A): A from the solve kernel (fp32), A formed inside in training (COUNT_EXACT)
# and in inference, and with the state kernel applying A.
VARIANTS = {"fwd_state": dict(FUSE_OUTPUT=False, STORE_STATES=True, APPLY_A=False),
            "fwd_state_output": ("fwd_state", dict(FUSE_OUTPUT=True, STORE_STATES=False, APPLY_A=False)),
            "fwd_state_output_train": ("fwd_state", dict(FUSE_OUTPUT=True, STORE_STATES=True, APPLY_A=False)),
            "fwd_state_apply_a": ("fwd_state", dict(FUSE_OUTPUT=True, STORE_STATES=False, APPLY_A=True)),
            "fwd_wy": dict(SOLVE_A=False, COUNT_EXACT=False, APPLY_A=False),
            "fwd_wy_solve_a_train": ("fwd_wy", dict(SOLVE_A=True, COUNT_EXACT=True, APPLY_A=False)),
            "fwd_wy_solve_a": ("fwd_wy", dict(SOLVE_A=True, COUNT_EXACT=False, APPLY_A=False)),
            "fwd_wy_apply_a": ("fwd_wy", dict(SOLVE_A=True, COUNT_EXACT=False, APPLY_A=True))}
KERNELS = {}
for _name, _kernel in CHUNK_KERNELS.items():
    KERNELS[_name] = _kernel
    KERNELS.update({extra: _kernel for extra, spec in VARIANTS.items() if isinstance(spec, tuple) and spec[0] == _name})


def variant_consts(kname) -> dict:
    """The variant constexprs of a build name (VARIANTS; {} for a kernel without variants)."""
    spec = VARIANTS.get(kname, {})
    return spec[1] if isinstance(spec, tuple) else spec


# pointer arguments that are fp32 whatever the input dtype (g, the solve, states in and out, fp32 gradients)
FP32_POINTERS = {"g", "A", "gC", "h0", "ht", "dht", "dh0", "dq", "dk", "db", "dG", "dg", "dAE", "dT", "dAqk",
                 "dbk", "dqs", "dkd",
                 "rq", "rk"}
INT_POINTERS = {"cu_seqlens", "chunk_indices", "chunk_offsets", "n_exact"}
SCALARS = {"scale": "fp32", "TT": "i32", "NSH_LOG2": "i32"}
# kernels launched with SERIAL_PRECISION (tf32 for fp32 operands); the rest with dot_precision(dtype)
SERIAL_KERNELS = {"fwd_wy", "fwd_wy_solve_a_train", "fwd_wy_solve_a", "fwd_wy_apply_a", "fwd_state", "fwd_state_output",
                  "fwd_state_output_train", "fwd_state_apply_a", "fwd_output", "bwd_dlocal", "bwd_dstate"}


def consts_of(kname):
    """(FUSE_OUTPUT, STORE_STATES, APPLY_A) of a state-kernel build (the state kernel's fits flags)."""
    c = variant_consts(kname)
    return c["FUSE_OUTPUT"], c["STORE_STATES"], c["APPLY_A"]


def signature_for(kname, fn, config, dtype, K, V, H=16, HV=16):
    dt = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    BK, BV = block_sizes(K, V)
    consts = dict(H=H, HV=HV, K=K, KP=triton.next_power_of_2(K), V=V, BK=BK, BV=BV, NK=triton.cdiv(K, BK),
                  USE_L2=True, HAS_H0=True, STORE_FINAL=True, HAS_DHT=True, STORE_DH0=True,
                  PREC=SERIAL_PRECISION if kname in SERIAL_KERNELS else dot_precision(dtype),
                  PREC_T=solve_precision(dtype), PAIR_PREC=dot_precision(dtype))
    consts.update(variant_consts(kname))
    consts.update(config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = consts[name]
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        else:
            signature[name] = "*i32" if name in INT_POINTERS else "*fp32" if name in FP32_POINTERS else f"*{dt}"
            attrs[(i,)] = [["tt.divisibility", 16]]                        # torch allocations are 16-B aligned
    return signature, constexprs, attrs


def ptxas_report(ptx: str) -> tuple[int | None, int | None]:
    """(registers per thread, spill store bytes) from the bundled ptxas -v; (None, None) if unavailable."""
    from triton.backends.nvidia import compiler as nv
    try:
        ptxas = nv.get_ptxas(90).path
    except Exception:
        return None, None
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def write_ptx(directory: str, name: str, ptx: str) -> None:
    """<directory>/<name>.ptx without the debug lines (.loc, .file, the $L__tmp labels that mark source positions and
    the debug sections), which move with any edit of the source text."""
    os.makedirs(directory, exist_ok=True)
    ptx = re.sub(r"\n\s*\.section\s+\.debug.*", "\n", ptx, flags=re.S)
    lines = [ln for ln in ptx.splitlines() if not re.match(r"\s*(\.(loc|file)\b|\$L__tmp\d+:$)", ln)]
    with open(os.path.join(directory, re.sub(r"[^\w.=,-]", "_", name) + ".ptx"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--K", default="128,256")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--ptx-dir", default=None, help="also write each build's PTX there, without its debug lines (to "
                                                     "diff the builds of two trees: a refactor that leaves them equal "
                                                     "needs no new GPU check)")
    args = ap.parse_args()
    rows = []
    print(f"{'kernel':11s} {'config':22s} {'dtype':9s} {'K':>4s} {'smem B':>8s} {'regs':>5s} {'spill B':>7s}  "
          f"launch  fits()", flush=True)
    for kname in args.kernels.split(","):
        launcher = KERNELS[kname]
        fn = launcher.fn
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        for config in launcher.configs:
            for dtype in (torch.bfloat16, torch.float32):
                for K in (int(x) for x in args.K.split(",")):
                    sig, consts, attrs = signature_for(kname, fn, config, dtype, K, 128)
                    t = time.time()
                    try:
                        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                                           options=dict(num_warps=config.num_warps, num_stages=config.num_stages,
                                                         **({"maxnreg": config.maxnreg} if config.maxnreg else {})))
                        smem = k.metadata.shared
                        regs, spill = ptxas_report(k.asm["ptx"])
                        if args.ptx_dir:
                            write_ptx(args.ptx_dir, f"{kname}-{config_name(config)}-{str(dtype)[6:]}-K{K}",
                                      k.asm["ptx"])
                        err = ""
                    except Exception as e:                                 # a config that does not compile
                        smem, regs, spill, err = None, None, None, f"{type(e).__name__}: {str(e)[:200]}"
                    ok = smem is not None and smem <= SMEM_LIMIT
                    flags = consts_of(kname) if kname.startswith("fwd_state") else ()
                    fits = launcher.fits(config, dtype, K, *flags)
                    flag = ("" if ok == fits else "  <-- fits() ADMITS A CONFIG THAT CANNOT LAUNCH" if fits
                            else "  (fits() conservative: excluded, would launch)")
                    row = dict(kernel=kname, config=config_name(config), dtype=str(dtype)[6:], K=K, smem=smem,
                               regs=regs, spill=spill, launch_ok=ok, fits=fits, compile_s=round(time.time() - t, 1),
                               error=err)
                    rows.append(row)
                    print(f"{kname:11s} {row['config']:22s} {row['dtype']:9s} {K:4d} {str(smem):>8s} "
                          f"{str(regs):>5s} {str(spill):>7s}  {'ok' if ok else 'NO':6s}  {fits}{flag} "
                          f"({row['compile_s']}s){' ' + err if err else ''}", flush=True)
    if args.csv:
        write_csv(rows, args.csv)
    bad = [r for r in rows if r["fits"] and not r["launch_ok"]]
    spare = [r for r in rows if r["launch_ok"] and not r["fits"]]
    print(f"{len(rows)} compiles; {sum(not r['launch_ok'] for r in rows)} cannot launch; {len(bad)} admitted by "
          f"fits() although they cannot launch (must be 0); {len(spare)} excluded by fits() although they would launch")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
