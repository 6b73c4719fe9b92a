r"""GDN-2 inference-only (prefill) forward: no autograd, nothing kept for a backward.

The same four launches as the training forward (chunk_fwd.chunk_forward: intra -> wy -> state -> output); the
intermediates (A, Aqk, Y, Q, Kt, U, R and the per-chunk states) are freed on return. The per-chunk states are
written by the sequential state kernel and read once by the chunk-parallel output kernel: 2 x NC x Hv x K x V bytes
in bf16 (0.27 GB written and read at B=8, T=4096, H=16, K=V=128; about 0.18 ms of traffic at 3 TB/s), the price of
keeping the output's two products (Q S_0 and Aqk R) off the sequential path. docs/kernels.md weighs this against the
"no per-chunk states" design goal of the first version. GDN2_TRITON_INFER_FUSED=1 selects the other side of that
trade: the state kernel computes O itself (two more products per chunk step on the sequential path) and no per-chunk
state or R is written; the benchmark times both.
"""
from __future__ import annotations

import os

from gdn2.ops.triton.chunk_fwd import chunk_forward


def fused_output_requested() -> bool:
    """GDN2_TRITON_INFER_FUSED=1 (read per call): the output inside the sequential walk, no per-chunk states."""
    return os.environ.get("GDN2_TRITON_INFER_FUSED", "0") == "1"


def inference_forward(q, k, v, g, b, w, rq, rk, h0, scale, layout, use_l2, output_final_state):
    o, ht, _ = chunk_forward(q, k, v, g, b, w, rq, rk, h0, scale, layout, use_l2, output_final_state,
                             fuse_output=fused_output_requested())
    return o, ht
