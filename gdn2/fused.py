"""Memory-lean autograd pieces of the model's training path (torch ops, and Triton kernels on CUDA for all but the
cross-entropy; the values of the unfused expressions).

- linear_cross_entropy(hidden [N, d], weight [V, d], labels [N])  mean cross-entropy of hidden @ weight^T without
  ever holding the [N, V] logits: tokens run in chunks, and each chunk's gradients (wrt hidden and weight) are
  formed in the forward pass (the loss is the graph's end), so the backward only scales them.
- rms_norm(x, weight, eps)                  y = x / rms(x) * weight (fp32 math, float64 for float64 inputs; x's dtype
                                            out, or the autocast dtype under autocast); saves x and 1/rms
- gated_rms_norm(x, gate, weight, eps, activation)   rms_norm(x) * act(gate); saves x, gate and 1/rms
- gated_rms_norm_linear(x, gate, norm_weight, proj_weight, eps, activation)
                                            F.linear(gated_rms_norm(x, gate, ...) folded to [..., H*V], proj_weight);
                                            saves x, gate and 1/rms, not the normed output
- rms_norm_linears(x, norm_weight, eps, weights)
                                            tuple(F.linear(rms_norm(x, norm_weight, eps), W) for W in weights);
                                            saves x and 1/rms (as rms_norm), not the normed output
- norm_linears(x, norm, linears)             rms_norm_linears with the modules' weights where they are plain
                                            modules (plain), else the modules called one by one
- silu_mul(gate, up)                         silu(gate) * up; saves gate and up
- swiglu_down(gate, up, weight)              F.linear(silu(gate) * up, weight); saves gate and up, not the product
- short_conv_silu(x, cache, weight, bias)    SiLU(depthwise causal conv) of x [B, T, D]; saves x only
- decay(f, A_log, dt_bias, head_dim)         -exp(A_log) * softplus(f + dt_bias) (fp32); saves f only

The others recompute their intermediates in the backward pass instead of keeping them: autograd of the plain
expressions keeps two to four fp32 copies of every activation they touch. On CUDA each runs as one Triton kernel per
pass (gdn2/fused_kernels.py) instead of four to ten elementwise launches; backend="torch" forces the torch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Tokens per chunk of linear_cross_entropy: 2048 x 32000 fp32 logits are 262 MB, plus their softmax in place.
CE_CHUNK_TOKENS = 2048


# ------------------------------------------------------------------------------------------ cross-entropy
class LinearCrossEntropy(torch.autograd.Function):
    """Mean over non-ignored tokens of -log softmax(hidden @ weight^T)[label]; see linear_cross_entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_tokens):
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype                                     # what an autocast linear would compute in
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        valid = labels != ignore_index
        count = int(valid.sum())
        total = hidden.new_zeros((), dtype=acc)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(dtype)
            target, keep = labels[start:start + chunk_tokens], valid[start:start + chunk_tokens]
            logits = (h @ w.t()).to(acc)                                          # [n, V]
            lse = logits.logsumexp(-1)
            picked = logits.gather(-1, target.clamp(min=0)[:, None])[:, 0]
            total += ((lse - picked) * keep).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = (softmax - onehot(target)) / count, zero on ignored rows
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(-1, target.clamp(min=0)[:, None], -torch.ones_like(lse)[:, None])
            grad.mul_(keep.to(acc)[:, None] / max(count, 1))
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = (grad @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / max(count, 1)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         chunk_tokens: int = CE_CHUNK_TOKENS) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight^T, labels, ignore_index) (mean over the tokens not ignored) in chunks of
    chunk_tokens tokens. hidden [N, d], weight [V, d], labels [N] long. Under autocast the products run in the
    autocast dtype, as an autocast nn.Linear would; the softmax is fp32 and the weight's gradient is summed over the
    chunks in fp32. With every label ignored the loss is 0 (F.cross_entropy gives NaN)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and labels [N]; got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_tokens)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM loss of hidden [B, T, d] (position t predicts labels[:, t + 1]; -100 ignored), as
    F.cross_entropy(lm_head(hidden)[:, :-1], labels[:, 1:]) but through linear_cross_entropy (no logits)."""
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, shifted.reshape(-1))


def plain(module: nn.Module, cls: type) -> bool:
    """Whether module is exactly a cls (not a subclass or a wrapper such as a LoRA or quantized layer), has no
    forward hooks and, for a linear, no bias: only then may a fused Function read its weight instead of calling it.
    Otherwise the callers run the module itself, so nothing it adds is skipped."""
    if type(module) is not cls or module._forward_hooks or module._forward_pre_hooks:
        return False
    return getattr(module, "bias", None) is None


# ------------------------------------------------------------------------------------------ norms
def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in its compute precision: fp32, or float64 for float64 inputs."""
    return x if x.dtype == torch.float64 else x.float()


def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, rstd: torch.Tensor | None = None,
                 x_for_y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat * weight in fp32, 1/rms fp32 [..., 1]); 1/rms from x unless given, x_hat from x_for_y (default x)."""
    if rstd is None:
        rstd = torch.rsqrt(_wide(x).pow(2).mean(-1, keepdim=True) + eps)
    return _wide(x if x_for_y is None else x_for_y) * rstd * _wide(weight), rstd


def _rms_backward(x, weight, rstd, grad_y) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx fp32, dweight fp32) of y = x * rstd * weight given dy (fp32)."""
    x_hat = _wide(x) * rstd
    dweight = (grad_y * x_hat).reshape(-1, x.shape[-1]).sum(0)
    dx_hat = grad_y * _wide(weight)
    dx = rstd * (dx_hat - x_hat * (dx_hat * x_hat).mean(-1, keepdim=True))
    return dx, dweight


def _activation(name: str):
    """(act, d act / d z as a function of z) for 'silu' or 'sigmoid'."""
    if name == "silu":
        return F.silu, lambda z: torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z)))
    if name == "sigmoid":
        return torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z))
    raise ValueError(f"activation must be 'silu' or 'sigmoid'; got {name!r}")


def _backend(x: torch.Tensor, backend: str) -> str:
    """'auto' -> 'triton' for CUDA tensors (not float64), else 'torch'; an explicit choice is kept."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton'; got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if x.is_cuda and x.dtype != torch.float64 and x.shape[-1] <= 16384 else "torch"


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on x hands on: the autocast dtype under autocast (what an autocast linear computes in), else
    x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _norm_forward(x, gate, weight, eps, activation, backend, out_dtype, keep_dtype=None, round_x=False, rstd=None):
    """(y, rstd, x to keep, gate to keep) of y = x / rms(x) * weight [* act(gate)] over the last axis, x and gate
    [..., D], weight [D]; y in out_dtype, of x's shape. Kept: backend 'triton' x and gate as contiguous rows [N, D]
    (x written in keep_dtype by the same kernel when given), rstd [N]; 'torch' x and gate as given (x cast to
    keep_dtype when given), rstd [..., 1]. round_x: y from the kept x (1/rms still from the full x). rstd given (as
    this function returned it): used instead of 1/rms of x. The same inputs give the same y bit for bit (the
    backward's recompute), and so do the kept x and rstd of a round_x call."""
    if backend == "triton":
        from gdn2.fused_kernels import rms_norm_fwd

        rows = x.reshape(-1, x.shape[-1]).contiguous()
        gate_rows = gate.reshape(rows.shape).contiguous() if gate is not None else None
        y, rstd, kept = rms_norm_fwd(rows, weight, eps, gate_rows, activation, out_dtype, keep_dtype, round_x, rstd)
        return y.view(x.shape), rstd, rows if kept is None else kept, gate_rows
    kept = x if keep_dtype is None else x.to(keep_dtype)
    y, rstd = _rms_forward(x, weight, eps, rstd, kept if round_x else None)
    if gate is not None:
        y = y * _activation(activation)[0](_wide(gate))
    return y.to(out_dtype), rstd, kept, gate


def _norm_backward(x, gate, weight, rstd, grad_y, activation, backend, x_dtype):
    """(dx in x_dtype, dgate in gate's dtype or None, dweight in weight's dtype) of _norm_forward from what it kept
    (x, gate, rstd) and grad_y (any dtype, x's element count); dx and dgate have the kept tensors' shapes."""
    if backend == "triton":
        from gdn2.fused_kernels import rms_norm_bwd

        dx, dweight, dgate = rms_norm_bwd(x, weight, rstd, grad_y.reshape(x.shape).contiguous(), gate, activation,
                                          x_dtype)
        return dx, dgate, dweight.to(weight.dtype)
    grad_y, dgate = _wide(grad_y.reshape(x.shape)), None
    if gate is not None:
        act, act_grad = _activation(activation)
        gf = _wide(gate)
        dgate = (grad_y * _wide(x) * rstd * _wide(weight) * act_grad(gf)).to(gate.dtype)
        grad_y = grad_y * act(gf)
    dx, dweight = _rms_backward(x, weight, rstd, grad_y)
    return dx.to(x_dtype), dgate, dweight.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * weight [* act(gate)] over the last axis; see rms_norm and gated_rms_norm."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps, activation, backend):
        ctx.activation, ctx.backend, ctx.shapes = activation, backend, (x.shape, None if gate is None else gate.shape)
        # Under autocast the output is already in the autocast dtype: every linear reading it would cast it anyway,
        # each keeping its own copy for the backward pass.
        # The backward pass reads x in that dtype too (an fp32 residual stream is kept in bf16; 1/rms is computed
        # from the full x): x_hat's rounding is the bf16 rounding the linears' gradients already carry.
        out_dtype = _out_dtype(x)
        keep_dtype = out_dtype if out_dtype.itemsize < x.dtype.itemsize and any(ctx.needs_input_grad[:3]) else None
        ctx.x_dtype = x.dtype
        y, rstd, x_kept, gate_kept = _norm_forward(x, gate, weight, eps, activation, backend, out_dtype, keep_dtype)
        ctx.save_for_backward(x_kept, gate_kept, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, gate, weight, rstd = ctx.saved_tensors
        x_shape, gate_shape = ctx.shapes
        dx, dgate, dweight = _norm_backward(x, gate, weight, rstd, grad_y, ctx.activation, ctx.backend, ctx.x_dtype)
        return dx.view(x_shape), None if dgate is None else dgate.view(gate_shape), dweight, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """x / rms(x) * weight over the last axis, fp32 math, x's dtype out (the autocast dtype under autocast). Saves x
    (in the output dtype where that is narrower) and 1/rms only. backend: 'auto' (Triton kernels,
    gdn2/fused_kernels.py, for CUDA tensors; torch ops otherwise), 'torch' or 'triton'."""
    return RMSNormFunction.apply(x, None, weight, eps, "silu", _backend(x, backend))


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   activation: str = "silu", backend: str = "auto") -> torch.Tensor:
    """rms_norm(x) * act(gate), fp32 math, x's dtype out (as rms_norm); act 'silu' or 'sigmoid'. Saves x, gate and
    1/rms."""
    _activation(activation)
    return RMSNormFunction.apply(x, gate, weight, eps, activation, _backend(x, backend))


def _projection_shape(shape: torch.Size, width: int) -> tuple[int, ...]:
    """[..., H, V] -> (..., H*V): x's heads folded into the projection's `width` input features (H*V must be width)."""
    if len(shape) < 2 or shape[-2] * shape[-1] != width:
        raise ValueError(f"x [..., H, V] must fold into the projection's {width} input features; got {tuple(shape)}")
    return (*shape[:-2], width)


class GatedNormLinearFunction(torch.autograd.Function):
    """F.linear(gated_rms_norm(x, gate, norm_weight) folded to [..., H*V], proj_weight); see gated_rms_norm_linear."""

    @staticmethod
    def forward(ctx, x, gate, norm_weight, proj_weight, eps, activation, backend):
        dtype = _out_dtype(x)
        normed, rstd, x_kept, gate_kept = _norm_forward(x, gate, norm_weight, eps, activation, backend, dtype)
        ctx.save_for_backward(x_kept, gate_kept, norm_weight, proj_weight, rstd)
        ctx.eps, ctx.activation, ctx.backend, ctx.dtype = eps, activation, backend, dtype
        ctx.shapes, ctx.x_dtype = (x.shape, gate.shape), x.dtype
        return F.linear(normed.reshape(_projection_shape(x.shape, proj_weight.shape[1])), proj_weight.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, norm_weight, proj_weight, rstd = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)                  # [M, d_out]
        grad_x = grad_gate = grad_norm_weight = grad_proj = None
        if ctx.needs_input_grad[3]:            # the normed output recomputed, not kept: the forward's own bits
            normed = _norm_forward(x, gate, norm_weight, ctx.eps, ctx.activation, ctx.backend, ctx.dtype)[0]
            grad_proj = (grad_rows.t() @ normed.reshape(grad_rows.shape[0], -1)).to(proj_weight.dtype)
        if any(ctx.needs_input_grad[:3]):      # [M, H*V] in the linear's dtype, as the linear would hand the norm
            grad_normed = grad_rows @ proj_weight.to(ctx.dtype)
            grad_x, grad_gate, grad_norm_weight = _norm_backward(x, gate, norm_weight, rstd, grad_normed,
                                                                 ctx.activation, ctx.backend, ctx.x_dtype)
            grad_x, grad_gate = grad_x.view(ctx.shapes[0]), grad_gate.view(ctx.shapes[1])
        grads = (grad_x, grad_gate, grad_norm_weight)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=False)), grad_proj,
                None, None, None)


def gated_rms_norm_linear(x: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor, proj_weight: torch.Tensor,
                          eps: float, activation: str = "silu", backend: str = "auto") -> torch.Tensor:
    """F.linear(gated_rms_norm(x, gate, norm_weight, eps, activation).reshape(..., H*V), proj_weight), the mixers'
    output norm and projection, keeping what gated_rms_norm keeps (x, gate, 1/rms) and the weights only: the normed
    output is recomputed in the backward pass (bit for bit, by the forward's code) for the projection weight's
    gradient instead of being kept. x and gate [..., H, V] (the norm over V), norm_weight [V], proj_weight
    [d_out, H*V]; returns [..., d_out]. Under autocast the normed output and the weight run in the autocast dtype,
    as an autocast nn.Linear would. An x wider than that dtype is kept whole (gated_rms_norm keeps it narrowed), so
    the recompute equals the forward."""
    _activation(activation)
    if gate.shape != x.shape or proj_weight.dim() != 2:
        raise ValueError(f"gated_rms_norm_linear needs gate of x's shape and a 2-D proj_weight; got x "
                         f"{tuple(x.shape)}, gate {tuple(gate.shape)}, proj_weight {tuple(proj_weight.shape)}")
    _projection_shape(x.shape, proj_weight.shape[1])
    return GatedNormLinearFunction.apply(x, gate, norm_weight, proj_weight, eps, activation, _backend(x, backend))


class RMSNormLinearsFunction(torch.autograd.Function):
    """tuple(F.linear(rms_norm(x, norm_weight), W) for W in weights); see rms_norm_linears."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps, backend, *weights):
        dtype = _out_dtype(x)
        keep_dtype = dtype if dtype.itemsize < x.dtype.itemsize else None
        # y from the kept (narrowed) x and the full x's 1/rms: the backward's recompute from those two is exact
        normed, rstd, x_kept, _ = _norm_forward(x, None, norm_weight, eps, "silu", backend, dtype, keep_dtype,
                                                round_x=True)
        ctx.save_for_backward(x_kept, norm_weight, rstd, *weights)
        ctx.eps, ctx.backend, ctx.dtype, ctx.x_shape, ctx.x_dtype = eps, backend, dtype, x.shape, x.dtype
        return tuple(F.linear(normed, w.to(dtype)) for w in weights)

    @staticmethod
    def backward(ctx, *grad_outs):
        x, norm_weight, rstd, *weights = ctx.saved_tensors
        grads = [g.reshape(-1, g.shape[-1]).to(ctx.dtype) for g in grad_outs]              # [M, d_i]
        grad_x = grad_norm_weight = None
        grad_weights = [None] * len(weights)
        if any(ctx.needs_input_grad[4:]):      # the normed output recomputed, not kept: the forward's own bits
            normed = _norm_forward(x, None, norm_weight, ctx.eps, "silu", ctx.backend, ctx.dtype, rstd=rstd)[0]
            normed = normed.reshape(grads[0].shape[0], -1)                                   # [M, d]
            grad_weights = [(g.t() @ normed).to(w.dtype) if need else None
                            for g, w, need in zip(grads, weights, ctx.needs_input_grad[4:], strict=True)]
        if any(ctx.needs_input_grad[:2]):      # the linears' input gradients summed in place, [M, d]
            grad_y = grads[0] @ weights[0].to(ctx.dtype)
            for g, w in zip(grads[1:], weights[1:], strict=True):
                grad_y.addmm_(g, w.to(ctx.dtype))       # one read and write of grad_y per linear, no extra copies
            grad_x, _, grad_norm_weight = _norm_backward(x, None, norm_weight, rstd, grad_y, "silu", ctx.backend,
                                                         ctx.x_dtype)
            grad_x = grad_x.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
            grad_norm_weight = grad_norm_weight if ctx.needs_input_grad[1] else None
        return grad_x, grad_norm_weight, None, None, *grad_weights


def rms_norm_linears(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weights, backend: str = "auto"
                     ) -> tuple[torch.Tensor, ...]:
    """tuple(F.linear(rms_norm(x, norm_weight, eps), W) for W in weights), a pre-norm and the linears reading it,
    keeping what rms_norm keeps (x, narrowed to the autocast dtype under autocast, and 1/rms) and the weights only:
    the normed output is recomputed once in the backward pass for the weights' gradients instead of being kept.
    x [..., d], norm_weight [d], each W [d_i, d] (no biases); returns ([..., d_i], ...). Under autocast the normed
    output and the weights run in the autocast dtype, as autocast nn.Linears would, and the normed output is
    computed from the narrowed x (1/rms from the full x), so that the recompute equals it bit for bit; it differs from
    rms_norm's (computed from the full x) by at most one bf16 unit in the last place (relative 2^-7; measured on
    random inputs in tests/test_fused_ce.py). Without autocast nothing is narrowed and the output is rms_norm's."""
    weights = tuple(weights)
    if not weights or any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        raise ValueError(f"rms_norm_linears needs one or more weights [d_i, {x.shape[-1]}]; got "
                         f"{[tuple(w.shape) for w in weights]}")
    return RMSNormLinearsFunction.apply(x, norm_weight, eps, _backend(x, backend), *weights)


def norm_linears(x: torch.Tensor, norm: nn.Module | None, linears) -> tuple[torch.Tensor, ...]:
    """tuple(linear(norm(x)) for linear in linears), or of x itself for norm None; norm is a plain RMSNorm (weight,
    eps; the caller checks it). Where every linear is plain, the norm and the linears run as one rms_norm_linears
    Function (the normed x is not kept for the backward pass); otherwise each module runs as itself (see plain)."""
    if norm is not None and all(plain(linear, nn.Linear) for linear in linears):
        return rms_norm_linears(x, norm.weight, norm.eps, [linear.weight for linear in linears])
    x = x if norm is None else norm(x)
    return tuple(linear(x) for linear in linears)


# ------------------------------------------------------------------------------------------ SwiGLU
class SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, backend):
        ctx.backend = backend
        if backend == "triton":
            from gdn2.fused_kernels import silu_mul_fwd

            gate, up = gate.contiguous(), up.contiguous()
            ctx.save_for_backward(gate, up)
            return silu_mul_fwd(gate, up)
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        if ctx.backend == "triton":
            from gdn2.fused_kernels import silu_mul_bwd

            return (*silu_mul_bwd(gate, up, grad_out.contiguous()), None)
        gf = _wide(gate)
        sig = torch.sigmoid(gf)
        grad_out = _wide(grad_out)
        dgate = grad_out * _wide(up) * sig * (1 + gf * (1 - sig))
        dup = grad_out * gf * sig
        return dgate.to(gate.dtype), dup.to(up.dtype), None


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up (the SwiGLU product; gate and up of one shape and dtype); saves gate and up only. backend as
    rms_norm's (the torch path computes F.silu(gate) * up in the inputs' dtype, the kernel in fp32)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul needs gate and up of one shape and dtype; got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    return SiluMulFunction.apply(gate, up, _backend(gate, backend))


def _silu_product(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from gdn2.fused_kernels import silu_mul_fwd

        return silu_mul_fwd(gate.contiguous(), up.contiguous())
    return F.silu(gate) * up


class SwiGLUDownFunction(torch.autograd.Function):
    """F.linear(silu(gate) * up, weight); see swiglu_down."""

    @staticmethod
    def forward(ctx, gate, up, weight, backend):
        device = gate.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else gate.dtype
        ctx.backend, ctx.dtype = backend, dtype
        ctx.save_for_backward(gate, up, weight)
        return F.linear(_silu_product(gate, up, backend).to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, weight = ctx.saved_tensors
        product = _silu_product(gate, up, ctx.backend).to(ctx.dtype)          # recomputed, not kept
        grad_y = grad_y.to(ctx.dtype)
        grad_weight = grad_y.reshape(-1, grad_y.shape[-1]).t() @ product.reshape(-1, product.shape[-1])
        grad_product = (grad_y @ weight.to(ctx.dtype)).to(gate.dtype)
        if ctx.backend == "triton":
            from gdn2.fused_kernels import silu_mul_bwd

            grad_gate, grad_up = silu_mul_bwd(gate.contiguous(), up.contiguous(), grad_product.contiguous())
        else:
            gf = _wide(gate)
            sig = torch.sigmoid(gf)
            grad_gate = (_wide(grad_product) * _wide(up) * sig * (1 + gf * (1 - sig))).to(gate.dtype)
            grad_up = (_wide(grad_product) * gf * sig).to(up.dtype)
        return grad_gate, grad_up, grad_weight.to(weight.dtype), None


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The SwiGLU MLP's output projection F.linear(silu(gate) * up, weight), weight [d, I], keeping gate and up
    only: the product [.., I] is recomputed in the backward pass instead of being kept for the weight's gradient.
    Under autocast the product and the weight run in the autocast dtype, as an autocast nn.Linear would."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu_down needs gate and up of one shape and dtype; got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    return SwiGLUDownFunction.apply(gate, up, weight, _backend(gate, backend))


# ------------------------------------------------------------------------------------------ short convolution
def causal_conv_silu(x: torch.Tensor, cache: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """SiLU(depthwise causal conv) of x [B, T, D] continuing the inputs cache [B, D, W-1]; weight [D, 1, W]
    (torch ops: the reference of the kernels)."""
    xt = x.transpose(1, 2)
    padded = torch.cat([cache.to(xt.dtype), xt], dim=-1)                           # [B, D, W-1+T]
    y = F.conv1d(padded, weight.to(xt.dtype), bias, groups=x.shape[-1])            # [B, D, T]
    return F.silu(y.transpose(1, 2))


class ConvSiluFunction(torch.autograd.Function):
    """short_conv_silu's Triton path. x is kept as given: a slice of a larger projection (Mamba-2's conv input is one
    of in_proj's outputs) keeps that projection alive instead of a copy, which the scan keeps anyway; the backward
    pass makes it contiguous again."""

    @staticmethod
    def forward(ctx, x, cache, weight, bias):
        from gdn2.fused_kernels import conv_silu_fwd

        cache = cache.to(x.dtype).contiguous()
        taps = weight.reshape(weight.shape[0], -1).contiguous()
        ctx.save_for_backward(x, cache, taps, bias)
        ctx.weight_shape = weight.shape
        return conv_silu_fwd(x.contiguous(), cache, taps, bias)

    @staticmethod
    def backward(ctx, grad_y):
        from gdn2.fused_kernels import conv_silu_bwd

        x, cache, taps, bias = ctx.saved_tensors
        dx, dweight, dbias = conv_silu_bwd(x.contiguous(), cache, taps, bias, grad_y.contiguous())
        return (dx, None, dweight.reshape(ctx.weight_shape).to(taps.dtype),
                None if dbias is None else dbias.to(bias.dtype))


def short_conv_silu(x: torch.Tensor, cache: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    backend: str = "auto") -> torch.Tensor:
    """causal_conv_silu keeping only x for the backward pass: the Triton kernels (gdn2/fused_kernels.py) on CUDA,
    else the torch ops under torch.utils.checkpoint. The carried cache gets no gradient on the Triton path (a
    cache that requires one takes the torch path)."""
    backend = _backend(x, backend)
    if backend == "triton" and not cache.requires_grad:
        return ConvSiluFunction.apply(x, cache, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return checkpoint(causal_conv_silu, x, cache, weight, bias, use_reentrant=False)
    return causal_conv_silu(x, cache, weight, bias)


# ------------------------------------------------------------------------------------------ decay gate
def decay_reference(f: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, head_dim: int) -> torch.Tensor:
    """g = -exp(A_log) (per head, repeated over its head_dim channels) * softplus(f + dt_bias), fp32 (as the mixer
    writes it in torch ops)."""
    return -_wide(a_log).exp().repeat_interleave(head_dim) * F.softplus(_wide(f) + dt_bias)


class DecayFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, a_log, dt_bias, head_dim):
        from gdn2.fused_kernels import decay_fwd

        rows = f.reshape(-1, f.shape[-1]).contiguous()
        ctx.save_for_backward(rows, a_log, dt_bias)
        ctx.head_dim, ctx.shape = head_dim, f.shape
        return decay_fwd(rows, a_log.float().contiguous(), dt_bias.float().contiguous(), head_dim).view(f.shape)

    @staticmethod
    def backward(ctx, grad_g):
        from gdn2.fused_kernels import decay_bwd

        rows, a_log, dt_bias = ctx.saved_tensors
        df, da, ddt = decay_bwd(rows, a_log.float().contiguous(), dt_bias.float().contiguous(), ctx.head_dim,
                                grad_g.reshape(rows.shape).float().contiguous())
        return df.view(ctx.shape), da.to(a_log.dtype), ddt.to(dt_bias.dtype), None


def decay_again(f: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, head_dim: int) -> torch.Tensor:
    """decay(f, a_log, dt_bias, head_dim) without autograd: the forward's values again, bit for bit (the same code on
    the same f), for an operator that recomputes g in its backward pass instead of keeping it (chunk_gdn2's
    recompute_g)."""
    with torch.no_grad():
        return decay(f, a_log, dt_bias, head_dim)


def decay(f: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor, head_dim: int,
          backend: str = "auto") -> torch.Tensor:
    """decay_reference keeping only f (in its own dtype, bf16 under autocast) for the backward pass instead of three
    fp32 copies: one Triton kernel per pass on CUDA, the torch expression elsewhere. f [..., H * head_dim]."""
    if _backend(f, backend) == "triton":
        return DecayFunction.apply(f, a_log, dt_bias, head_dim)
    return decay_reference(f, a_log, dt_bias, head_dim)
