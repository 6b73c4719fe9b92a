"""GDN-2 operators: torch chunkwise vs the token-serial recurrence, gradients, reductions to KDA / Gated DeltaNet."""
import pytest
import torch
import torch.nn.functional as F

from gdn2.ops import chunk_gdn2, naive_recurrent_gdn2, recurrent_step_gdn2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_inputs(B=2, T=65, H=2, Hv=4, K=16, V=8, dtype=torch.float64, seed=0, with_state=True, decay=0.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, Hv, V, generator=g, dtype=torch.float64)
    gate = -torch.rand(B, T, H, K, generator=g, dtype=torch.float64) * decay
    b = torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    w = torch.rand(B, T, Hv, V, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, Hv, K, V, generator=g, dtype=torch.float64) if with_state else None
    cast = [x.to(dtype) for x in (q, k, v, gate, b, w)]
    return (*cast, h0)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_naive_float64(T, with_state):
    q, k, v, g, b, w, h0 = make_inputs(T=T, with_state=with_state, seed=T)
    o_ref, s_ref = naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
    o, s = chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, backend="torch")
    assert o.dtype == torch.float64 and s.dtype == torch.float64 and s_ref.dtype == torch.float64
    assert rel_err(o, o_ref) < 1e-10
    assert rel_err(s, s_ref) < 1e-10


@pytest.mark.parametrize("decay", [0.5, 40.0])
def test_chunk_in_slices_matches_naive_float64(monkeypatch, decay):
    """The decayed pairwise products run in slices of at most _pairwise_budget elements (small on the CPU, to stay
    in cache): with a budget of one element every chunk and block is its own slice, and the result still matches
    the recurrence (decay 40: the strong-decay path)."""
    from gdn2.ops import chunk_torch

    q, k, v, g, b, w, h0 = make_inputs(T=200, decay=decay, seed=5)
    o_ref, s_ref = naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
    calls = []

    def one_element(device):
        calls.append(device.type)
        return 1

    monkeypatch.setattr(chunk_torch, "_pairwise_budget", one_element)
    o, s = chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, backend="torch")
    assert calls                                          # the sliced paths ran
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10


def test_strong_decay_does_not_overflow():
    # cumulative log-decay reaches about -64 * 20 inside a chunk: gamma_r / gamma_s would overflow, differences don't
    q, k, v, g, b, w, h0 = make_inputs(T=130, decay=40.0, seed=3)
    o_ref, s_ref = naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
    o, s = chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, backend="torch")
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10


def test_varlen_matches_separate_sequences():
    lengths = [5, 64, 70, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, g, b, w, _ = make_inputs(B=1, T=int(cu[-1]), seed=7)
    h0 = torch.randn(len(lengths), v.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)
    o, s = chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="torch")
    for n in range(len(lengths)):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        o_n, s_n = naive_recurrent_gdn2(*(x[:, sl] for x in (q, k, v, g, b, w)), initial_state=h0[n:n + 1],
                                        output_final_state=True)
        assert rel_err(o[:, sl], o_n) < 1e-10
        assert rel_err(s[n:n + 1], s_n) < 1e-10
    o_naive, s_naive = naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, o_naive) < 1e-10 and rel_err(s, s_naive) < 1e-10


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_low_precision_within_bounds(dtype, bound):
    # measured 2.5e-7 (fp32) and 3.5e-3 (bf16). fp32: accumulation-order rounding only (eps 1.2e-7);
    # bf16: inputs and output are rounded to 8 mantissa bits (2^-9 = 2e-3 relative each), same bound as the GPU check
    q, k, v, g, b, w, h0 = make_inputs(T=130, seed=11)
    o_ref, s_ref = naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
    lo = [x.to(dtype) for x in (q, k, v, g, b, w)]
    o, s = chunk_gdn2(*lo, initial_state=h0.float(), output_final_state=True, backend="torch")
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rel_err(o, o_ref) < bound and rel_err(s, s_ref) < bound


def test_fused_l2norm_equals_prenormalised():
    q, k, v, g, b, w, h0 = make_inputs(T=70, seed=5)
    k_raw = k * 3.0
    o1, _ = chunk_gdn2(q, k_raw, v, g, b, w, use_qk_l2norm_in_kernel=True, backend="torch")
    qn = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    kn = k_raw * torch.rsqrt((k_raw * k_raw).sum(-1, keepdim=True) + 1e-6)
    o2, _ = naive_recurrent_gdn2(qn, kn, v, g, b, w)
    assert rel_err(o1, o2) < 1e-10


def test_gradients_match_naive_autograd():
    inputs = make_inputs(B=1, T=70, H=1, Hv=2, K=8, V=4, seed=13)
    names = ["q", "k", "v", "g", "b", "w", "h0"]
    leaves_a = [x.clone().requires_grad_(True) for x in inputs]
    leaves_b = [x.clone().requires_grad_(True) for x in inputs]
    o_a, s_a = chunk_gdn2(*leaves_a[:6], initial_state=leaves_a[6], output_final_state=True, backend="torch")
    o_b, s_b = naive_recurrent_gdn2(*leaves_b[:6], initial_state=leaves_b[6], output_final_state=True)
    do = torch.randn_like(o_a)
    ds = torch.randn_like(s_a)
    ((o_a * do).sum() + (s_a * ds).sum()).backward()
    ((o_b * do).sum() + (s_b * ds).sum()).backward()
    for name, a, b in zip(names, leaves_a, leaves_b, strict=False):
        assert rel_err(a.grad, b.grad) < 1e-9, name


def test_naive_autograd_passes_gradcheck():
    # the oracle's own gradients, checked against finite differences (tiny shapes)
    inputs = make_inputs(B=1, T=5, H=1, Hv=1, K=3, V=2, seed=17)
    leaves = [x.clone().requires_grad_(True) for x in inputs]

    def fn(q, k, v, g, b, w, h0):
        o, s = naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
        return o, s

    assert torch.autograd.gradcheck(fn, leaves)


def kda_reference(q, k, v, g, beta, h0):
    """KDA written out independently: S = (I - beta k k^T) Diag(exp g) S + beta k v^T; o = S^T q / sqrt(K)."""
    B, T, H, K = q.shape
    S = h0.clone()
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for t in range(T):
        S = torch.exp(g[:, t])[..., None] * S
        kt, bt = k[:, t], beta[:, t][..., None]
        S = S - bt[..., None] * kt[..., None] * torch.einsum("bhk,bhkv->bhv", kt, S)[:, :, None, :]
        S = S + bt[..., None] * kt[..., None] * v[:, t][:, :, None, :]
        out[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t]) / K ** 0.5
    return out, S


def gated_deltanet_reference(q, k, v, alpha_log, beta, h0):
    """Gated DeltaNet: S = alpha (I - beta k k^T) S + beta k v^T with scalar alpha = exp(alpha_log) per head."""
    B, T, H, K = q.shape
    S = h0.clone()
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for t in range(T):
        S = torch.exp(alpha_log[:, t])[:, :, None, None] * S
        kt = k[:, t]
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + beta[:, t][:, :, None, None] * kt[..., None] * err[:, :, None, :]
        out[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t]) / K ** 0.5
    return out, S


def test_reduces_to_kda_with_tied_gates():
    q, k, v, g, _, _, h0 = make_inputs(B=2, T=70, H=2, Hv=2, K=8, V=6, seed=19)
    beta = torch.rand(2, 70, 2, dtype=torch.float64)
    b = beta[..., None].expand_as(k)
    w = beta[..., None].expand_as(v)
    o, s = chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True, backend="torch")
    o_ref, s_ref = kda_reference(q, k, v, g, beta, h0)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10


def test_reduces_to_gated_deltanet_with_scalar_decay():
    q, k, v, _, _, _, h0 = make_inputs(B=2, T=70, H=2, Hv=2, K=8, V=6, seed=23)
    beta = torch.rand(2, 70, 2, dtype=torch.float64)
    alpha_log = -torch.rand(2, 70, 2, dtype=torch.float64) * 0.3
    g = alpha_log[..., None].expand_as(k)
    o, s = chunk_gdn2(q, k, v, g, beta[..., None].expand_as(k), beta[..., None].expand_as(v),
                      initial_state=h0, output_final_state=True, backend="torch")
    o_ref, s_ref = gated_deltanet_reference(q, k, v, alpha_log, beta, h0)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10


def test_recurrent_step_continues_a_state():
    q, k, v, g, b, w, h0 = make_inputs(T=9, seed=29)
    o_ref, s_ref = naive_recurrent_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
    state = h0.clone()
    outs = []
    for t in range(0, 9, 3):  # three calls of three tokens each, state updated in place
        o, returned = recurrent_step_gdn2(*(x[:, t:t + 3] for x in (q, k, v, g, b, w)), state, backend="torch")
        assert returned is state
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), o_ref) < 1e-12 and rel_err(state, s_ref) < 1e-12


def test_bad_shapes_are_named():
    q, k, v, g, b, w, h0 = make_inputs(T=4)
    with pytest.raises(ValueError, match="w must have v's shape"):
        chunk_gdn2(q, k, v, g, b, w[..., :3], backend="torch")
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gdn2(q, k, v, g, b, w, initial_state=h0[:1], backend="torch")
    with pytest.raises(ValueError, match="multiple of the key heads"):
        chunk_gdn2(q, k, v[:, :, :3], g, b, w[:, :, :3], backend="torch")
    with pytest.raises(ValueError, match="backend"):
        chunk_gdn2(q, k, v, g, b, w, backend="cuda")


def test_recurrent_step_names_bad_shapes():
    q, k, v, g, b, w, h0 = make_inputs(T=2)
    with pytest.raises(ValueError, match="initial_state must be"):
        recurrent_step_gdn2(q, k, v, g, b, w, h0[:1], backend="torch")
    with pytest.raises(ValueError, match="g must have q's shape"):
        recurrent_step_gdn2(q, k, v, g[..., :3], b, w, h0.clone(), backend="torch")
