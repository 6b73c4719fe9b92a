r"""GDN-2 inference-only (prefill) forward: no autograd, nothing kept for a backward.

The forward launches of the training path (chunk_fwd.chunk_forward: the merged wy kernel -> state for 16-bit inputs,
intra -> exact_diag -> solve -> wy -> state [-> output] for fp32: use_merged_kernel); every intermediate is
freed on return. Two variants of the last step:
  - split: the sequential state kernel writes the per-chunk states (2 x NC x Hv x K x V bytes in bf16, 0.27 GB
    written and read at B=8, T=4096, H=16, K=V=128) and R; the chunk-parallel output kernel reads them.
  - fused: the state kernel computes O = Q S_0 + Aqk R itself (two more products per chunk step on the sequential
    path) and writes neither.
Measured on the H100 (bf16, H=16, K=V=128, 2026-11-27, sixth session, docs/kernels.md): fused 2.15 vs split 2.39 ms
at B=8, T=4096, 2.29 vs 2.54 at B=2, T=16384, 5.44 vs 5.69 at B=1, T=65536 (and the same order in every earlier
version). So fused is the default for 16-bit inputs with K <= 128, and the split one elsewhere (fp32, K = 256: fewer
state-kernel configs fit there). benchmarks/bench_variants.py timed both there (H100, eighth session,
results/bench/variants-*.csv): split faster for fp32 at K = 128 (fused 1.10x / 1.20x / 1.03x in inference / training
forward / forward + backward) and for bf16 at K = 256 (1.12x / 1.08x / 1.02x at B=1, T=65536; at B=8, T=4096 0.99x /
1.24x / 1.07x), fused faster for fp16 at K = 128 (0.90x / 0.95x / 0.99x). GDN2_TRITON_INFER_FUSED=1 / =0 (read per
call) forces either.
The training forward has the same two variants, except that the fused one still stores the per-chunk states and R
for the backward; it drops the output kernel. Same runs: 2.26 vs 2.39 ms forward, 8.86 vs 8.99 ms forward + backward
at B=8; 2.41 vs 2.54 and 9.30 vs 9.40 at B=2; equal at B=1 (5.70 vs 5.69, 20.51 vs 20.49). So it is the default on
the same domain; GDN2_TRITON_TRAIN_FUSED=1 / =0 forces either. GDN2_TRITON_RECOMPUTE_STATES=1 (opt-in): no
per-chunk states kept for the backward (recompute_states_in_backward).
With the output inside the walk and the merged kernel, inference has one more variant: the walk applies A itself
(use_walk_applying_a), the default where many walks run side by side.
"""
from __future__ import annotations

import contextlib
import os

import torch

from gdn2.ops.triton.chunk_fwd import chunk_forward, walk_can_apply_a


def _switch(name: str, meaning: dict[str, str]) -> bool | None:
    """The value of a switch: None if unset, else 0 / 1 (anything else is refused, naming what each value means)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 ({meaning['0']}) or 1 ({meaning['1']}), or unset for the default; "
                         f"got {value!r}")
    return value == "1"


# the switches this module reads (each per call, "0" / "1" / unset for the default), by the keyword forced() takes
SWITCHES = {"merged": "GDN2_TRITON_MERGED", "infer_fused": "GDN2_TRITON_INFER_FUSED",
            "train_fused": "GDN2_TRITON_TRAIN_FUSED", "recompute_states": "GDN2_TRITON_RECOMPUTE_STATES",
            "walk_applies_a": "GDN2_TRITON_WALK_APPLIES_A"}


@contextlib.contextmanager
def forced(**switches: bool):
    """Force the named switches inside a with-block (True -> "1", False -> "0"), e.g. forced(merged=False) for the
    four chunk-parallel kernels; the others keep their value. The environment is restored on exit."""
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise ValueError(f"forced(): unknown switch(es) {unknown}; choose from {sorted(SWITCHES)}")
    saved = {SWITCHES[name]: os.environ.get(SWITCHES[name]) for name in switches}
    try:
        for name, on in switches.items():
            os.environ[SWITCHES[name]] = "1" if on else "0"
        yield
    finally:
        for env, value in saved.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value


OUTPUT_SWITCH = {"0": "per-chunk states + output kernel", "1": "output inside the sequential walk"}


def _output_in_walk(switch: str, dtype: torch.dtype, K: int) -> bool:
    """The output inside the walk where it measured faster (16-bit inputs, K <= 128; fp32 and K = 256 measured slower)
    unless `switch` forces it."""
    choice = _switch(switch, OUTPUT_SWITCH)
    if choice is None:
        return dtype in (torch.bfloat16, torch.float16) and K <= 128
    return choice


def use_fused_output(dtype: torch.dtype, K: int) -> bool:
    """Whether the inference forward computes the output inside the sequential walk (see the module docstring)."""
    return _output_in_walk(SWITCHES["infer_fused"], dtype, K)


def use_fused_output_in_training(dtype: torch.dtype, K: int) -> bool:
    """Whether the training forward computes the output inside the walk too (it still stores the per-chunk states and
    R for the backward, and drops the output kernel): by default where the inference forward does (see the module
    docstring)."""
    return _output_in_walk(SWITCHES["train_fused"], dtype, K)


def recompute_states_in_backward() -> bool:
    """GDN2_TRITON_RECOMPUTE_STATES=1: the training forward stores no per-chunk states (its walk is the inference one,
    output inside) and the backward recomputes them with one more walk, as fla's chunk_gated_delta_rule does. Saves
    NC x Hv x K x V x 2 bytes of training memory per layer (0.27 GB at B=8, T=4096, H=16, K=V=128) for one more
    walk in the backward. Off unless set: on the H100 (seventh session, docs/kernels.md) it made forward + backward
    2-6% slower (9.18 vs 8.98 ms at B=8, T=4096; 21.71 vs 20.47 at B=1, T=65536; bench rows *_recompute); with the
    merged kernel (tenth session) 8.62 vs 8.42 and 20.53 vs 19.32."""
    return bool(_switch(SWITCHES["recompute_states"], {"0": "per-chunk states kept for the backward",
                                                       "1": "recomputed in the backward"}))


def use_merged_kernel(dtype: torch.dtype, K: int) -> bool:
    """Whether the forward (inference and training) makes T, Aqk and A inside the wy kernel, one chunk-parallel launch
    instead of four (chunk_fwd.chunk_pairs): by default for 16-bit inputs, where the H100 measured it faster (tenth
    session, bf16, output inside the walk: inference 1.62 vs 2.11 ms at B=8, T=4096, 4.15 vs 5.13 at B=1, T=65536;
    training forward 1.81 vs 2.23 and 4.53 vs 5.34, forward + backward 8.42 vs 8.83 and 19.32 vs 20.11;
    docs/kernels.md) and its every build passed the GPU check. fp32 keeps the
    four kernels (its merged build spills 1-4 KB per thread on sm_90 and is untimed). GDN2_TRITON_MERGED=1 / 0 (read
    per call) forces either; K plays no part (the check covers K = 256)."""
    choice = _switch(SWITCHES["merged"], {"0": "intra, exact_diag, solve and wy kernels", "1": "one merged wy kernel"})
    if choice is None:
        return dtype in (torch.bfloat16, torch.float16)
    return choice


# The walk applying A pays one more [64, 64] x [64, BV] product per chunk step on its sequential path, and saves the
# merged kernel its second half (Y = A E, U = A Z); that pays only where many walks run side by side. H100, bf16,
# H = Hv = 16, K = V = 128 (tenth session, bench rows infer_fwd_merged / infer_fwd_apply_a, results/bench/
# bench-session10-*): 1.48 vs 1.62 ms at B=8, T=4096 (128 sequences x value heads); 5.73 vs 4.15 at B=1, T=65536 (16);
# eleventh session (bench-session11-*): 1.93 vs 1.75 at B=2, T=16384 (32), so it stays off there too.
APPLY_A_MIN_WALKS = 128


def use_walk_applying_a(dtype: torch.dtype, K: int, n_walks: int) -> bool:
    """Whether the inference walk applies A itself, R = A (Z - E S_0), so the merged wy kernel stores E and forms
    neither Y = A E nor U = A Z (chunk_fwd.chunk_forward's apply_a). By default where it measured faster: with the
    merged kernel and the output inside the walk (their defaults for 16-bit inputs, K <= 128) and at least
    APPLY_A_MIN_WALKS sequences x value heads (n_walks). GDN2_TRITON_WALK_APPLIES_A=1 / 0 forces it on or off;
    chunk_forward refuses =1, naming the switches, where the variant cannot run (no merged kernel, the split output,
    or no state-kernel config that fits)."""
    choice = _switch(SWITCHES["walk_applies_a"], {"0": "the wy kernel forms Y and U", "1": "the walk applies A"})
    if choice is not None:
        return choice
    return (n_walks >= APPLY_A_MIN_WALKS and use_merged_kernel(dtype, K) and use_fused_output(dtype, K)
            and walk_can_apply_a(dtype, K))


def inference_forward(q, k, v, g, b, w, rq, rk, h0, scale, layout, use_l2, output_final_state):
    K = q.shape[-1]
    n_walks = (layout[0].numel() - 1) * v.shape[1]                   # sequences x value heads
    o, ht, _ = chunk_forward(q, k, v, g, b, w, rq, rk, h0, scale, layout, use_l2, output_final_state,
                             fuse_output=use_fused_output(v.dtype, K), for_backward=False,
                             merged=use_merged_kernel(v.dtype, K), apply_a=use_walk_applying_a(v.dtype, K, n_walks))
    return o, ht
