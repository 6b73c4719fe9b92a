r"""The output kernel: O = Q S_0 + Aqk R per chunk, chunk-parallel, from the per-chunk states S_0 and R that the state
kernel stored (the forward where the plan keeps the output out of the state kernel: fp32 inputs, K > 128).

  gdn2_fwd_kernel_output  grid (V blocks, chunks, value heads): one [64, 64] x [64, BV] product and K/BK products
                          [64, BK] x [BK, BV] per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdn2.ops.triton.tiles import chunk_span, state_block, store_tile, tile
from gdn2.ops.triton.utils import SERIAL_PRECISION, block_sizes, tuned

OUTPUT_CONFIGS = [
    triton.Config({"BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BV": 32}, num_warps=4, num_stages=2),
    triton.Config({"BV": 64}, num_warps=8, num_stages=2),
]
OUTPUT_INTERPRET = triton.Config({"BV": 16}, num_warps=4, num_stages=1)


@tuned(OUTPUT_CONFIGS, key=["K", "V", "HV", "PREC"], interpret_config=OUTPUT_INTERPRET, dtype_arg="R")
@triton.jit
def gdn2_fwd_kernel_output(Qg, Aqk, hs, R, o, cu_seqlens, chunk_indices,
                           H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, PREC: tl.constexpr):
    i_v, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    i_t, bos, eos = chunk_span(chunk_indices, cu_seqlens, i_c)
    t = bos + i_t * 64 + tl.arange(0, 64)
    v0 = i_v * BV
    cv = v0 + tl.arange(0, BV)
    dt = R.dtype.element_ty
    ph = hs + (i_c * HV + i_hv) * K * V
    acc = tl.dot(tile(Aqk + i_h * 64, t, eos, H * 64, 0, 64, 64).to(dt), tile(R + i_hv * V, t, eos, HV * V, v0, V, BV),
                 input_precision=PREC)
    for k0 in range(0, K, BK):
        acc += tl.dot(tile(Qg + i_h * K, t, eos, H * K, k0, K, BK), state_block(ph, k0, cv, K, V, BK),
                      input_precision=PREC)
    store_tile(o + i_hv * V, acc, t, eos, HV * V, v0, V, BV)


def output_forward(Qg, Aqk, hs, R, layout, K: int):
    """The output launch: o [TT, Hv, V] in R's dtype from the per-chunk states hs [NC, Hv, K, V] and R [TT, Hv, V]."""
    cu, chunk_indices, _, n_chunks = layout
    H = Qg.shape[1]
    HV, V = R.shape[1], R.shape[2]
    BK, _ = block_sizes(K, V)
    o = torch.empty_like(R)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_chunks, HV)
    gdn2_fwd_kernel_output[grid](Qg, Aqk, hs, R, o, cu, chunk_indices, H=H, HV=HV, K=K, V=V, BK=BK,
                                 PREC=SERIAL_PRECISION)
    return o
