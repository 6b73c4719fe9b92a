"""Our own GDN-2 Triton kernels (chunkwise forward/backward, inference forward, recurrent decode step).

    triton_chunk_gdn2(q, k, v, g, b, w, scale=None, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=False, cu_seqlens=None) -> (o [B, T, Hv, V], final_state | None)
    triton_recurrent_step_gdn2(q, k, v, g, b, w, state, scale, use_qk_l2norm_in_kernel) -> o [B, T, Hv, V]

See docs/kernels.md for dispatch, the interpreter (TRITON_INTERPRET=1) and the GPU check / benchmark scripts.
"""
from gdn2.ops.triton.chunk import triton_chunk_gdn2
from gdn2.ops.triton.recurrent import triton_recurrent_step_gdn2

__all__ = ["triton_chunk_gdn2", "triton_recurrent_step_gdn2"]
