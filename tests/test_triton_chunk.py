"""Our GDN-2 Triton chunk kernels under TRITON_INTERPRET=1 (CPU, fp32) against the float64 token-serial recurrence.

Bounds: relative RMSE (||x - ref|| / ||ref||) <= 1e-4. The interpreter computes every tl.dot in fp32 (numpy), so
the only error is fp32 rounding through a 64-step solve and a few chunks of recurrence (seen: ~1e-6); 1e-4 leaves
room for platforms with different summation orders while still failing any wrong index, mask or gate (those give
errors of order 1e-1 .. 1).
"""
import contextlib
import re
import sys

import pytest
import torch
import triton
import triton.language as tl

from gdn2.ops.chunk import chunk_gdn2
from gdn2.ops.naive import naive_recurrent_gdn2
from gdn2.ops.triton.dispatch import APPLY_A_MIN_WALKS, plan_forward, planned_as
from gdn2.ops.triton.fwd_matrices import unit_lower_inverse16
from gdn2.ops.triton.gates import CHUNK_SPAN, MIDPOINT_G_MIN

pytestmark = pytest.mark.filterwarnings("ignore")
TOL = 1e-4


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, HV, K, V, N, normalise, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if normalise:
        q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -torch.rand(B, T, H, K, generator=gen) * torch.rand(1, 1, 1, K, generator=gen) * 2    # some fast channels
    b = torch.rand(B, T, H, K, generator=gen)
    w = torch.rand(B, T, HV, V, generator=gen)
    h0 = torch.randn(N, HV, K, V, generator=gen)
    return q, k, v, g, b, w, h0


CASES = [
    # (B, T, H, HV, K, V, l2norm, cu_seqlens)           what it covers
    (1, 1, 1, 1, 16, 16, False, None),                   # T = 1
    (2, 65, 1, 2, 16, 32, False, None),                  # T = C + 1, batch, grouped value heads, K != V
    (1, 130, 2, 2, 32, 16, True, None),                  # three chunks, fused L2-norm, K > V
    (1, 150, 1, 1, 16, 16, False, [0, 1, 66, 150]),      # varlen: lengths 1, 65, 84
    (1, 70, 1, 2, 256, 32, True, None),                  # K = 256: four K blocks of 64 in the sequential kernels
    (1, 100, 1, 1, 80, 48, False, [0, 37, 100]),         # K = 80: a partial second K block, V not a power of 2
]


def assert_forward_backward_match(inputs, l2=False, cu=None):
    """Our Triton chunk path (output, final state, every gradient: q, k, v, g, b, w, h0) against float64 autograd
    through the token-serial recurrence, on the same inputs and upstream gradients. Returns our (o, ht)."""
    ours = [x.clone().requires_grad_() for x in inputs]
    o, ht = chunk_gdn2(*ours[:6], initial_state=ours[6], output_final_state=True, use_qk_l2norm_in_kernel=l2,
                       cu_seqlens=cu, backend="triton")
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    ((o * do).sum() + (ht * dht).sum()).backward()
    ref = [x.double().clone().requires_grad_() for x in inputs]
    ro, rh = naive_recurrent_gdn2(*ref[:6], initial_state=ref[6], output_final_state=True,
                                  use_qk_l2norm_in_kernel=l2, cu_seqlens=cu)
    ((ro * do.double()).sum() + (rh * dht.double()).sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert rel(o, ro) < TOL
    assert rel(ht, rh) < TOL
    for name, a, r in zip(["q", "k", "v", "g", "b", "w", "h0"], ours, ref, strict=False):
        assert torch.isfinite(a.grad).all(), name
        assert rel(a.grad, r.grad) < TOL, (name, rel(a.grad, r.grad))
    return o, ht


@pytest.mark.parametrize("B,T,H,HV,K,V,l2,cu", CASES)
def test_forward_backward_vs_float64_recurrence(B, T, H, HV, K, V, l2, cu):
    cu = torch.tensor(cu) if cu is not None else None
    N = B if cu is None else len(cu) - 1
    inputs = make_inputs(B, T, H, HV, K, V, N, not l2, seed=T + K)
    o, ht = assert_forward_backward_match(inputs, l2, cu)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32


def test_float16_storage_on_the_16bit_plan_and_the_bfloat16_warning():
    """16-bit storage through the interpreter: float16 q, k, v, b, w on the plan 16-bit inputs get (g, h0 fp32), output,
    final state and every gradient against the float64 recurrence on the same (rounded) inputs. Bound 2e-3, four
    times float16's unit roundoff (4.9e-4), to which the stored intermediates and the outputs are rounded (seen:
    3.2e-4 .. 4.7e-4). bfloat16 inputs, which the interpreter's tl.dot cannot compute, are warned about."""
    from gdn2.ops.triton.chunk import BF16_UNDER_INTERPRETER

    q, k, v, g, b, w, h0 = make_inputs(1, 130, 1, 2, 32, 16, 1, True, seed=21)
    half = [x.half().requires_grad_() for x in (q, k, v)] + [g.clone().requires_grad_()]
    half += [x.half().requires_grad_() for x in (b, w)] + [h0.clone().requires_grad_()]
    o, ht = chunk_gdn2(*half[:6], initial_state=half[6], output_final_state=True, backend="triton")
    assert o.dtype == torch.float16
    do, dht = torch.randn(o.shape), torch.randn(ht.shape)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    ref = [x.detach().double().requires_grad_() for x in half]
    ro, rh = naive_recurrent_gdn2(*ref[:6], initial_state=ref[6], output_final_state=True)
    ((ro * do.double()).sum() + (rh * dht.double()).sum()).backward()
    assert rel(o, ro) < 2e-3 and rel(ht, rh) < 2e-3
    for name, a, r in zip(["q", "k", "v", "g", "b", "w", "h0"], half, ref, strict=True):
        assert rel(a.grad, r.grad) < 2e-3, (name, rel(a.grad, r.grad))
    with pytest.warns(RuntimeWarning, match=re.escape(BF16_UNDER_INTERPRETER)):
        chunk_gdn2(*(x.detach().bfloat16() if x.dtype == torch.float16 else x.detach() for x in half[:6]),
                   backend="triton")


def test_inference_forward_no_state_no_grad():
    """The no-grad path (inference forward) matches too, without an initial state and without the final state."""
    q, k, v, g, b, w, _ = make_inputs(1, 100, 1, 2, 16, 16, 1, True, seed=3)
    with torch.no_grad():
        o, ht = chunk_gdn2(q, k, v, g, b, w, backend="triton")
    ro, _ = naive_recurrent_gdn2(*(x.double() for x in (q, k, v, g, b, w)))
    assert ht is None
    assert rel(o, ro) < TOL


def inference_matches(q, k, v, g, b, w, h0, cu=None, l2=False):
    """The no-grad path (inference forward) with an initial state and the final state out, against the float64
    recurrence on the same inputs."""
    with torch.no_grad():
        o, ht = chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                           use_qk_l2norm_in_kernel=l2, backend="triton")
    ro, rh = naive_recurrent_gdn2(*(x.double() for x in (q, k, v, g, b, w)), initial_state=h0.double(),
                                  output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=l2)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert rel(o, ro) < TOL, rel(o, ro)
    assert rel(ht, rh) < TOL, rel(ht, rh)


def growing_decay(T, K, seed):
    """g [1, T, 1, K]: decay rates that differ by channel (0 .. 8) and grow along the sequence (x 0.05 .. 1.5), so early
    chunks have no channel whose G spans more than CHUNK_SPAN and later ones have both kinds."""
    rate = torch.linspace(0, 8, K) * torch.linspace(0.05, 1.5, T)[:, None]                 # [T, K]
    return -torch.rand(1, T, 1, K, generator=torch.Generator().manual_seed(seed)) * rate[None, :, None, :]


class Recording:
    """Stands in for a chunk kernel in its module: notes the launch by its CHUNK_KERNELS name, then launches it."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(self.name)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    """The chunk kernels the test launches, by their CHUNK_KERNELS names, in launch order."""
    from gdn2.ops.triton.chunk import CHUNK_KERNELS

    seen = []
    for name, kernel in CHUNK_KERNELS.items():
        python_fn = kernel.fn.fn                                  # under the jit (or interpreter) wrapper
        monkeypatch.setattr(sys.modules[python_fn.__module__], python_fn.__name__, Recording(kernel, name, seen))
    return seen


def forward_launches(seen):
    """The forward's share of a launch record (one call each)."""
    return tuple(name for name in seen if name.startswith("fwd_"))


def plan_of(dtype, K, n_walks, training):
    return plan_forward(dtype, K, n_walks, training)


def test_plan_forward_is_the_decision_table():
    """The rows of dispatch.py's table: fp32 runs the three chunk-local kernels and the output kernel; 16-bit inputs
    form A in the wy kernel; with K <= 128 the state kernel computes the output; in inference from APPLY_A_MIN_WALKS
    walks on it applies A too. Training always keeps the intermediates for the backward."""
    separate = ("fwd_intra", "fwd_exact_diag", "fwd_solve", "fwd_wy", "fwd_state", "fwd_output")
    for training in (False, True):
        for n_walks in (1, APPLY_A_MIN_WALKS):
            assert plan_of(torch.float32, 128, n_walks, training).launches() == separate
            assert plan_of(torch.bfloat16, 256, n_walks, training).launches() == ("fwd_wy", "fwd_state", "fwd_output")
            assert plan_of(torch.float16, 128, n_walks, training).launches() == ("fwd_wy", "fwd_state")
            assert plan_of(torch.bfloat16, 64, n_walks, training).keep_for_backward == training
    assert plan_of(torch.bfloat16, 128, APPLY_A_MIN_WALKS, False).state_applies_a
    assert not plan_of(torch.bfloat16, 128, APPLY_A_MIN_WALKS - 1, False).state_applies_a
    assert not plan_of(torch.bfloat16, 128, APPLY_A_MIN_WALKS, True).state_applies_a
    assert not plan_of(torch.bfloat16, 256, APPLY_A_MIN_WALKS, False).state_applies_a
    assert not plan_of(torch.float32, 128, APPLY_A_MIN_WALKS, False).state_applies_a
    # the per-chunk states are stored for the output kernel or the backward, and only then
    assert not plan_of(torch.bfloat16, 128, 1, False).store_states
    assert plan_of(torch.bfloat16, 128, 1, True).store_states and plan_of(torch.float32, 128, 1, False).store_states


def test_planned_as_stands_in_for_dtype_and_walks_inside_its_block_only():
    """planned_as plans as if the inputs had the dtype and walks given, inside its block only (also when the block
    raises); nested blocks keep the outer one's other field; bad values are refused, naming the accepted ones."""
    with pytest.raises(RuntimeError, match="inside"):
        with planned_as(torch.bfloat16):
            assert plan_of(torch.float32, 128, 1, False).launches() == ("fwd_wy", "fwd_state")
            with planned_as(n_walks=APPLY_A_MIN_WALKS):
                assert plan_of(torch.float32, 128, 1, False).state_applies_a
            assert not plan_of(torch.float32, 128, 1, False).state_applies_a
            raise RuntimeError("inside")
    assert plan_of(torch.float32, 128, 1, False).launches()[0] == "fwd_intra"
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16, torch.float16 or torch.float32"):
        with planned_as(torch.int8):
            pass
    with pytest.raises(ValueError, match="n_walks must be >= 1"):
        with planned_as(n_walks=0):
            pass


def test_walks_are_sequences_times_value_heads():
    """A call's plan counts its walks as sequences x value heads, varlen sequences one each: the state kernel
    applies A from APPLY_A_MIN_WALKS on (bf16 inputs, no kernel runs here)."""
    from gdn2.ops.triton.chunk import plan_for
    from gdn2.ops.triton.utils import sequence_layout

    hv = APPLY_A_MIN_WALKS // 2
    v = torch.empty(2 * 70, hv, 16, dtype=torch.bfloat16)
    assert plan_for(v, 128, sequence_layout(None, 2, 70, "cpu"), training=False).state_applies_a        # 2 x hv
    assert not plan_for(v, 128, sequence_layout(None, 1, 140, "cpu"), training=False).state_applies_a   # 1 x hv
    varlen = sequence_layout(torch.tensor([0, 40, 140]), 1, 140, "cpu")
    assert plan_for(v, 128, varlen, training=False).state_applies_a                                     # 2 x hv
    assert not plan_for(v, 128, varlen, training=True).state_applies_a


def test_training_on_the_16bit_plan(launches):
    """The 16-bit training forward (A formed in the wy kernel, the output inside the state kernel, which still stores
    the per-chunk states and R for the backward; the wy kernel counts n_exact, which the backward's exact_diag kernel
    reads): the strong-decay input (every sub-chunk with channels on both forms of the diagonal blocks, and wide
    channels in the wy kernel) checks every gradient against float64; then K = 80, varlen, grouped value heads and the
    fused L2-norm. Storing n_exact as 0 fails this test."""
    q, k, v, g, b, w, h0 = make_inputs(1, 100, 1, 1, 32, 16, 1, True, seed=5)
    g = g * 15
    assert (-g[0, :64, 0].sum(0) > CHUNK_SPAN.value).any()
    with planned_as(torch.bfloat16):
        assert_forward_backward_match((q, k, v, g, b, w, h0))
        assert forward_launches(launches) == ("fwd_wy", "fwd_state")
        assert_forward_backward_match(make_inputs(1, 140, 1, 2, 80, 16, 2, False, seed=37), l2=True,
                                      cu=torch.tensor([0, 50, 140]))


def test_the_16bit_plan_at_K256(launches):
    """16-bit inputs with K = 256 (four K blocks of 64 in the state kernel): A formed in the wy kernel, the per-chunk
    states and the output kernel, in training (every gradient) and in inference, against float64."""
    inputs = make_inputs(1, 70, 1, 1, 256, 16, 1, True, seed=43)
    with planned_as(torch.bfloat16):
        assert_forward_backward_match(inputs)
        assert forward_launches(launches) == ("fwd_wy", "fwd_state", "fwd_output")
        launches.clear()
        inference_matches(*inputs)
    assert forward_launches(launches) == ("fwd_wy", "fwd_state", "fwd_output")


def test_inference_on_the_16bit_plan(launches):
    """The 16-bit inference forward below APPLY_A_MIN_WALKS walks: the wy kernel forms T, Aqk and A = (I + T)^-1 itself
    (fwd_wy.chunk_pairs and fwd_matrices.solve_chunk), the state kernel computes the output. K = 80 (a full and a
    partial K block), varlen, grouped value heads, fused L2-norm, initial and final state, against float64."""
    q, k, v, g, b, w, h0 = make_inputs(1, 140, 1, 2, 80, 16, 2, False, seed=19)
    with planned_as(torch.bfloat16):
        inference_matches(q, k, v, g, b, w, h0, cu=torch.tensor([0, 50, 140]), l2=True)
    assert forward_launches(launches) == ("fwd_wy", "fwd_state")


def test_inference_with_the_state_kernel_applying_a():
    """The 16-bit inference forward from APPLY_A_MIN_WALKS walks on: the wy kernel stores E and the state kernel forms
    R = A (w * v - E S_0) itself. K = 80, varlen, grouped value heads, fused L2-norm, initial and final state; then the
    wide-channel input of the test below. Against float64."""
    q, k, v, g, b, w, h0 = make_inputs(1, 140, 1, 2, 80, 16, 2, False, seed=29)
    with planned_as(torch.bfloat16, n_walks=APPLY_A_MIN_WALKS):
        inference_matches(q, k, v, g, b, w, h0, cu=torch.tensor([0, 50, 140]), l2=True)
        q, k, v, _, b, w, h0 = make_inputs(1, 230, 1, 1, 32, 16, 1, True, seed=31)
        inference_matches(q, k, v, growing_decay(230, 32, seed=2), b, w, h0)


def test_wy_kernel_wide_channels():
    """The wy kernel's two forms of exp(G_r - G_s): the chunk-level midpoint on channels whose G moves by at most
    CHUNK_SPAN over a chunk, the exact row-by-row form on the others ("wide"). Decay rates differ by channel and grow
    along the sequence, so the first chunk has no wide channel, the later ones have both kinds in the same K block (one
    channel also has g > 0 on a few tokens). Leaving out the exact form, or taking the midpoint form up to a span of
    300 (its factors overflow), fails this test."""
    q, k, v, _, b, w, h0 = make_inputs(1, 230, 1, 1, 32, 16, 1, True, seed=23)
    g = growing_decay(230, 32, seed=1)
    g[0, 150:154, 0, 3] = 0.5
    chunk_sums = torch.nn.functional.pad(g[0, :, 0], (0, 0, 0, 26)).reshape(4, 64, 32).sum(1)     # [chunks, K]
    wide = chunk_sums < -CHUNK_SPAN.value
    assert not wide[0].any() and wide[1:].any(-1).all() and (~wide[1:]).any(-1).all()
    with planned_as(torch.bfloat16):
        inference_matches(q, k, v, g, b, w, h0)


@pytest.mark.parametrize("n_walks", [1, APPLY_A_MIN_WALKS])
def test_wy_kernel_in_every_k_block_of_its_configs(n_walks):
    """The wy kernel forming A with each K block its launch configs use (BK = 64 and 32; the interpreter runs one
    config, so each is pinned here), on K = 80 (a partial last block) with wide and normal channels in the same block
    and grouped value heads, with and without the state kernel applying A: against float64."""
    from gdn2.ops.triton.fwd_wy import WY_CONFIGS, gdn2_fwd_kernel_wy
    from gdn2.ops.triton.utils import pin_config

    q, k, v, _, b, w, h0 = make_inputs(1, 230, 1, 2, 80, 16, 1, True, seed=41)
    g = growing_decay(230, 80, seed=3)
    block_sizes = sorted({config.kwargs["BK"] for config in WY_CONFIGS})
    assert block_sizes == [32, 64]
    try:
        with planned_as(torch.bfloat16, n_walks=n_walks):
            for bk in block_sizes:
                pin_config(gdn2_fwd_kernel_wy, triton.Config({"BK": bk}, num_warps=4, num_stages=1))
                inference_matches(q, k, v, g, b, w, h0)
    finally:
        pin_config(gdn2_fwd_kernel_wy, None)


def test_strong_decay_does_not_overflow():
    """g as low as -30 per token: exp(G_r - G_s) for s > r would overflow if formed as gamma_r / gamma_s. The
    channels' decay rates differ, so every 16-row sub-chunk has channels on both forms of the diagonal blocks (the
    midpoint form where g stays in [MIDPOINT_G_MIN, 0], the exact row-by-row form elsewhere), in the forward and the
    backward."""
    q, k, v, g, b, w, h0 = make_inputs(1, 100, 1, 1, 32, 16, 1, True, seed=5)
    g = g * 15
    sub = torch.nn.functional.pad(g[0, :, 0], (0, 0, 0, 28)).reshape(8, 16, 32)[:7]      # the 7 sub-chunks with data
    midpoint = sub.amin(1) >= MIDPOINT_G_MIN.value
    assert midpoint.any(-1).all() and (~midpoint).any(-1).all()
    assert_forward_backward_match((q, k, v, g, b, w, h0))


@pytest.mark.parametrize("as_dtype", [None, torch.bfloat16])
def test_unwritten_outputs_are_caught(monkeypatch, as_dtype):
    """Poison every buffer the kernels allocate (torch.empty -> NaN): any element they fail to write shows as NaN. On
    the fp32 plan and on the 16-bit one."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        x = real_empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: real_empty(x.shape, dtype=x.dtype).fill_(float("nan")))
    inputs = make_inputs(1, 80, 1, 2, 16, 16, 1, True, seed=9)
    ours = [x.clone().requires_grad_() for x in inputs]
    with planned_as(as_dtype):
        o, ht = chunk_gdn2(*ours[:6], initial_state=ours[6], output_final_state=True, backend="triton")
        (o.sum() + ht.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    for x in ours:
        assert torch.isfinite(x.grad).all()


@triton.jit
def _invert16(T_ptr, out_ptr):
    """Program i: out[i] = (I + T[i])^-1 for a [N, 16, 16] stack."""
    r16 = tl.arange(0, 16)
    offs = tl.program_id(0) * 256 + r16[:, None] * 16 + r16[None, :]
    tl.store(out_ptr + offs, unit_lower_inverse16(tl.load(T_ptr + offs)))


def test_unit_lower_inverse16_matches_float64():
    """The diagonal blocks' [16, 16] inverse (I + T)^-1 by repeated squaring (in the intra and exact_diag kernels),
    against float64 torch.linalg.inv: random blocks, blocks shaped like the kernel's (b k . k of unit keys) and blocks
    whose inverse grows to ~1e4 (T near -1 below the diagonal). A CPU comparison of the same formula in torch fp32
    gave <= 1.6e-7 in every family; dropping its last factor (I + P^8) gives 3.7e-3 here, so 1e-6 separates the two."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(64, 16, 128, generator=gen), dim=-1)
    families = {
        "random": torch.randn(64, 16, 16, generator=gen) * 0.3,
        "kernel-like": (torch.rand(64, 16, 1, generator=gen) * keys) @ keys.transpose(-1, -2),
        "growing": -torch.rand(64, 16, 16, generator=gen) * 0.1 - 0.9,
    }
    for name, block in families.items():
        T = torch.tril(block, -1).float().contiguous()
        out = torch.empty_like(T)
        _invert16[(T.shape[0],)](T, out)
        ref = torch.linalg.inv(torch.eye(16, dtype=torch.float64) + T.double())
        err = ((out.double() - ref).norm(dim=(-1, -2)) / ref.norm(dim=(-1, -2))).max().item()
        assert err <= 1e-6, (name, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2norm_kernels_equal_float64_autograd(dtype):
    """The fused L2-norm's two passes (gdn2/ops/triton/l2norm.py): r = 1/sqrt(|x|^2 + eps) and the gradient of
    x * r, against float64 autograd; 37 rows (not a multiple of the kernel's 16) of K = 80 (not a power of two), and
    dx comes back in x's dtype."""
    from gdn2.ops.triton.l2norm import inverse_norms, l2norm_vjp
    from gdn2.ops.triton.utils import L2NORM_EPS

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 80, generator=gen) * torch.rand(37, 1, generator=gen) * 3).to(dtype)
    grad_hat = torch.randn(37, 80, generator=gen)
    ref_x = x.double().requires_grad_()
    ref_r = (ref_x.square().sum(-1) + L2NORM_EPS).rsqrt()
    (ref_x * ref_r[:, None]).backward(grad_hat.double())
    r = inverse_norms(x)
    dx = l2norm_vjp(x, r, grad_hat)
    assert r.dtype == torch.float32 and dx.dtype == dtype
    assert rel(r, ref_r) < 1e-6
    assert rel(dx, ref_x.grad) < (1e-6 if dtype == torch.float32 else 4e-3)     # bf16: the output's rounding


@pytest.mark.parametrize("bf16_plan", [False, True])
def test_recompute_in_backward_keeps_only_inputs_and_gives_the_same_gradients(bf16_plan):
    """recompute_in_backward: the Function keeps its packed inputs alone (q, k, v, g, b, w, the inverse norms, h0)
    and its backward reruns the training forward. Its gradients are bit-identical to keeping the intermediates (the
    backward reads the same intermediates), its output equals the keeping path's within fp32 rounding (the forward
    ran the inference plan), and both match the float64 recurrence. Three chunks, fused L2-norm, grouped value
    heads; on the fp32 and the 16-bit launch plans."""
    from benchmarks.saved_bytes import kept_bytes

    inputs = make_inputs(1, 150, 2, 4, 32, 16, 1, False, seed=11)
    results = {}
    with planned_as(torch.bfloat16) if bf16_plan else contextlib.nullcontext():
        assert_forward_backward_match(inputs, l2=True)
        for recompute in (False, True):
            leaves = [x.clone().requires_grad_() for x in inputs]

            def run(leaves=leaves, recompute=recompute):
                return chunk_gdn2(*leaves[:6], initial_state=leaves[6], output_final_state=True,
                                  use_qk_l2norm_in_kernel=True, backend="triton", recompute_in_backward=recompute)

            nbytes, (o, ht) = kept_bytes(run)
            gen = torch.Generator().manual_seed(0)
            do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
            ((o * do).sum() + (ht * dht).sum()).backward()
            results[recompute] = nbytes, o.detach(), [x.grad for x in leaves]
    inputs_bytes = sum(x.numel() * 4 for x in inputs) + 2 * 150 * 2 * 4     # fp32 inputs + inverse norms of q, k
    assert results[True][0] == inputs_bytes
    assert results[False][0] > 2 * inputs_bytes
    assert rel(results[True][1], results[False][1]) < 1e-6
    for name, a, b in zip(["q", "k", "v", "g", "b", "w", "h0"], results[True][2], results[False][2], strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bf16_plan", [False, True])
def test_recompute_backward_forms_no_output(monkeypatch, bf16_plan):
    """The recompute backward reruns the forward for its intermediates alone: the state kernel does not form O and
    the output kernel does not run there; the call's own forward formed O once."""
    from gdn2.ops.triton import chunk_fwd

    calls = []
    walk, output = chunk_fwd.state_walk, chunk_fwd.output_forward

    def recording_walk(*args):
        calls.append(("state", args[9]))                 # fuse_output
        return walk(*args)

    def recording_output(*args):
        calls.append(("output",))
        return output(*args)

    monkeypatch.setattr(chunk_fwd, "state_walk", recording_walk)
    monkeypatch.setattr(chunk_fwd, "output_forward", recording_output)
    leaves = [x.requires_grad_() for x in make_inputs(1, 70, 1, 2, 16, 16, 1, True, seed=4)]
    with planned_as(torch.bfloat16) if bf16_plan else contextlib.nullcontext():
        o, _ = chunk_gdn2(*leaves[:6], initial_state=leaves[6], backend="triton", recompute_in_backward=True)
        assert calls == ([("state", True)] if bf16_plan else [("state", False), ("output",)])
        calls.clear()
        o.sum().backward()
    assert calls == [("state", False)]


class RecordingKernel:
    """Stands in for a triton.jit function: records warmup() calls (what compile_in_parallel asks to compile)."""
    __name__ = "recording"

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def warmup(self, grid, **kwargs):
        if self.fail:
            raise RuntimeError("no driver")
        self.calls.append(kwargs)


def test_config_pruner_compiles_the_kept_configs_with_the_launch_arguments():
    """Parallel compile (GDN2_TRITON_PARALLEL_COMPILE): the autotuner's prune hook keeps the configs that fit and,
    when asked, compiles each of them with the launch's own arguments (the autotuner's grid and warmup flags dropped)
    before the timing runs; without the flag it compiles nothing; a failing compile is reported and the configs are
    still returned."""
    from gdn2.ops.triton.utils import compile_in_parallel, config_pruner

    configs = [triton.Config({"BV": 32}, num_warps=4), triton.Config({"BV": 64}, num_warps=8),
               triton.Config({"BV": 128}, num_warps=8)]
    fits = lambda config, dtype, K: config.kwargs["BV"] <= K   # noqa: E731
    v = torch.zeros(4, dtype=torch.bfloat16)
    kernel = RecordingKernel()
    prune = config_pruner(kernel, fits, "v", (), parallel_compile=True)
    kept = prune(configs, {"v": v, "T": 16}, K=64, grid=(3,), warmup=False)
    assert kept == configs[:2]
    assert [c["BV"] for c in kernel.calls] == [32, 64] and [c["num_warps"] for c in kernel.calls] == [4, 8]
    assert all(c["v"] is v and c["T"] == 16 and c["K"] == 64 and "warmup" not in c for c in kernel.calls)
    quiet = RecordingKernel()
    assert config_pruner(quiet, fits, "v", (), parallel_compile=False)(configs, {"v": v}, K=64) == configs[:2]
    assert quiet.calls == []
    with pytest.warns(RuntimeWarning, match="parallel compile of recording failed"):
        assert not compile_in_parallel(RecordingKernel(fail=True), configs, {"v": v}, {"K": 64})
    assert not compile_in_parallel(kernel, configs[:1], {"v": v}, {})    # one config: nothing to overlap


def test_dav_takes_no_value_block_wider_than_the_value_width():
    """At heads of 32 (V = 32) dav's launches keep only its BV=32 entries (a BV=64 block would compute on masked
    columns only); at V = 64 and 128 every entry; a launch without V (the GPU checker's call) keeps every entry."""
    from gdn2.ops.triton.chunk_bwd import DAV_CONFIGS, dav_fits
    from gdn2.ops.triton.utils import configs_that_fit

    do = torch.zeros(1, dtype=torch.bfloat16)
    kept = {V: configs_that_fit(DAV_CONFIGS, dav_fits, "do", ("V",), {"do": do, "V": V}) for V in (32, 64, 128)}
    assert [c.kwargs["BV"] for c in kept[32]] == [32, 32] and kept[64] == kept[128] == DAV_CONFIGS
    assert all(dav_fits(c, torch.bfloat16, 128) for c in DAV_CONFIGS)


def test_autotuner_times_each_config_with_the_tune_budget(monkeypatch):
    """GDN2_TRITON_TUNE_MS ('WARMUP,REP' ms) reaches triton.testing.do_bench for every timed config; anything but two
    positive integers is refused with the expected form in the message."""
    from gdn2.ops.triton import utils

    assert utils._tune_ms("5,25") == (5, 25) and utils._tune_ms("25,100") == (25, 100)
    for bad in ("5", "5,0", "a,b", "5,25,1", "-1,25"):
        with pytest.raises(ValueError, match=r"GDN2_TRITON_TUNE_MS must be 'WARMUP,REP'.*got"):
            utils._tune_ms(bad)
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(kw) or [1.0, 0.9, 1.1])
    monkeypatch.setattr(utils, "TUNE_WARMUP_MS", 7)
    monkeypatch.setattr(utils, "TUNE_REP_MS", 30)
    assert utils._time_config(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert calls == [dict(warmup=7, rep=30, quantiles=(0.5, 0.2, 0.8))]


@pytest.mark.parametrize("recompute_chunk", [False, True])
def test_recompute_g_keeps_no_copy_of_g_and_gives_the_same_gradients(monkeypatch, recompute_chunk):
    """recompute_g: with g the decay gate's output, the Function keeps no copy of g (exactly g's bytes fewer) and
    calls the function in its backward; every gradient (q, k, v, b, w, h0 and, through g, f, A_log and dt_bias) is
    bit-identical to keeping g, with and without recompute_in_backward. The decay gate runs its Triton kernel in
    both passes (the interpreter here, as on a GPU)."""
    import functools

    import gdn2.fused
    from benchmarks.saved_bytes import kept_bytes

    monkeypatch.setattr(gdn2.fused, "_backend", lambda x, backend: "triton")
    q, k, v, _, b, w, h0 = make_inputs(1, 150, 2, 4, 32, 16, 1, False, seed=12)
    gen = torch.Generator().manual_seed(3)
    f, a_log, dt_bias = torch.randn(1, 150, 64, generator=gen), torch.rand(2, generator=gen), torch.randn(64,
                                                                                                          generator=gen)
    results = {}
    for again in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, b, w, h0, f, a_log, dt_bias)]
        lq, lk, lv, lb, lw, lh0, lf, la, ldt = leaves
        g = gdn2.fused.decay(lf, la, ldt, 32).reshape(1, 150, 2, 32)
        recompute_g = functools.partial(gdn2.fused.decay_again, lf, la, ldt, 32) if again else None

        def run(g=g, recompute_g=recompute_g, lq=lq, lk=lk, lv=lv, lb=lb, lw=lw, lh0=lh0):
            return chunk_gdn2(lq, lk, lv, g, lb, lw, initial_state=lh0, output_final_state=True,
                              use_qk_l2norm_in_kernel=True, backend="triton", recompute_in_backward=recompute_chunk,
                              recompute_g=recompute_g)

        nbytes, (o, ht) = kept_bytes(run)
        out = torch.Generator().manual_seed(0)
        do, dht = torch.randn(o.shape, generator=out), torch.randn(ht.shape, generator=out)
        ((o * do).sum() + (ht * dht).sum()).backward()
        results[again] = nbytes, o.detach(), [x.grad for x in leaves]
    assert results[False][0] - results[True][0] == 150 * 64 * 4           # g: fp32 [1, 150, 2, 32]
    assert torch.equal(results[True][1], results[False][1])
    names = ["q", "k", "v", "b", "w", "h0", "f", "A_log", "dt_bias"]
    for name, a, b_ in zip(names, results[True][2], results[False][2], strict=True):
        assert torch.equal(a, b_), name
