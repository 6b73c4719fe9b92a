r"""GDN-2 inference-only (prefill) forward: no autograd, nothing kept for a backward.

Two launches: gdn2_fwd_kernel_intra (chunk-parallel: A = (I + T)^-1 and Aqk per chunk and key head) and
gdn2_fwd_kernel_recurrence with STORE_STATES=False (one program per sequence, value head and V block walks the
chunks, keeping the state in registers and writing only O and the final state). Unlike the training forward, no
per-chunk state [NC, Hv, K, V] is written (64 KiB per chunk and head at K = V = 128); the only transient workspace
is A and Aqk, 2 x 64 values per token and key head (freed on return), because building them needs every chunk's
pairwise decays, which is parallel work the sequential walk should not carry. See chunk_fwd.py for the math.
"""
from __future__ import annotations

import torch

from gdn2.ops.triton.chunk_fwd import intra_forward, recurrence_forward


def inference_forward(q, k, v, g, b, w, rq, rk, h0, scale, layout, use_l2, output_final_state):
    cu, chunk_indices, chunk_offsets, n_chunks = layout
    n_seqs = cu.numel() - 1
    A, Aqk = intra_forward(q, k, g, b, rq, rk, scale, cu, chunk_indices, n_chunks, use_l2)
    o, ht, _ = recurrence_forward(q, k, v, g, b, w, rq, rk, A, Aqk, h0, scale, cu, chunk_offsets, n_chunks, n_seqs,
                                  use_l2, store_final=output_final_state, store_states=False)
    return o, ht
