"""The training path's memory-lean pieces (gdn2/fused.py) against the plain PyTorch expressions they replace, in
float64: chunked linear cross-entropy (loss and both gradients, ignored labels, chunk edges, autocast), RMSNorm,
gated RMSNorm, SwiGLU product, the output norm and projection in one Function, the recomputed short convolution;
and the whole GDN-2 model's loss and every parameter gradient with the fused loss and with block checkpointing
against the plain forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdn2 import GDN2ForCausalLM, named_config
from gdn2.fused import (
    causal_conv_silu,
    gated_rms_norm,
    gated_rms_norm_linear,
    linear_cross_entropy,
    rms_norm,
    rms_norm_linears,
    short_conv_silu,
    silu_mul,
    swiglu_down,
)
from gdn2.layer import ShortConvolution

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: intra-op threads only contend


def grads_of(fn, *tensors):
    """(fn(*leaves), gradients of sum(fn * fixed random weights) wrt every leaf)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_same(a, b, tol=1e-12):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    for ga, gb in zip(grads_a, grads_b, strict=False):
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------ cross-entropy
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, dtype=torch.float64, generator=g)
    weight = torch.randn(37, 16, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 37, (50,), generator=g)
    labels[[0, 3, 4, 49]] = -100
    fused = grads_of(lambda h, w: linear_cross_entropy(h, w, labels, chunk_tokens=chunk), hidden, weight)
    plain = grads_of(lambda h, w: F.cross_entropy(h @ w.t(), labels, ignore_index=-100), hidden, weight)
    assert_same(fused, plain)


def test_linear_cross_entropy_with_every_label_ignored_is_zero_with_zero_gradients():
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0 and not hidden.grad.any() and not weight.grad.any()


def test_linear_cross_entropy_under_autocast_matches_an_autocast_linear():
    """bf16 products as an autocast nn.Linear computes them; fp32 softmax. Tolerance: bf16 rounding of the
    products, summed in another order."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(40, 32, generator=g), torch.randn(64, 32, generator=g) * 0.2
    labels = torch.randint(0, 64, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = grads_of(lambda h, w: linear_cross_entropy(h, w, labels, chunk_tokens=16), hidden, weight)
        plain = grads_of(lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels), hidden, weight)
    assert fused[1][1].dtype == torch.float32
    assert_same(fused, plain, tol=2e-2)


def test_linear_cross_entropy_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"hidden must be \[N, d\] and labels \[N\]"):
        linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.long))


# ------------------------------------------------------------------------------ norms, SwiGLU, conv
def plain_rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
def test_norms_and_swiglu_equal_the_plain_expressions(activation):
    g = torch.Generator().manual_seed(2)
    x, gate, up = (torch.randn(3, 5, 24, dtype=torch.float64, generator=g) for _ in range(3))
    w = 1 + 0.3 * torch.randn(24, dtype=torch.float64, generator=g)
    assert_same(grads_of(lambda x, w: rms_norm(x, w, 1e-5), x, w), grads_of(plain_rms, x, w))
    act = F.silu if activation == "silu" else torch.sigmoid
    assert_same(grads_of(lambda x, z, w: gated_rms_norm(x, z, w, 1e-5, activation), x, gate, w),
                grads_of(lambda x, z, w: plain_rms(x, w) * act(z), x, gate, w))
    assert_same(grads_of(silu_mul, gate, up), grads_of(lambda a, b: F.silu(a) * b, gate, up))


def test_recomputed_short_conv_equals_plain_conv_and_carries_the_cache():
    torch.manual_seed(3)
    conv = ShortConvolution(12, 4).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    cache = torch.randn(2, 12, 3, dtype=torch.float64)
    fused = grads_of(lambda x, c, w: ShortConvolution.forward(_with_weight(conv, w), x, c)[0], x, cache, conv.weight)
    plain = grads_of(lambda x, c, w: causal_conv_silu(x, c, w, None), x, cache, conv.weight)
    assert_same(fused, plain)
    whole = torch.cat([cache, x.transpose(1, 2)], -1)
    for T in (9, 2):
        _, new_cache = conv(x[:, :T], cache)
        assert torch.equal(new_cache, whole[..., T:T + 3])


def _with_weight(conv, weight):
    clone = ShortConvolution(conv.hidden_size, conv.kernel_size).double()
    del clone.weight
    clone.weight = weight
    return clone


# ------------------------------------------------------------------------------ the model
def tiny(seed=0):
    torch.manual_seed(seed)
    return GDN2ForCausalLM(named_config("gdn2-tiny", vocab_size=97, num_hidden_layers=2)).double().train()


def plain_loss(model, ids, labels):
    """The unfused loss: full logits, then cross-entropy of the shifted labels."""
    logits = model(ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def test_model_loss_and_every_gradient_equal_the_plain_path():
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :5] = -100
    results = {}
    for mode in ("plain", "fused", "checkpointed", "chunk recomputed"):
        model = tiny()
        if mode == "checkpointed":
            model.gradient_checkpointing_enable()
        if mode == "chunk recomputed":
            model.chunk_recompute_enable()
        if mode == "plain":
            loss = plain_loss(model, ids, labels)
        else:
            out = model(ids, labels=labels, use_cache=False)
            loss = out.loss
            assert out.logits is None
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    for mode in ("fused", "checkpointed", "chunk recomputed"):
        torch.testing.assert_close(results[mode][0], results["plain"][0], rtol=1e-10, atol=1e-10)
        for name, grad in results["plain"][1].items():
            torch.testing.assert_close(results[mode][1][name], grad, rtol=1e-8, atol=1e-10, msg=name)


def test_chunk_recompute_keeps_less_for_the_backward_pass():
    """chunk_recompute_enable(): each mixer's chunk operator keeps only its inputs (the torch path here, through a
    checkpoint), so the forward pass keeps fewer bytes for the backward than with the intermediates kept."""
    from benchmarks.saved_bytes import kept_bytes

    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    kept = {}
    for recompute in (False, True):
        model = tiny()
        model.chunk_recompute_enable(recompute)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept[recompute], _ = kept_bytes(lambda model=model: model(ids, labels=ids, use_cache=False), exclude=params)
    assert kept[True] < 0.8 * kept[False], kept


def test_model_returns_logits_with_labels_when_autograd_is_off():
    model = tiny().eval()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        out = model(ids, labels=ids)
        assert out.logits.shape == (1, 12, 97)
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:]))


# ------------------------------------------------------------------------------ the Triton kernels (interpreter)
@pytest.mark.parametrize("width", [24, 130])
@pytest.mark.parametrize("activation", [None, "silu", "sigmoid"])
def test_triton_norm_kernels_equal_the_torch_path(width, activation):
    """fp32 inputs: the kernels (Triton's CPU interpreter here) against the torch path of the same Function. Rows
    not a multiple of a tile, widths not a power of two."""
    g = torch.Generator().manual_seed(5)
    x, gate = (torch.randn(37, width, generator=g) for _ in range(2))
    w = 1 + 0.3 * torch.randn(width, generator=g)
    for backend in ("torch", "triton"):
        if activation is None:
            result = grads_of(lambda x, w: rms_norm(x, w, 1e-5, backend=backend), x, w)
        else:
            result = grads_of(lambda x, z, w: gated_rms_norm(x, z, w, 1e-5, activation, backend=backend), x, gate, w)
        if backend == "torch":
            expected = result
    assert_same(result, expected, tol=1e-5)


def test_triton_kernels_keep_dtypes_and_shapes_in_bf16():
    """bf16 activations with an fp32 weight (what autocast hands the norms): outputs and gradients keep the
    inputs' dtypes and shapes, and agree with the torch path to bf16 rounding."""
    g = torch.Generator().manual_seed(6)
    x, gate, up = (torch.randn(2, 5, 3, 64, generator=g).bfloat16() for _ in range(3))
    w = 1 + 0.3 * torch.randn(64, generator=g)
    conv_x, conv_w = torch.randn(2, 9, 64, generator=g).bfloat16(), torch.randn(64, 1, 4, generator=g) * 0.5
    cache = torch.zeros(2, 64, 3, dtype=torch.bfloat16)
    for fn, args in ((lambda x, z, w, b: gated_rms_norm(x, z, w, 1e-5, "silu", backend=b), (x, gate, w)),
                     (lambda x, w, b: rms_norm(x, w, 1e-5, backend=b), (x, w)),
                     (lambda a, u, b: silu_mul(a, u, backend=b), (gate, up)),
                     (lambda c, w, b: short_conv_silu(c, cache, w, None, backend=b), (conv_x, conv_w))):
        out_t, grads_t = grads_of(lambda *t: fn(*t, "triton"), *args)
        out_p, grads_p = grads_of(lambda *t: fn(*t, "torch"), *args)
        assert out_t.dtype == args[0].dtype and out_t.shape == args[0].shape
        torch.testing.assert_close(out_t.float(), out_p.float(), rtol=2e-2, atol=2e-2)
        for gt, gp, arg in zip(grads_t, grads_p, args, strict=False):
            assert gt.dtype == arg.dtype and gt.shape == arg.shape
            torch.testing.assert_close(gt.float(), gp.float(), rtol=3e-2, atol=3e-2)


def test_triton_silu_mul_equals_the_plain_product_in_fp32():
    g = torch.Generator().manual_seed(8)
    gate, up = (torch.randn(3, 4100, generator=g) for _ in range(2))      # more than one block of elements
    assert_same(grads_of(lambda a, b: silu_mul(a, b, backend="triton"), gate, up),
                grads_of(lambda a, b: F.silu(a) * b, gate, up), tol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_norm_output_under_autocast_is_the_autocast_dtype(backend):
    """An fp32 residual stream under bf16 autocast: the norm hands its linears one bf16 tensor (what each would cast
    to anyway), and its input gradient stays fp32."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 32, generator=g, requires_grad=True)
    w = 1 + 0.3 * torch.randn(32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(x, w, 1e-5, backend=backend)
    assert y.dtype == torch.bfloat16
    # within one bf16 unit in the last place: Triton's CPU interpreter narrows to bf16 with its own rounding
    torch.testing.assert_close(y.float(), plain_rms(x.detach(), w).bfloat16().float(), rtol=2 ** -7, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_norm_under_autocast_keeps_x_in_bf16_and_its_gradient_matches_float64(backend):
    """An fp32 residual stream under bf16 autocast: the norm keeps x in bf16 (2 bytes per element, not 4) and 1/rms
    from the full x; the gradients of x and the weight stay within bf16 rounding of the float64 ones."""
    from benchmarks.saved_bytes import kept_bytes

    g = torch.Generator().manual_seed(10)
    x = torch.randn(37, 130, generator=g) * 3
    w = 1 + 0.3 * torch.randn(130, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (x, w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, y = kept_bytes(lambda: rms_norm(*leaves, 1e-5, backend=backend))
    assert kept == x.numel() * 2 + x.shape[0] * 4 + w.numel() * 4   # x in bf16, 1/rms fp32, the weight
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y.float() * weights).sum().backward()
    exact = [t.double().requires_grad_(True) for t in (x, w)]
    (plain_rms(*exact) * weights.double()).sum().backward()
    for got, want in zip(leaves, exact, strict=True):
        assert got.grad.dtype == torch.float32
        assert float((got.grad.double() - want.grad).abs().max() / want.grad.abs().max()) < 2 ** -7


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swiglu_down_equals_the_plain_projection(backend):
    g = torch.Generator().manual_seed(10)
    gate, up = (torch.randn(2, 7, 40, dtype=torch.float64, generator=g) for _ in range(2))
    weight = torch.randn(12, 40, dtype=torch.float64, generator=g) * 0.2
    dtype = torch.float64 if backend == "torch" else torch.float32      # the kernels compute in fp32
    args = [t.to(dtype) for t in (gate, up, weight)]
    assert_same(grads_of(lambda a, b, w: swiglu_down(a, b, w, backend=backend), *args),
                grads_of(lambda a, b, w: F.linear(F.silu(a) * b, w), *args), tol=1e-12 if backend == "torch" else 1e-5)


def test_swiglu_down_under_autocast_matches_an_autocast_linear():
    g = torch.Generator().manual_seed(11)
    gate, up = (torch.randn(3, 5, 64, generator=g).bfloat16() for _ in range(2))
    weight = torch.randn(16, 64, generator=g) * 0.2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = grads_of(lambda a, b, w: swiglu_down(a, b, w, backend="torch"), gate, up, weight)
        plain = grads_of(lambda a, b, w: F.linear(F.silu(a) * b, w), gate, up, weight)
    assert fused[0].dtype == torch.bfloat16 and fused[1][2].dtype == torch.float32
    assert_same((fused[0].float(), [t.float() for t in fused[1]]), (plain[0].float(), [t.float() for t in plain[1]]),
                tol=2e-2)


# ------------------------------------------------------------------------------ output norm + projection
def _norm_linear_inputs(dtype, seed=14):
    """The mixer's shapes, small: o [B, T, H, V] non-contiguous (the chunk operator's [B, H, T, V] transposed), gate
    [B, T, H, V], norm weight [V], o_proj weight [d, H*V]; 74 rows of 40 (not a multiple of a tile)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 3, 37, 40, generator=g) * 3).transpose(1, 2).to(dtype)
    gate = torch.randn(2, 37, 3, 40, generator=g).to(dtype)
    return x, gate, 1 + 0.3 * torch.randn(40, generator=g), torch.randn(24, 120, generator=g) * 0.1


def _unfused_norm_linear(activation, backend=None):
    """F.linear(gated_rms_norm(x, gate, w).reshape(B, T, H*V), W); backend None: the plain expressions."""
    act = F.silu if activation == "silu" else torch.sigmoid

    def fn(x, gate, w, proj):
        normed = plain_rms(x, w) * act(gate) if backend is None else gated_rms_norm(x, gate, w, 1e-5, activation,
                                                                                   backend=backend)
        return F.linear(normed.reshape(*x.shape[:2], -1), proj)
    return fn


@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gated_rms_norm_linear_equals_the_plain_composition_in_float64(backend, activation):
    """The output and the gradients of x, gate, the norm weight and the projection weight against the plain
    expressions in float64: float64 inputs on the torch path, fp32 ones on the kernels (interpreter; fp32 math)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    args = [t.to(dtype) for t in _norm_linear_inputs(torch.float64)]
    out, grads = grads_of(lambda *t: gated_rms_norm_linear(*t, 1e-5, activation, backend=backend), *args)
    assert out.shape == (2, 37, 24) and out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 4
    plain, exact = _unfused_norm_linear(activation), [t.double() for t in args]
    # the reference's output cast to the inputs' dtype only so that grads_of weighs it with the Function's weights
    _, exact_grads = grads_of(lambda *t: plain(*t).to(dtype), *exact)
    tol = 1e-12 if backend == "torch" else 1e-5
    assert_same((out.double(), [g.double() for g in grads]), (plain(*exact), exact_grads), tol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gated_rms_norm_linear_under_autocast_is_bit_identical_to_the_unfused_composition(backend):
    """bf16 o and gate (what the mixer hands it under bf16 autocast), fp32 weights: the output and every gradient
    equal those of F.linear(gated_rms_norm(...)) under the same autocast bit for bit: the same norm code gives the
    same bf16 normed output in the forward and in the backward's recompute, and the same bf16 products follow."""
    args = _norm_linear_inputs(torch.bfloat16)
    for activation in ("silu", "sigmoid"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = grads_of(lambda *t: gated_rms_norm_linear(*t, 1e-5, activation, backend=backend), *args)
            unfused = grads_of(_unfused_norm_linear(activation, backend), *args)
        assert fused[0].dtype == torch.bfloat16 and [g.dtype for g in fused[1]] == [t.dtype for t in args]
        assert torch.equal(fused[0], unfused[0])
        for name, got, want in zip(("x", "gate", "norm weight", "proj weight"), *(r[1] for r in (fused, unfused)),
                                   strict=True):
            assert torch.equal(got, want), name


def test_gated_rms_norm_linear_keeps_an_fp32_x_whole_under_autocast():
    """An fp32 x under bf16 autocast is kept whole (the recompute must equal the forward's normed output), where
    gated_rms_norm keeps it in bf16: the output and the projection's gradient equal the composition's bit for bit; the
    gradients of x, gate and the norm weight differ from it, and stay within bf16 rounding of float64's."""
    args = _norm_linear_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = grads_of(lambda *t: gated_rms_norm_linear(*t, 1e-5, backend="torch"), *args)
        unfused = grads_of(_unfused_norm_linear("silu", "torch"), *args)
    assert torch.equal(fused[0], unfused[0]) and torch.equal(fused[1][3], unfused[1][3])
    weights = torch.randn(fused[0].shape, generator=torch.Generator().manual_seed(7)).bfloat16().double()
    exact = [t.double().requires_grad_(True) for t in args]
    (_unfused_norm_linear("silu")(*exact) * weights).sum().backward()
    for got, want in zip(fused[1], exact, strict=True):
        assert got.dtype == torch.float32
        assert float((got.double() - want.grad).abs().max() / want.grad.abs().max()) < 2 ** -7


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("autocast", [False, True])
def test_gated_rms_norm_linear_keeps_no_normed_output(backend, autocast):
    """It keeps what gated_rms_norm alone keeps (x, gate, 1/rms; the weights are not counted), and the composition
    keeps the normed output on top: 4 bytes per element in fp32, 2 under bf16 autocast (plus autocast's bf16 copy of
    the projection weight)."""
    from benchmarks.saved_bytes import kept_bytes

    args = _norm_linear_inputs(torch.bfloat16 if autocast else torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in args]
    weights = {t.untyped_storage().data_ptr() for t in leaves[2:]}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused, _ = kept_bytes(lambda: gated_rms_norm_linear(*leaves, 1e-5, backend=backend), exclude=weights)
        norm, _ = kept_bytes(lambda: gated_rms_norm(*leaves[:3], 1e-5, backend=backend), exclude=weights)
        unfused, _ = kept_bytes(lambda: _unfused_norm_linear("silu", backend)(*leaves), exclude=weights)
    assert fused == norm
    normed_bytes = args[0].numel() * (2 if autocast else 4)
    assert unfused - fused == normed_bytes + (args[3].numel() * 2 if autocast else 0)


def test_gated_rms_norm_linear_folds_the_last_two_axes_and_refuses_other_shapes():
    """x [..., H, V] -> [..., d]: size-one axes (one head, one token) stay where they are."""
    x, gate, w, proj = _norm_linear_inputs(torch.float32)
    one = gated_rms_norm_linear(x[:1, :1, :1], gate[:1, :1, :1], w, proj[:, :40], 1e-5)
    assert one.shape == (1, 1, 24)
    torch.testing.assert_close(one, F.linear(gated_rms_norm(x[:1, :1, :1], gate[:1, :1, :1], w, 1e-5)[:, :, 0],
                                             proj[:, :40]))
    with pytest.raises(ValueError, match="gate of x's shape"):
        gated_rms_norm_linear(x, gate[:, :5], w, proj, 1e-5)
    with pytest.raises(ValueError, match=r"x \[\.\.\., H, V\] must fold"):
        gated_rms_norm_linear(x, gate, w, proj[:, :100], 1e-5)


@pytest.mark.parametrize("width,bias", [(4, False), (4, True), (2, True)])
def test_triton_short_conv_equals_the_torch_conv(width, bias):
    """The conv kernels (interpreter) against F.conv1d: outputs and the gradients of x, weight and bias, with a
    carried cache, T and D not multiples of the kernel's blocks."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 70, 130, generator=g)
    cache = torch.randn(2, 130, width - 1, generator=g)
    weight = torch.randn(130, 1, width, generator=g) * 0.5
    b = torch.randn(130, generator=g) * 0.1 if bias else None
    leaves = (x, weight) + ((b,) if bias else ())

    def run(backend):
        return lambda x, w, *rest: short_conv_silu(x, cache, w, rest[0] if rest else None, backend=backend)

    assert_same(grads_of(run("triton"), *leaves),
                grads_of(lambda x, w, *rest: causal_conv_silu(x, cache, w, rest[0] if rest else None), *leaves),
                tol=1e-5)


def test_triton_short_conv_keeps_a_sliced_input_without_a_copy():
    """A conv input sliced out of a wider projection (Mamba-2's xBC out of in_proj) is kept as that slice, not as a
    contiguous copy: autograd keeps no storage of its size besides the projection's own; the gradient of the
    projection equals the torch conv's."""
    from benchmarks.saved_bytes import kept_bytes

    g = torch.Generator().manual_seed(14)
    projection = torch.randn(2, 40, 96, generator=g, requires_grad=True)
    cache = torch.zeros(2, 64, 3)
    weight = torch.randn(64, 1, 4, generator=g) * 0.5

    mix = torch.randn(2, 40, 64, generator=g)          # the loss's weights: kept by the loss, not by the conv

    def run(conv):
        return lambda: (lambda y: (y, (y * mix).sum()))(conv(projection[..., 16:80]))

    exclude = {t.untyped_storage().data_ptr() for t in (projection, weight, mix)}
    kept, (y, loss) = kept_bytes(run(lambda x: short_conv_silu(x, cache, weight, None, backend="triton")),
                                 exclude=exclude)
    assert kept < 2 * 40 * 64 * 4              # the slice's contiguous copy would be one [2, 40, 64] fp32 tensor
    loss.backward()
    grad = projection.grad.clone()
    projection.grad = None
    (causal_conv_silu(projection[..., 16:80], cache, weight, None) * mix).sum().backward()
    torch.testing.assert_close(grad, projection.grad, rtol=1e-5, atol=1e-5)


def test_triton_decay_equals_the_mixer_expression():
    """The decay kernels (interpreter) against the mixer's torch expression: g and the gradients of f, A_log and
    dt_bias; f in bf16 as autocast hands it over, f large enough to reach softplus's linear branch."""
    from gdn2.fused import decay, decay_reference

    g = torch.Generator().manual_seed(13)
    f = (torch.randn(37, 6 * 16, generator=g) * 8).bfloat16()
    a_log = torch.empty(6).uniform_(0, 2.7, generator=g)
    dt_bias = torch.randn(6 * 16, generator=g)
    fused = grads_of(lambda f, a, d: decay(f, a, d, 16, backend="triton"), f, a_log, dt_bias)
    plain = grads_of(lambda f, a, d: decay_reference(f, a, d, 16), f, a_log, dt_bias)
    assert fused[0].dtype == torch.float32 and fused[1][0].dtype == torch.bfloat16
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1][0].float(), plain[1][0].float(), rtol=1e-2, atol=1e-2)   # bf16 df
    for got, want in zip(fused[1][1:], plain[1][1:], strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ pre-norm + the linears reading it
def _norm_linears_inputs(dtype, seed=15):
    """x [2, 37, 40] non-contiguous (74 rows, not a multiple of a tile), norm weight [40], three weights [d_i, 40]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(37, 2, 40, generator=g) * 3).transpose(0, 1).to(dtype)
    weights = [torch.randn(n, 40, generator=g).to(dtype) * 0.2 for n in (24, 5, 40)]
    return [x, (1 + 0.3 * torch.randn(40, generator=g)).to(dtype), *weights]


def _norm_linears(backend=None):
    """torch.cat(outputs, -1) of rms_norm_linears (backend given) or of the plain composition (None)."""
    def fn(x, w, *weights):
        if backend is None:
            return torch.cat([F.linear(plain_rms(x, w), W) for W in weights], -1)
        return torch.cat(rms_norm_linears(x, w, 1e-5, weights, backend=backend), -1)
    return fn


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                           ("triton", torch.float32)])
def test_rms_norm_linears_equals_the_plain_composition_in_float64(backend, dtype):
    """The outputs and the gradients of x, the norm weight and each linear weight against the plain expressions in
    float64 (float64 inputs: 1e-12; fp32 inputs, torch ops or the kernels in the interpreter: 1e-5)."""
    args = [t.to(dtype) for t in _norm_linears_inputs(torch.float64)]
    outs = rms_norm_linears(args[0], args[1], 1e-5, args[2:], backend=backend)
    assert [o.shape for o in outs] == [(2, 37, 24), (2, 37, 5), (2, 37, 40)] and outs[0].dtype == dtype
    out, grads = grads_of(_norm_linears(backend), *args)
    assert [g.dtype for g in grads] == [dtype] * 5
    _, exact_grads = grads_of(lambda *t: _norm_linears()(*t).to(dtype), *[t.double() for t in args])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_same((out.double(), [g.double() for g in grads]),
                (_norm_linears()(*[t.double() for t in args]), exact_grads), tol=tol)


def _record_normed_outputs(monkeypatch):
    """[(call kind, y)] of every _norm_forward call rms_norm_linears makes: 'forward' or 'recompute'."""
    import gdn2.fused

    calls, original = [], gdn2.fused._norm_forward

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(("recompute" if kwargs.get("rstd") is not None else "forward", result[0].clone()))
        return result
    monkeypatch.setattr(gdn2.fused, "_norm_forward", recording)
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_linears_under_autocast_recomputes_the_forwards_normed_output_bit_for_bit(backend, x_dtype,
                                                                                           monkeypatch):
    """bf16 autocast, x in fp32 (the residual stream; kept in bf16) or bf16: the backward recomputes the forward's
    bf16 normed output y bit for bit from the kept x and 1/rms, so the outputs are F.linear(y, bf16(W)) and each
    weight's gradient is bf16(dout^T y) exactly."""
    args = _norm_linears_inputs(torch.float32)
    args[0] = args[0].to(x_dtype)
    calls = _record_normed_outputs(monkeypatch)
    leaves = [t.clone().requires_grad_(True) for t in args]
    g = torch.Generator().manual_seed(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = rms_norm_linears(leaves[0], leaves[1], 1e-5, leaves[2:], backend=backend)
    douts = [torch.randn(o.shape, generator=g).bfloat16() for o in outs]
    torch.autograd.backward(outs, douts)
    assert [kind for kind, _ in calls] == ["forward", "recompute"]
    y = calls[0][1].reshape(2, 37, 40)
    assert y.dtype == torch.bfloat16 and torch.equal(calls[1][1].reshape(y.shape), y)
    for out, dout, W, leaf in zip(outs, douts, args[2:], leaves[2:], strict=True):
        assert torch.equal(out, F.linear(y, W.bfloat16()))
        assert leaf.grad.dtype == torch.float32
        assert torch.equal(leaf.grad, (dout.reshape(-1, dout.shape[-1]).t() @ y.reshape(-1, 40)).float())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rms_norm_linears_under_autocast_normed_output_and_gradients_against_float64(backend, monkeypatch):
    """An fp32 x under bf16 autocast: the normed output comes from the bf16 x (1/rms from the full x) and differs
    from rms_norm's, computed from the full x, by at most 2^-7 relative (one bf16 unit in the last place; measured:
    2^-7 on a quarter of the elements differing, torch ops, which round to nearest as the GPU kernel does; Triton's
    CPU interpreter truncates to bf16, twice here, measured 1.4e-2 on half of them). Every gradient's largest error
    is within 2^-7 of the largest float64 gradient element on the torch path (measured 2.2e-3 to 4.5e-3 over three
    seeds; the unfused composition: the same range), 2^-6 in the interpreter (measured up to 1.1e-2 on the weights;
    unfused: 5.1e-3)."""
    args = _norm_linears_inputs(torch.float32)
    calls = _record_normed_outputs(monkeypatch)
    leaves = [t.clone().requires_grad_(True) for t in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _norm_linears(backend)(*leaves)
        reference = rms_norm(args[0], args[1], 1e-5, backend=backend)
    y = calls[0][1].reshape(reference.shape).float()
    rel = (y - reference.float()).abs() / reference.float().abs()
    assert 0 < float(rel.max()) <= (2 ** -7 if backend == "torch" else 2 ** -6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).bfloat16()
    (out.float() * weights.float()).sum().backward()
    exact = [t.double().requires_grad_(True) for t in args]
    (_norm_linears()(*exact) * weights.double()).sum().backward()
    for got, want in zip(leaves, exact, strict=True):
        assert got.grad.dtype == torch.float32
        error = float((got.grad.double() - want.grad).abs().max() / want.grad.abs().max())
        assert error < (2 ** -7 if backend == "torch" else 2 ** -6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("autocast", [False, True])
def test_rms_norm_linears_keeps_no_normed_output(backend, autocast):
    """It keeps what rms_norm alone keeps (x, in bf16 under autocast, and 1/rms; the weights are not counted); the
    composition keeps at least the normed output on top (4 bytes per element in fp32, 2 under autocast; here more:
    the linears fold the non-contiguous normed x into copies, and autocast keeps bf16 copies of the weights)."""
    from benchmarks.saved_bytes import kept_bytes

    args = _norm_linears_inputs(torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in args]
    params = {t.untyped_storage().data_ptr() for t in leaves[1:]}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused, _ = kept_bytes(lambda: rms_norm_linears(leaves[0], leaves[1], 1e-5, leaves[2:], backend=backend),
                              exclude=params)
        norm, _ = kept_bytes(lambda: rms_norm(*leaves[:2], 1e-5, backend=backend), exclude=params)
        unfused, _ = kept_bytes(lambda: [F.linear(rms_norm(*leaves[:2], 1e-5, backend=backend), W)
                                         for W in leaves[2:]], exclude=params)
    normed_bytes = args[0].numel() * (2 if autocast else 4)
    assert fused == norm == normed_bytes + 74 * 4
    assert unfused - fused >= normed_bytes


def test_rms_norm_linears_refuses_weights_of_another_width():
    x, w, *weights = _norm_linears_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"one or more weights \[d_i, 40\]"):
        rms_norm_linears(x, w, 1e-5, [weights[0], weights[1][:, :30]])
    with pytest.raises(ValueError, match="one or more weights"):
        rms_norm_linears(x, w, 1e-5, [])


def _unfused_block_forward(self, x, state, use_cache, token_mask=None):
    """GDN2Block.forward with the norms run as separate modules (what the block runs without autograd)."""
    mixed, new_state = self.attn(self.attn_norm(x), state=state, use_cache=use_cache, token_mask=token_mask)
    x = x + mixed
    return x + self.mlp(self.mlp_norm(x)), new_state


def test_model_with_the_pre_norms_fused_equals_the_unfused_blocks(monkeypatch):
    """float64: the loss and every parameter gradient with each pre-norm fused into its linears equal those of the
    blocks running the norms as modules; the logits with autograd on equal those without it bit for bit."""
    from gdn2.modeling import GDN2Block

    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(17))
    results = {}
    for mode in ("fused", "unfused"):
        if mode == "unfused":
            monkeypatch.setattr(GDN2Block, "forward", _unfused_block_forward)
        model = tiny()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["fused"][0], results["unfused"][0], rtol=1e-12, atol=1e-12)
    for name, grad in results["unfused"][1].items():
        torch.testing.assert_close(results["fused"][1][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    monkeypatch.undo()
    model = tiny()
    with_grad = model(ids, use_cache=False).logits
    with torch.no_grad():
        assert torch.equal(with_grad, model(ids, use_cache=False).logits)


def test_saved_bytes_names_the_pieces_a_kda_block_keeps(monkeypatch):
    """benchmarks/saved_bytes.py on our KDA model (tiny config, the Triton paths in the interpreter): the fused block
    keeps nothing under its norms (they run inside the mixer's and the MLP's projections, and the output norm inside
    gated_rms_norm_linear); a hooked pre-norm runs as its own module and keeps its bytes under its name; the loss's
    go under '(model)'; and the per-module counts add up to what autograd keeps in all."""
    import gdn2.fused
    import gdn2.layer
    import gdn2.ops
    from benchmarks.saved_bytes import kept_bytes, saved_bytes_by_module, use_triton_paths_on_cpu
    from harness.registry import get_family

    for module, name in ((gdn2.layer, "chunk_gdn2"), (gdn2.ops, "chunk_gdn2"), (gdn2.fused, "_backend")):
        monkeypatch.setattr(module, name, getattr(module, name))     # restored after the test
    use_triton_paths_on_cpu()
    torch.manual_seed(0)
    model = get_family("kda").build_reference(dict(hidden_size=64, num_hidden_layers=1, num_heads=2, head_dim=16,
                                                   vocab_size=256, intermediate_size=128)).train()
    ids = torch.randint(0, 256, (1, 64))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = saved_bytes_by_module(model, ids, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = kept_bytes(lambda: model(input_ids=ids, labels=ids), exclude=params)
    assert sum(kept.values()) == total
    assert kept["(model)"] > 0 and kept["model.layers.0.attn"] > 0
    block = "model.layers.0."
    assert not {block + n for n in ("attn_norm", "mlp_norm", "attn.o_norm", "attn.o_proj", "attn.q_proj")} & set(kept)
    model.model.layers[0].attn_norm.register_forward_hook(lambda module, args, out: None)
    hooked = saved_bytes_by_module(model, ids, "cpu")
    assert hooked[block + "attn_norm"] > 0 and hooked[block + "attn.q_proj"] > 0 and block + "mlp_norm" not in hooked
    assert sum(hooked.values()) > total
