"""Which launches the chunkwise forward makes: one decision per call, from the inputs.

    plan_forward(dtype, K, n_walks, training) -> ForwardPlan

The forward always runs the wy kernel (the state-independent work of each chunk, fwd_wy.py) and the state kernel
(the sequential walk over the chunks, fwd_state.py). A plan says what else runs and where each product goes:

| inputs                                       | launches                                     | plan fields set   |
|----------------------------------------------|----------------------------------------------|-------------------|
| fp32                                         | intra, exact_diag, solve, wy, state, output  | (none)            |
| 16-bit, K > 128                              | wy, state, output                            | solve_in_wy       |
| 16-bit, K <= 128, training or < 128 walks    | wy, state                                    | + output_in_state |
| 16-bit, K <= 128, inference, >= 128 walks    | wy, state                                    | + state_applies_a |

(walks = sequences x value heads: the state kernel's programs per V block.) Training also sets keep_for_backward:
the state kernel stores the per-chunk states and R, and the wy kernel counts n_exact, for chunk_bwd.py. Why each
row: docs/kernels.md#dispatch. Tests and the GPU check run the 16-bit plans on fp32 inputs too, with
`planned_as(torch.bfloat16)`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch

# The state kernel applying A pays one more [64, 64] x [64, BV] product per chunk on its serial chain and saves the wy
# kernel its second half; that pays only where many walks share the GPU (docs/kernels.md#dispatch).
APPLY_A_MIN_WALKS = 128


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """What each launch of the chunkwise forward computes.

    solve_in_wy: the wy kernel forms T, Aqk and A = (I + T)^-1 itself; otherwise the intra, exact_diag and solve
        kernels do, before it (fwd_matrices.py).
    output_in_state: the state kernel computes O = Q S_0 + Aqk R; otherwise it stores the per-chunk states and R and
        the output kernel computes O from them (fwd_output.py).
    state_applies_a: the state kernel forms R = A (w v - E S_0); the wy kernel stops after A (inference only; needs
        solve_in_wy and output_in_state).
    keep_for_backward: the state kernel stores the per-chunk states and R, the wy kernel counts n_exact (training).
    output: the forward computes O at all; off (without_output) for a backward that reruns the forward for its
        intermediates alone.
    """
    solve_in_wy: bool
    output_in_state: bool
    state_applies_a: bool
    keep_for_backward: bool
    output: bool = True

    def without_output(self) -> ForwardPlan:
        """The same launches with O left out: the state kernel does not form it, the output kernel does not run."""
        return dataclasses.replace(self, output_in_state=False, output=False)

    @property
    def store_states(self) -> bool:
        """Whether the state kernel stores the per-chunk states and R (for the output kernel or the backward)."""
        return self.keep_for_backward or not self.output_in_state

    def launches(self) -> tuple[str, ...]:
        """The forward's kernels in launch order, by their names in CHUNK_KERNELS."""
        matrices = () if self.solve_in_wy else ("fwd_intra", "fwd_exact_diag", "fwd_solve")
        output = () if self.output_in_state or not self.output else ("fwd_output",)
        return (*matrices, "fwd_wy", "fwd_state", *output)


def plan_forward(dtype: torch.dtype, K: int, n_walks: int, training: bool) -> ForwardPlan:
    """The forward's launches for inputs of `dtype` with key width K, n_walks = sequences x value heads, in training
    (autograd) or inference. The decision table of the module docstring; planned_as may stand in for dtype, n_walks."""
    planned = _PLANNED_AS.get() or {}
    dtype, n_walks = planned.get("dtype", dtype), planned.get("n_walks", n_walks)
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    # fp32: the wy kernel forming A spills 1-4 KB per thread on sm_90 (docs/kernels.md#dispatch)
    solve_in_wy = sixteen_bit
    # K = 256 and fp32: fewer state-kernel configs fit with the output inside, and the output kernel measured faster
    output_in_state = sixteen_bit and K <= 128
    state_applies_a = not training and output_in_state and n_walks >= APPLY_A_MIN_WALKS
    return ForwardPlan(solve_in_wy=solve_in_wy, output_in_state=output_in_state, state_applies_a=state_applies_a,
                       keep_for_backward=training)


_PLANNED_AS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("gdn2_planned_as", default=None)


@contextlib.contextmanager
def planned_as(dtype: torch.dtype | None = None, n_walks: int | None = None):
    """Inside the block, plan_forward plans as if the inputs had `dtype` and there were `n_walks` walks (None: the
    real ones). So a test on fp32 CPU inputs runs the launches 16-bit inputs get, e.g. planned_as(torch.bfloat16,
    n_walks=APPLY_A_MIN_WALKS) for the state kernel applying A; only plans that some input gets can be run."""
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"planned_as: dtype must be torch.bfloat16, torch.float16 or torch.float32; got {dtype}")
    if n_walks is not None and n_walks < 1:
        raise ValueError(f"planned_as: n_walks must be >= 1; got {n_walks}")
    given = {"dtype": dtype, "n_walks": n_walks}
    token = _PLANNED_AS.set({**(_PLANNED_AS.get() or {}), **{k: v for k, v in given.items() if v is not None}})
    try:
        yield
    finally:
        _PLANNED_AS.reset(token)
