"""GPU correctness check of every launch config of our GDN-2 Triton kernels on the paths dispatch.py plans.

For each kernel and each of its configs (the others pinned to their first fitting config), fresh random inputs,
outputs poisoned with NaN before the run (every torch.empty / empty_like is NaN-filled), compared with a float64
reference (torch chunkwise, autograd in float64) by relative error ||x - ref|| / ||ref||: bf16 <= 1e-2, fp32 <= 2e-3,
for o, the final state and every gradient (q, k, v, g, b, w, h0). Each config runs in the modes (MODES: training,
inference, inference planned with APPLY_A_MIN_WALKS walks) and dtypes (bf16, fp32) whose plan launches its kernel,
so every launch config of every default path is checked and nothing else. Order: the decode kernel (every
(BV, num_warps) entry vs a float64 step); the extra shapes (varlen + grouped heads + fused L2-norm + K = 256; K != V
with V = 256; strong decay) on the first fitting config of every kernel, which runs every plan; every config on the
main shape; the K = 256 shape on every other sequential-kernel config that fits it (they hold the state as four
[64, BV] blocks there); last, the first call under autotuning. --budget-s marks what is left NOT RUN.

    PYTHONUNBUFFERED=1 python benchmarks/check_kernels_gpu.py --out results/bench [--budget-s 300]
    python benchmarks/check_kernels_gpu.py --smoke --out /tmp/smoke     # CPU: the same plumbing under the Triton
                                                                         # interpreter on tiny shapes (no GPU)
Writes <out>/check-<card>.csv and check-summary-<card>.txt; prints a per-config summary.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:                                          # before any Triton kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"
# the repository root, for benchmarks.*; appended, so that a gdn2 copy on PYTHONPATH still comes first
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.csv_rows import write_csv  # noqa: E402
from gdn2.ops.chunk_torch import torch_chunk_gdn2  # noqa: E402
from gdn2.ops.recurrent import torch_recurrent_step_gdn2  # noqa: E402
from gdn2.ops.triton import recurrent, triton_chunk_gdn2, triton_recurrent_step_gdn2  # noqa: E402
from gdn2.ops.triton.chunk import CHUNK_KERNELS  # noqa: E402
from gdn2.ops.triton.dispatch import APPLY_A_MIN_WALKS, ForwardPlan, plan_forward, planned_as  # noqa: E402
from gdn2.ops.triton.utils import config_name, pin_config  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"

KERNELS = CHUNK_KERNELS
SEQUENTIAL = ("fwd_state", "bwd_dstate")
TOL = {torch.bfloat16: 1e-2, torch.float32: 2e-3}
MAIN = dict(name="paper_T4097", B=1, T=4097, H=16, HV=16, K=128, V=128, cu=None, l2=False, h0=True)
EXTRA = [
    dict(name="varlen_grouped_l2_K256", B=1, T=1500, H=2, HV=4, K=256, V=64, cu=[0, 7, 700, 1500], l2=True, h0=True),
    dict(name="batch_K64_V256", B=2, T=300, H=1, HV=2, K=64, V=256, cu=None, l2=False, h0=False),
    # decay 8x the main case's: many channels of many sub-chunks have some g below MIDPOINT_G_MIN (the exact form of
    # the diagonal blocks), the rest not, so both forms run in the same programs
    dict(name="strong_decay", B=1, T=1000, H=4, HV=4, K=128, V=128, cu=None, l2=False, h0=True, g_scale=8.0),
]
if SMOKE:                                          # tiny stand-ins with the same features
    MAIN = dict(MAIN, name="smoke_T130", T=130, H=1, HV=1, K=32, V=32)
    EXTRA = [dict(EXTRA[0], name="smoke_varlen_K256", T=90, H=1, HV=2, K=256, V=16, cu=[0, 7, 90]),
             dict(EXTRA[1], name="smoke_V256", T=70, K=16, V=256),
             dict(EXTRA[2], name="smoke_strong_decay", T=80, H=1, HV=1, K=32, V=16)]


@contextlib.contextmanager
def poisoned_allocations():
    """NaN-fill every floating torch.empty / empty_like made while our kernels allocate their outputs."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*a, **kw):
        x = real_empty(*a, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    def like(x, *a, **kw):
        y = real_like(x, *a, **kw)
        return y.fill_(float("nan")) if y.is_floating_point() else y

    torch.empty, torch.empty_like = empty, like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def make_inputs(case, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    B, T, H, HV, K, V = (case[x] for x in "B T H HV K V".split())
    dev = DEV
    q = torch.randn(B, T, H, K, device=dev, generator=gen)
    k = torch.randn(B, T, H, K, device=dev, generator=gen)
    if not case["l2"]:
        q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))
    v = torch.randn(B, T, HV, V, device=dev, generator=gen)
    # decay like the layer's: -exp(A_log) * softplus(.), per channel, some channels fast
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, K, device=dev, generator=gen) - 2) * \
        torch.rand(1, 1, H, K, device=dev, generator=gen) * 4 * case.get("g_scale", 1.0)
    b = torch.rand(B, T, H, K, device=dev, generator=gen)
    w = torch.rand(B, T, HV, V, device=dev, generator=gen)
    N = B if case["cu"] is None else len(case["cu"]) - 1
    h0 = torch.randn(N, HV, K, V, device=dev, generator=gen) if case["h0"] else None
    cu = torch.tensor(case["cu"], device=dev, dtype=torch.int32) if case["cu"] is not None else None
    return [q, k, v, g, b, w], h0, cu


def run_one(fn, xs, h0, cu, l2, do, dht, grad=True):
    ins = [x.clone().requires_grad_(grad) for x in xs]
    h = h0.clone().requires_grad_(grad) if h0 is not None else None
    o, ht = fn(*ins, initial_state=h, output_final_state=True, use_qk_l2norm_in_kernel=l2, cu_seqlens=cu)
    out = {"o": o.detach(), "ht": ht.detach()}
    if grad:
        torch.autograd.backward([o, ht], [do.to(o.dtype), dht])
        for n, x in zip("q k v g b w".split(), ins, strict=False):
            out["d" + n] = x.grad
        if h is not None:
            out["dh0"] = h.grad
    return out


# mode -> (training, the walks to plan with: None for the case's own). Every mode runs the plan dispatch.plan_forward
# picks for the dtype checked; infer_many_sequences plans as if there were APPLY_A_MIN_WALKS walks, so the state
# kernel applying A runs on the check's shapes (the main shape has 16).
MODES = {"train": (True, None), "infer": (False, None), "infer_many_sequences": (False, APPLY_A_MIN_WALKS)}


def plan_of(mode, dtype, case) -> ForwardPlan:
    """The plan a mode runs for a case in `dtype`."""
    training, n_walks = MODES[mode]
    walks = (case["B"] if case["cu"] is None else len(case["cu"]) - 1) * case["HV"]
    return plan_forward(dtype, case["K"], n_walks or walks, training)


def plan_dtypes(dtype) -> tuple:
    """The dtypes whose plans run on inputs of `dtype`: its own; under --smoke bf16's too (the interpreter mangles bf16
    inputs, so the 16-bit plans run on fp32 ones there)."""
    return (dtype, torch.bfloat16) if SMOKE else (dtype,)


def launches(plan: ForwardPlan, kname: str) -> bool:
    """Whether a call on `plan` launches kernel `kname` (the backward's kernels: in training)."""
    return kname in plan.launches() or (kname.startswith("bwd_") and plan.keep_for_backward)


def pin_for(plan, dtype, K, under_test=None):
    """Pin every kernel to its first config that may run on (`dtype`, K, the plan's state-kernel variant); the kernel
    under test to its given config. Returns False if the config under test cannot run in that setting (the mode is
    skipped)."""
    state_flags = (plan.output_in_state, plan.store_states, plan.state_applies_a)
    for kname, kern in KERNELS.items():
        flags = state_flags if kname == "fwd_state" else ()
        # the interpreter has no resource limits
        fits = lambda c: SMOKE or kern.fits(c, dtype, K, *flags)   # noqa: E731
        if under_test is not None and kname == under_test[0]:
            if not fits(under_test[1]):
                return False
            pin_config(kern, under_test[1])
        else:
            config = next((c for c in kern._all_configs if fits(c)), None)
            if config is None:
                print(f"  no config of {kname} fits {dtype} K={K} ({plan}): mode skipped")
                return False
            pin_config(kern, config)
    return True


def check_case(case, seed, label, rows, modes, dtypes=(torch.bfloat16, torch.float32), under_test=None,
               autotuned=()):
    """modes: the MODES to run, each where its plan launches the kernel under test (a mode whose plan an earlier mode
    ran already is skipped). autotuned: kernel names left to the autotuner (all their configs, cache cleared) in every
    mode, so the checked call is the first one of its key: the autotuner times every config in place before the real
    run (a kernel that updates its arguments in place must restore them: restore_value)."""
    xs, h0, cu = make_inputs(case, seed)
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    B, T, HV, V, K = case["B"], case["T"], case["HV"], case["V"], case["K"]
    do = torch.randn(B, T, HV, V, device=DEV, generator=gen)
    dht = torch.randn(len(case["cu"]) - 1 if case["cu"] else B, HV, K, V, device=DEV, generator=gen)
    ref = run_one(torch_chunk_gdn2, [x.double() for x in xs], h0.double() if h0 is not None else None, cu,
                  case["l2"], do.double(), dht.double())
    worst = 0.0
    for dtype in dtypes:
        cast = [x.to(dtype) if i != 3 else x for i, x in enumerate(xs)]          # g stays fp32, as in the layer
        plans_run = []
        for plan_dtype, mode in ((d, m) for d in plan_dtypes(dtype) for m in modes):
            plan = plan_of(mode, plan_dtype, case)
            if plan in plans_run or (under_test is not None and not launches(plan, under_test[0])):
                continue
            plans_run.append(plan)
            if not pin_for(plan, dtype, K, under_test):
                continue
            for kname in autotuned:
                pin_config(KERNELS[kname], None)
            with planned_as(plan_dtype, MODES[mode][1]), poisoned_allocations():
                if MODES[mode][0]:
                    got = run_one(triton_chunk_gdn2, cast, h0, cu, case["l2"], do, dht)
                else:
                    with torch.no_grad():
                        got = run_one(triton_chunk_gdn2, cast, h0, cu, case["l2"], do, dht, grad=False)
            if not SMOKE:
                torch.cuda.synchronize()
            for name, val in got.items():
                r = ref[name]
                err = ((val.double() - r).norm() / r.norm()).item()
                if not torch.isfinite(val).all():
                    err = float("inf")
                ratio = err / TOL[dtype]
                worst = max(worst, ratio)
                dtype_name = str(dtype).split(".")[-1]
                if plan_dtype != dtype:
                    dtype_name += f" ({str(plan_dtype).split('.')[-1]} plan)"
                rows.append(dict(label=label, case=case["name"], dtype=dtype_name, mode=mode, tensor=name,
                                 rel_err=f"{err:.3e}", tol=TOL[dtype], ok=err <= TOL[dtype]))
    return worst


def check_decode(rows):
    worst_all = {}
    for cfg in recurrent.DECODE_CONFIGS:
        worst = 0.0
        shapes = [(1, 1, 16, 16, False), (64, 1, 16, 16, True), (3, 3, 4, 8, False)]
        for (B, T, H, HV, l2) in (shapes if not SMOKE else [(1, 2, 1, 2, True)]):
            K = V = 128 if not SMOKE else 32
            gen = torch.Generator(device=DEV).manual_seed(B * 100 + T)
            q, k = (torch.randn(B, T, H, K, device=DEV, generator=gen) for _ in range(2))
            k = torch.nn.functional.normalize(k, dim=-1)
            v = torch.randn(B, T, HV, V, device=DEV, generator=gen)
            g = -torch.rand(B, T, H, K, device=DEV, generator=gen)
            b = torch.rand(B, T, H, K, device=DEV, generator=gen)
            w = torch.rand(B, T, HV, V, device=DEV, generator=gen)
            state = torch.randn(B, HV, K, V, device=DEV, generator=gen)
            # the reference takes the same (bf16-rounded) inputs the kernel gets, in float64
            ins = [x.to(torch.float32 if SMOKE else torch.bfloat16) if i != 3 else x
                   for i, x in enumerate((q, k, v, g, b, w))]
            ref_state_bf = state.double()
            ref_o_bf = torch_recurrent_step_gdn2(*(x.double() for x in ins), ref_state_bf, None, l2)
            o = triton_recurrent_step_gdn2(*ins, state, None, l2, config=cfg)
            if not SMOKE:
                torch.cuda.synchronize()
            for name, val, r in (("o", o, ref_o_bf), ("state", state, ref_state_bf)):
                err = ((val.double() - r).norm() / r.norm()).item()
                worst = max(worst, err / TOL[torch.float32])
                rows.append(dict(label=f"decode BV={cfg[0]},w{cfg[1]}", case=f"B{B}_T{T}_H{H}_HV{HV}_l2{l2}",
                                 dtype="bf16-in", mode="decode", tensor=name, rel_err=f"{err:.3e}",
                                 tol=TOL[torch.float32], ok=err <= TOL[torch.float32]))
        worst_all[cfg] = worst
    return worst_all


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes (read before import)")
    ap.add_argument("--kernels", default=None, help="comma-separated names (e.g. bwd_dqkg): check only their configs "
                                                     "on the main shape; no decode, no extra shapes (see --extras)")
    ap.add_argument("--modes", default=None, help=f"comma-separated modes to run (default: all of {list(MODES)})")
    ap.add_argument("--extras", nargs="?", const="all", default=None,
                    help="with --kernels: also the extra shapes on every kernel's first config (all of them, or the "
                         "comma-separated names given, e.g. strong_decay), and the strong-decay shape on every "
                         "config of the kernels named")
    ap.add_argument("--no-main", action="store_true", help="with --kernels: skip their configs on the main shape "
                                                            "(to finish a check that a time limit cut short)")
    args = ap.parse_args()
    only = None if args.kernels is None else set(args.kernels.split(","))
    modes = list(MODES) if args.modes is None else args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {sorted(unknown)}; choose from {list(MODES)}")
    os.makedirs(args.out, exist_ok=True)
    card = "cpu-interpreter" if SMOKE else torch.cuda.get_device_name().replace(" ", "-")
    rows, summary = [], []
    start = time.time()

    def record(kname, name, status, dtypes=None):
        """Print one summary line and rewrite both result files (a run cut short keeps what it finished)."""
        summary.append((kname, name, status))
        print(f"{kname:15s} {name:28s} {'' if dtypes is None else [str(d)[6:] for d in dtypes]} {status}", flush=True)
        write_results(args.out, card, rows, summary)

    for kern in KERNELS.values():
        pin_config(kern, kern.configs[0])
    for cfg, worst in (check_decode(rows) if only is None else {}).items():
        status = f"worst err/tol {worst:.3f} {'PASS' if worst <= 1 else 'FAIL'}"
        record("decode", f"BV={cfg[0]},w{cfg[1]}", status)
    DT = (torch.bfloat16, torch.float32) if not SMOKE else (torch.float32,)     # the interpreter mangles bf16
    wanted = None if args.extras in (None, "all") else set(args.extras.split(","))
    unknown = (wanted or set()) - {case["name"] for case in EXTRA}
    if unknown:
        raise SystemExit(f"--extras: unknown shape(s) {sorted(unknown)}; choose from {[c['name'] for c in EXTRA]}")
    # (case, (kernel, config) under test or None for every kernel's first config), in the order they run: the extra
    # shapes on the first configs (every plan, K = 256 included), then every config on the main shape, then the K = 256
    # shape on every other config of the sequential kernels (four state blocks; in the full run, or for those named in
    # --kernels when --extras takes that shape) and the strong-decay shape (the exact forms of exp(G_r - G_s), whose
    # slices follow the K block) on every other config of the kernels named in --kernels, when --extras takes it. So a
    # time budget cuts configs, not plans.
    runs = [(case, None) for case in EXTRA if wanted is None or case["name"] in wanted] \
        if only is None or args.extras else []
    runs += [(MAIN, (kname, cfg)) for kname, kern in KERNELS.items()
             if only is None or (kname in only and not args.no_main) for cfg in kern._all_configs]
    K256 = EXTRA[0]
    k256_chosen = args.extras is not None and (wanted is None or K256["name"] in wanted)
    runs += [(K256, (kname, cfg)) for kname in SEQUENTIAL if only is None or (kname in only and k256_chosen)
             for cfg in KERNELS[kname]._all_configs[1:] if KERNELS[kname].fits(cfg, torch.bfloat16, K256["K"])]
    STRONG = next(case for case in EXTRA if case["name"].endswith("strong_decay"))
    strong_chosen = args.extras is not None and (wanted is None or STRONG["name"] in wanted)
    runs += [(STRONG, (kname, cfg)) for kname in sorted(only or ()) if strong_chosen
             for cfg in KERNELS[kname]._all_configs[1:] if KERNELS[kname].fits(cfg, torch.bfloat16, STRONG["K"])]
    seed = 1000
    for case, under_test in runs:
        seed += 7
        if under_test is None:
            label, name = "all(first)", case["name"]
        elif case is MAIN:
            label, name = under_test[0], config_name(under_test[1])
        else:
            label, name = under_test[0], f"{case['name']} {config_name(under_test[1])}"
        if time.time() - start > args.budget_s:
            record(label, name, "NOT RUN (time budget)")
            continue
        dtypes = [d for d in DT if under_test is None or KERNELS[under_test[0]].fits(under_test[1], d, case["K"])]
        status = case_status(case, seed, f"{label} {name} {[str(d)[6:] for d in dtypes]}", rows, modes, dtypes,
                             under_test, timed=case is MAIN)
        record(label, name, status, dtypes)
    # the first call under autotuning: a kernel that updates a buffer in place without restore_value would see it
    # changed once per timed config
    tuned = sorted(KERNELS) if only is None else sorted(only)
    if time.time() - start > args.budget_s:
        status = "NOT RUN (time budget)"
    else:
        status = case_status(dict(MAIN, name=MAIN["name"] + "_autotuned"), seed + 7, "autotuned first call", rows,
                             modes, DT, autotuned=tuned)
    record("autotuned", ",".join(tuned), status, DT)
    for kern in KERNELS.values():
        pin_config(kern, None)
    failed = not_passed(summary)
    print(f"wrote {args.out}/check-{card}.csv; {sum(not r['ok'] for r in rows)} failing rows of {len(rows)}; "
          f"{len(failed)} of {len(summary)} checks did not pass" + "".join(f"\n  {line}" for line in failed))


def case_status(case, seed, label, rows, modes, dtypes, under_test=None, autotuned=(), timed=False) -> str:
    """check_case run and summed up in one status: its verdict over the rows it added (with its seconds, if timed), or
    ERROR naming the exception (a config that fails to compile or run)."""
    n_rows, start = len(rows), time.time()
    try:
        worst = check_case(case, seed, label, rows, modes, dtypes, under_test, autotuned)
    except Exception as e:
        return f"ERROR {type(e).__name__}: {str(e)[:120]}"
    return verdict(worst, len(rows) - n_rows) + (f" ({time.time() - start:.0f}s)" if timed else "")


def not_passed(summary) -> list[str]:
    """The summary lines (kernel, config or shape, status) whose status is not a PASS: FAIL, ERROR, NOT RUN."""
    return [f"{kname} {name}: {status}" for kname, name, status in summary
            if not status.split(" (")[0].endswith("PASS")]


def verdict(worst: float, n_checked: int) -> str:
    """A config's summary: its worst error / bound over the tensors it checked, or NOT RUN where none was (no mode
    run launches it in a setting it fits, e.g. a 3-stage state config under --modes infer_many_sequences)."""
    if n_checked == 0:
        return "NOT RUN (fits none of the checked modes)"
    return f"worst err/tol {worst:.3f} {'PASS' if worst <= 1 else 'FAIL'}"


def write_results(out, card, rows, summary):
    """check-<card>.csv (one row per tensor checked) and check-summary-<card>.txt (one line per config)."""
    if rows:
        write_csv(rows, os.path.join(out, f"check-{card}.csv"))
    with open(os.path.join(out, f"check-summary-{card}.txt"), "w") as f:
        for r in summary:
            f.write(" | ".join(r) + "\n")


if __name__ == "__main__":
    main()
