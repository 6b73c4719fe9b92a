"""Mamba-2 / Mamba-3 reference math: the chunked scan against a float64 token-serial loop, and each mixer against a
token-by-token float64 implementation written here from mamba-ssm 2.3.2.post1's step semantics (Mamba2.step's torch
path; Mamba3.step = apply_rotary_qk_inference_reference + selective_state_update_fused_ref_v2)."""
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.mamba2 import Mamba2Mixer, Mamba2MixerConfig
from baselines.mamba3 import Mamba3Mixer, Mamba3MixerConfig
from baselines.mamba_common import RecurrentState, chunk_scan, naive_recurrence, trapezoid_scan, trapezoid_step


def _inputs(B, T, R, H, N, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    state = RecurrentState(r(B, H, P, N), r(B, R, H, N), r(B, R, H, P))
    return r(B, T, R, H, N), r(B, T, R, H, N), r(B, T, R, H, P), -u(B, T, H), u(B, T, H), u(B, T, H), state


@pytest.mark.parametrize("T,chunk", [(37, 8), (64, 16), (5, 16), (1, 4)])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("trapezoid", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("rows_per_scan", [1, None])     # the CPU's row-by-row passes; the GPU's whole batch
def test_chunk_scan_matches_token_serial_float64(monkeypatch, T, chunk, R, trapezoid, with_state, rows_per_scan):
    import baselines.mamba_common as mamba_common
    monkeypatch.setattr(mamba_common, "_rows_per_scan", lambda device: rows_per_scan)
    q, k, v, a, gamma, eta, state = _inputs(2, T, R, 3, 8, 5)
    eta = eta if trapezoid else None
    if with_state and not trapezoid:
        state = RecurrentState(state.ssm)
    state = state if with_state else None
    o, s = trapezoid_scan(q, k, v, a, gamma, eta, state, chunk_size=chunk)
    o_ref, s_ref = naive_recurrence(q, k, v, a, gamma, eta, state)
    assert o.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.ssm, s_ref.ssm, rtol=1e-10, atol=1e-10)


def test_chunk_scan_gradients_match_token_serial_float64():
    """Every input's gradient (q, k, v, decay, both weights, the carried state) through the all-chunks-at-once scan
    equals the token-serial loop's, with a ragged last chunk."""
    q, k, v, a, gamma, eta, state = _inputs(2, 37, 2, 3, 4, 5, seed=2)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, a, gamma, eta, state.ssm, state.k_last, state.v_last)]
    probe_o, probe_s = torch.randn(2, 37, 2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, 4, dtype=torch.float64)

    def grads(scan):
        *inputs, ssm, k_last, v_last = leaves
        o, s = scan(*inputs, RecurrentState(ssm, k_last, v_last))
        return torch.autograd.grad((o * probe_o).sum() + (s.ssm * probe_s).sum(), leaves)

    got = grads(lambda *x: trapezoid_scan(*x, chunk_size=8))
    want = grads(naive_recurrence)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_segments_and_steps_continue_exactly():
    """prefill in two segments, then one-token steps == one pass (trapezoid pending term carried across)."""
    q, k, v, a, gamma, eta, state = _inputs(1, 30, 2, 2, 4, 3, seed=1)
    o_full, s_full = naive_recurrence(q, k, v, a, gamma, eta, state)
    cut = lambda x, i, j: x[:, i:j]  # noqa: E731
    o1, st = trapezoid_scan(*(cut(x, 0, 11) for x in (q, k, v, a, gamma, eta)), state, chunk_size=4)
    o2, st = trapezoid_scan(*(cut(x, 11, 20) for x in (q, k, v, a, gamma, eta)), st, chunk_size=4)
    outs = [o1, o2]
    for t in range(20, 30):
        o, st = trapezoid_step(q[:, t], k[:, t], v[:, t], a[:, t], gamma[:, t], eta[:, t], st)
        outs.append(o[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), o_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.ssm, s_full.ssm, rtol=1e-10, atol=1e-10)


def test_chunk_scan_fp32_strong_decay_is_finite():
    """exp of masked (upper-triangle) segment sums, within a chunk or across chunks, must never be formed: strong
    decays keep the outputs, the state and every gradient finite."""
    B, T, H, N, P = 1, 64, 2, 4, 4
    q, k, v = torch.randn(B, T, 1, H, N), torch.randn(B, T, 1, H, N), torch.randn(B, T, 1, H, P)
    a = torch.full((B, T, H), -30.0)
    leaves = [x.requires_grad_(True) for x in (q, k, v, a)]
    o, s = chunk_scan(q, k, v, a, torch.ones(B, T, H), torch.ones(B, T, H), None, chunk_size=16)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    grads = torch.autograd.grad(o.sum() + s.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------ mixers vs token loops
def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("A_log", "dt_bias"):
                continue
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() > 1 else 0.5) + (
                1.0 if name.endswith(("norm.weight", "D", "bias")) and p.dim() == 1 and "proj" not in name else 0.0))
    return module


def _rms(x, w, eps, group=None):
    shape = x.shape
    g = x.reshape(*shape[:-1], -1, group or shape[-1])
    return (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + eps)).reshape(shape) * w


def mamba2_tokenwise(m: Mamba2Mixer, u: torch.Tensor) -> torch.Tensor:
    """mamba-ssm Mamba2.step's torch path, one token at a time. u [T, d] float64."""
    c = m.config
    H, P, G, N, W = c.num_heads, c.head_dim, c.n_groups, c.state_size, c.conv_kernel
    conv_w, conv_b = m.conv1d.weight[:, 0, :], m.conv1d.bias
    conv_state = torch.zeros(c.conv_dim, W, dtype=u.dtype)
    ssm = torch.zeros(H, P, N, dtype=u.dtype)
    A = -torch.exp(m.A_log)
    outs = []
    for t in range(u.shape[0]):
        zxbcdt = m.in_proj(u[t])
        z, xBC, dt = torch.split(zxbcdt, [c.ssm_dim, c.conv_dim, H])
        conv_state = torch.roll(conv_state, -1, dims=-1)
        conv_state[:, -1] = xBC
        xBC = F.silu((conv_state * conv_w).sum(-1) + conv_b)
        x, B, C = torch.split(xBC, [c.ssm_dim, G * N, G * N])
        x, B, C = x.reshape(H, P), B.reshape(G, N), C.reshape(G, N)
        dt = F.softplus(dt + m.dt_bias)
        y = torch.zeros(H, P, dtype=u.dtype)
        for h in range(H):
            grp = h // (H // G)
            ssm[h] = ssm[h] * torch.exp(dt[h] * A[h]) + dt[h] * torch.outer(x[h], B[grp])
            y[h] = ssm[h] @ C[grp] + m.D[h] * x[h]
        y = _rms(y.reshape(-1) * F.silu(z), m.norm.weight, m.norm.eps, c.ssm_dim // G)
        outs.append(m.out_proj(y))
    return torch.stack(outs)


def _rotate_ref(x, angle, pairwise):
    """x [R, H, N], angle [H, A]: as apply_rotary_qk_inference_reference (pairwise or halves)."""
    out = x.clone()
    A, N = angle.shape[-1], x.shape[-1]
    for i in range(A):
        i0, i1 = (2 * i, 2 * i + 1) if pairwise else (i, N // 2 + i)
        cos, sin = torch.cos(angle[:, i]), torch.sin(angle[:, i])
        out[..., i0] = x[..., i0] * cos - x[..., i1] * sin
        out[..., i1] = x[..., i0] * sin + x[..., i1] * cos
    return out


def mamba3_tokenwise(m: Mamba3Mixer, u: torch.Tensor) -> torch.Tensor:
    """mamba-ssm Mamba3.step (rotary reference + fused step reference), one token at a time. u [T, d] float64."""
    c = m.config
    H, R, G, N, P, A_n = c.num_heads, c.rank, c.n_groups, c.state_size, c.head_dim, c.num_rope_angles
    angle_state = torch.zeros(H, A_n, dtype=u.dtype)
    ssm = torch.zeros(H, P, N, dtype=u.dtype)
    k_state = torch.zeros(R, H, N, dtype=u.dtype)
    v_state = torch.zeros(H, P, dtype=u.dtype)
    ones = torch.ones(R, H, P, dtype=u.dtype)
    xp = m.mimo_x.permute(1, 0, 2) if c.is_mimo else ones
    zp = m.mimo_z.permute(1, 0, 2) if c.is_mimo else ones
    op = m.mimo_o.permute(1, 0, 2) if c.is_mimo else ones
    outs = []
    for t in range(u.shape[0]):
        z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(
            m.in_proj(u[t]), [c.d_inner, c.d_inner, N * G * R, N * G * R, H, H, H, A_n])
        A = torch.clamp(-F.softplus(dd_A), max=-c.A_floor)
        DT = F.softplus(dd_dt + m.dt_bias)
        trap = torch.sigmoid(trap)
        B = _rms(B.reshape(R, G, N), m.B_norm.weight, m.B_norm.eps).repeat_interleave(H // G, dim=1)
        C = _rms(C.reshape(R, G, N), m.C_norm.weight, m.C_norm.eps).repeat_interleave(H // G, dim=1)
        angle = angle_state + torch.tanh(ang)[None, :] * DT[:, None] * math.pi
        q = _rotate_ref(C + m.C_bias.permute(1, 0, 2), angle, pairwise=not c.is_mimo)
        k = _rotate_ref(B + m.B_bias.permute(1, 0, 2), angle, pairwise=not c.is_mimo)
        x, z = x.reshape(H, P), z.reshape(H, P)
        alpha = torch.exp(A * DT)
        beta, gamma = (1 - trap) * DT * alpha, trap * DT
        x_vals, xs_vals = x[None] * xp, v_state[None] * xp
        ssm = (ssm * alpha[:, None, None] + torch.einsum("rhp,rhn->hpn", x_vals * gamma[None, :, None], k)
               + torch.einsum("rhp,rhn->hpn", xs_vals * beta[None, :, None], k_state))
        out_r = torch.einsum("hpn,rhn->rhp", ssm, q) + x_vals * m.D[None, :, None]
        z_r = z[None] * zp
        if c.is_outproj_norm:
            out_r = _rms(out_r.reshape(R, -1), m.norm.weight, m.norm.eps, P).reshape(R, H, P) * F.silu(z_r)
        else:
            out_r = out_r * F.silu(z_r)
        y = (out_r * op).sum(0)
        outs.append(m.out_proj(y.reshape(-1)))
        angle_state, k_state, v_state = angle, k, x
    return torch.stack(outs)


@pytest.mark.parametrize("groups", [1, 2])
def test_mamba2_mixer_matches_tokenwise_step(groups):
    torch.manual_seed(0)
    cfg = Mamba2MixerConfig(hidden_size=32, state_size=8, head_dim=8, n_groups=groups, chunk_size=16)
    m = _randomize(Mamba2Mixer(cfg), 1).double()
    u = torch.randn(1, 41, 32, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(u)
        ref = mamba2_tokenwise(m, u[0])
    torch.testing.assert_close(y[0], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mimo,outproj_norm,groups,rope", [
    (False, False, 1, 0.5), (False, True, 2, 1.0), (True, False, 1, 0.5), (True, True, 2, 0.5), (True, False, 1, 1.0),
])
def test_mamba3_mixer_matches_tokenwise_step(mimo, outproj_norm, groups, rope):
    torch.manual_seed(0)
    cfg = Mamba3MixerConfig(hidden_size=32, state_size=16, head_dim=8, n_groups=groups, rope_fraction=rope,
                            is_mimo=mimo, mimo_rank=3, is_outproj_norm=outproj_norm, chunk_size=8)
    m = _randomize(Mamba3Mixer(cfg), 2).double()
    u = torch.randn(1, 29, 32, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(u)
        ref = mamba3_tokenwise(m, u[0])
    torch.testing.assert_close(y[0], ref, rtol=1e-9, atol=1e-9)
