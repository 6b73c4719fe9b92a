"""Gated DeltaNet, KDA and their sliding-window hybrids: the pure-torch reference paths against independent
references (fla's naive recurrences, a token-serial GDN-2 reduction, brute-force attention), fla-format folders
loaded through harness.load_model, prefill + decode == full forward, parameter counts."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from baselines.common import (
    LayerStates,
    SlidingWindowAttention,
    apply_rotary,
    gated_delta_rule,
    write_checkpoint_folder,
)
from harness.bundled import BPE_4K
from harness.registry import get_family, load_model

HAS_FLA = importlib.util.find_spec("fla") is not None
needs_fla = pytest.mark.skipif(not HAS_FLA, reason="flash-linear-attention is not installed (extras [gpu])")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, vocab_size=4096, intermediate_size=128,
            norm_eps=1e-5, max_position_embeddings=512)
HYBRID_ATTN = {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 24, "rope_theta": 10000.0}
CONFIGS = {
    "gated_deltanet": {**TINY, "model_type": "gated_deltanet", "expand_v": 2.0,
                       "architectures": ["GatedDeltaNetForCausalLM"]},
    "gated_deltanet-gva": {**TINY, "model_type": "gated_deltanet", "expand_v": 1.0, "num_v_heads": 4,
                           "use_gate": False},
    "gated_deltanet-hybrid": {**TINY, "model_type": "gated_deltanet", "expand_v": 1.0, "attn": HYBRID_ATTN},
    "kda": {**TINY, "model_type": "kda", "architectures": ["KDAForCausalLM"]},
    "kda-gva-bounded": {**TINY, "model_type": "kda", "num_v_heads": 4, "lower_bound": -5.0, "safe_gate": True},
    "kda-hybrid": {**TINY, "model_type": "kda", "attn": HYBRID_ATTN},
}


def family_of(name: str):
    return get_family(CONFIGS[name]["model_type"])


def random_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    lm = family_of(name).build_reference(CONFIGS[name])
    with torch.no_grad():  # norms and biases away from 1 / 0 so that a mix-up would show
        for n, p in lm.named_parameters():
            if p.dim() == 1 and not n.endswith(("A_log", "dt_bias")):
                p.add_(0.2 * torch.randn_like(p))
    return lm.eval()


# ------------------------------------------------------------------------------ independent mixer references
def l2n(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def causal_conv_silu(x, conv):
    """x [B, T, D] through a depthwise causal conv (weight [D, 1, W]) and SiLU, written out with F.pad."""
    W = conv.weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), conv.weight, conv.bias, groups=x.shape[-1])
    return F.silu(y.transpose(1, 2))


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def gdn_mixer_by_hand(m, x, recurrence):
    """fla.layers.GatedDeltaNet.forward written out (H == Hv) with a given token-serial recurrence."""
    B, T, _ = x.shape
    q = l2n(causal_conv_silu(m.q_proj(x), m.q_conv1d).view(B, T, m.num_heads, -1))
    k = l2n(causal_conv_silu(m.k_proj(x), m.k_conv1d).view(B, T, m.num_heads, -1))
    v = causal_conv_silu(m.v_proj(x), m.v_conv1d).view(B, T, m.num_v_heads, -1)
    beta = m.b_proj(x).sigmoid()
    g = -m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias)
    o = recurrence(q, k, v, g, beta)
    o = rms(o, m.o_norm.weight, m.o_norm.eps)
    if m.use_gate:
        o = o * F.silu(m.g_proj(x).view(B, T, m.num_v_heads, -1))
    return m.o_proj(o.reshape(B, T, -1))


def kda_mixer_by_hand(m, x, recurrence):
    B, T, _ = x.shape
    q = l2n(causal_conv_silu(m.q_proj(x), m.q_conv1d).view(B, T, m.num_heads, -1))
    k = l2n(causal_conv_silu(m.k_proj(x), m.k_conv1d).view(B, T, m.num_heads, -1))
    v = causal_conv_silu(m.v_proj(x), m.v_conv1d).view(B, T, m.num_v_heads, -1)
    beta = m.b_proj(x).sigmoid()
    pre = (m.f_proj(x) + m.dt_bias).view(B, T, m.num_v_heads, -1)
    if m.lower_bound is None:
        g = -m.A_log.exp()[:, None] * F.softplus(pre)
    else:
        g = m.lower_bound * torch.sigmoid(m.A_log.exp()[:, None] * pre)
    o = recurrence(q, k, v, g, beta)
    o = rms(o, m.o_norm.weight, m.o_norm.eps) * torch.sigmoid(m.g_proj(x).view(B, T, m.num_v_heads, -1))
    return m.o_proj(o.reshape(B, T, -1))


def gdn2_reduction(q, k, v, g, beta):
    """GDN / KDA as the token-serial GDN-2 reference with b = w = beta (gdn2.ops.naive; no chunking)."""
    from gdn2.ops import naive_recurrent_gdn2

    Hv, K, V = v.shape[2], q.shape[-1], v.shape[-1]
    q, k = (x.repeat_interleave(Hv // x.shape[2], 2) for x in (q, k))
    if g.dim() == 3:
        g = g[..., None].expand(*g.shape, K)
    b, w = beta[..., None].expand(*beta.shape, K), beta[..., None].expand(*beta.shape, V)
    return naive_recurrent_gdn2(q, k, v, g, b, w)[0]


def fla_naive_gdn(q, k, v, g, beta):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    return naive_recurrent_gated_delta_rule(q, k, v, beta, g)[0]


def fla_naive_kda(q, k, v, g, beta):
    from fla.ops.kda.naive import naive_recurrent_kda

    return naive_recurrent_kda(q, k, v, g, beta)[0]


def first_mixer(lm):
    return lm.model.layers[0].attn


def kept_and_gradients(module: torch.nn.Module, run) -> tuple[int, list[torch.Tensor]]:
    """run() -> (output, loss) under benchmarks.saved_bytes.kept_bytes, then loss.backward(): (bytes autograd kept
    beyond the parameters, [output] + every parameter's gradient)."""
    from benchmarks.saved_bytes import kept_bytes

    module.zero_grad(set_to_none=True)
    kept, (output, loss) = kept_bytes(run, exclude={p.untyped_storage().data_ptr() for p in module.parameters()})
    loss.backward()
    return kept, [output.detach()] + [p.grad.clone() for p in module.parameters()]


def fused_matches_modules(module: torch.nn.Module, run, hooked) -> tuple[int, int]:
    """kept_and_gradients of run() as it is (fused) and with a no-op forward hook on each module of `hooked` (which
    makes it run as itself, gdn2.fused.plain); asserts the output and every gradient agree in float64 and returns
    (bytes kept fused, bytes kept as modules)."""
    fused_kept, fused = kept_and_gradients(module, run)
    hooks = [m.register_forward_hook(lambda m, args, out: None) for m in hooked]
    try:
        modules_kept, modules = kept_and_gradients(module, run)
    finally:
        for hook in hooks:
            hook.remove()
    for a, b in zip(fused, modules, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    return fused_kept, modules_kept


def state_tensors(state) -> list[torch.Tensor]:
    """Every tensor of a layer state (recurrent or SSM state, conv buffers, a Mamba-3 rotary angle), in order."""
    from gdn2.cache import map_tensors

    found: list[torch.Tensor] = []
    map_tensors(state, lambda t: found.append(t) or t)
    return found


def assert_left_padding_is_exact(lm: torch.nn.Module, lengths: list[int], vocab_size: int) -> None:
    """A left-padded batch of random rows of these lengths (attention_mask 0 before a row's tokens) through lm: each
    row's logits at its real positions, the next step's logits and every tensor of every layer's state equal the row
    run alone, to 1e-6 in float64 (the torch chunk path moves by ~1e-8 with the batch it runs in, without any
    padding; padding that reached a real position would move them by O(1))."""
    rows = [torch.randint(1, vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]
    longest = max(lengths)
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    assert lm.masks_left_padding
    with torch.no_grad():
        batch = lm(ids, attention_mask=mask, use_cache=True)
        nxt = torch.arange(5, 5 + len(rows))[:, None]
        step = lm(nxt, past_key_values=batch.past_key_values, use_cache=True,
                  attention_mask=torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1))
        for i, r in enumerate(rows):
            alone = lm(torch.tensor([r]), use_cache=True)
            torch.testing.assert_close(batch.logits[i, longest - len(r):], alone.logits[0], rtol=1e-6, atol=1e-6)
            alone_step = lm(nxt[i:i + 1], past_key_values=alone.past_key_values, use_cache=True)
            torch.testing.assert_close(step.logits[i], alone_step.logits[0], rtol=1e-6, atol=1e-6)
            for layer, layer_alone in zip(step.past_key_values.states, alone_step.past_key_values.states,
                                          strict=True):
                state = [t[i] for t in state_tensors(layer)]
                assert len(state) >= 2                  # the recurrent state and a conv buffer or angle at least
                torch.testing.assert_close(state, [t[0] for t in state_tensors(layer_alone)], rtol=1e-6, atol=1e-6)


def mixer_output_and_loss(mixer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, _ = mixer(x)
    return y, y.square().sum()


@pytest.mark.parametrize("name", ["gated_deltanet", "gated_deltanet-gva"])
def test_gdn_mixer_matches_token_serial_reference(name):
    m = first_mixer(random_model(name))
    x = torch.randn(2, 80, 64)
    with torch.no_grad():
        ours, _ = m(x)
        ref = gdn_mixer_by_hand(m, x, gdn2_reduction)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), (ours - ref).abs().max()


@needs_fla
def test_gdn_mixer_matches_fla_naive_recurrence():
    m = first_mixer(random_model("gated_deltanet"))
    x = torch.randn(1, 90, 64)
    with torch.no_grad():
        ours, _ = m(x)
        ref = gdn_mixer_by_hand(m, x, fla_naive_gdn)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("name", ["kda", "kda-gva-bounded"])
def test_kda_mixer_matches_references(name):
    m = first_mixer(random_model(name))
    x = torch.randn(1, 90, 64)
    recurrences = [gdn2_reduction] + ([fla_naive_kda] if HAS_FLA else [])
    with torch.no_grad():
        ours, _ = m(x)
        for recurrence in recurrences:
            ref = kda_mixer_by_hand(m, x, recurrence)
            assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), (recurrence.__name__, (ours - ref).abs().max())


def test_gated_delta_rule_decode_continues_chunkwise_state():
    torch.manual_seed(0)
    B, T, H, Hv, K, V = 1, 70, 2, 4, 16, 8
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v, beta = torch.randn(B, T, Hv, V), torch.rand(B, T, Hv)
    g = -torch.rand(B, T, Hv, K) * 0.3
    with torch.no_grad():
        full, _ = gated_delta_rule(q, k, v, g, beta, None, False)
        o1, state = gated_delta_rule(q[:, :65], k[:, :65], v[:, :65], g[:, :65], beta[:, :65], None, True)
        o2, state = gated_delta_rule(q[:, 65:], k[:, 65:], v[:, 65:], g[:, 65:], beta[:, 65:], state, True)
    assert torch.allclose(torch.cat([o1, o2], 1), full, atol=1e-5)
    assert state.shape == (B, Hv, K, V) and state.dtype == torch.float32


# ------------------------------------------------------------------------------ attention
def brute_force_attention(layer, x):
    B, T, d = x.shape
    D = layer.head_dim
    pos = torch.arange(T)
    q = apply_rotary(layer.q_proj(x).view(B, T, -1, D), pos, layer.rope_theta).transpose(1, 2)
    k = apply_rotary(layer.k_proj(x).view(B, T, -1, D), pos, layer.rope_theta).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, -1, D).transpose(1, 2)
    group = layer.num_heads // layer.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (j <= i) & (j > i - (layer.window_size or T + 1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return layer.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d))


@pytest.mark.parametrize("window", [None, 7])
def test_sliding_window_attention_matches_brute_force_and_decodes(window):
    torch.manual_seed(0)
    layer = SlidingWindowAttention(32, num_heads=4, num_kv_heads=2, qkv_bias=True, window_size=window)
    layer.QUERY_BLOCK = 16  # several query blocks with the window straddling them
    x = torch.randn(2, 45, 32)
    with torch.no_grad():
        full, _ = layer(x)
        assert torch.allclose(full, brute_force_attention(layer, x), atol=1e-5)
        state, pieces = None, []
        for a, b in ((0, 20), (20, 21), (21, 22), (22, 45)):
            y, state = layer(x[:, a:b], state, True)
            pieces.append(y)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
    assert state.position == 45
    if window is not None:  # the windowed cache never holds more than window - 1 tokens
        assert state.keys.shape[1] == window - 1


@needs_fla
def test_rotary_matches_fla_reference():
    from fla.modules.rotary.ops import rotary_embedding_ref

    x = torch.randn(1, 12, 2, 16)
    pos = torch.arange(12).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    angles = torch.outer(pos, inv_freq)
    assert torch.allclose(apply_rotary(x, torch.arange(12), 10000.0),
                          rotary_embedding_ref(x, angles.cos(), angles.sin()), atol=1e-6)


# ------------------------------------------------------------------------------ whole models, folders, formats
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_plus_decode_equals_full_forward(name):
    lm = random_model(name)
    ids = torch.randint(0, 4096, (1, 150))
    with torch.no_grad():
        full = lm(ids).logits
        out = lm(ids[:, :100], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for t in range(100, 110):
            out = lm(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
        out = lm(ids[:, 110:], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
    assert isinstance(cache, LayerStates) and cache.seen_tokens == 150
    assert torch.allclose(torch.cat(pieces, 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gated_deltanet", "kda-hybrid"])
def test_fla_format_folder_loads_through_registry(tmp_path, name):
    lm = random_model(name)
    folder = write_checkpoint_folder(tmp_path / name, CONFIGS[name], lm.state_dict(), BPE_4K)
    model = load_model(str(folder), device="cpu")          # bare path: family from config.json
    assert model.family == CONFIGS[name]["model_type"]
    assert "torch reference" in model.backend and "need CUDA" in model.backend
    ids = torch.randint(0, 4096, (1, 70))
    with torch.no_grad():
        assert torch.equal(model.lm(ids).logits, lm(ids).logits)
    assert model.state_floats_per_layer() == 2 * 16 * 16 * (2 if name == "gated_deltanet" else 1)
    text = model.generate(["The quick brown fox"], max_new_tokens=5)[0]
    assert isinstance(text, str)
    (lp, greedy), = model.loglikelihood([("The quick brown", " fox")])
    assert lp < 0 and isinstance(greedy, bool)
    if name == "kda-hybrid":
        assert model.info["hybrid_attention_layers"] == [1] and model.max_length is None


@needs_fla
@pytest.mark.parametrize("name", ["gated_deltanet", "gated_deltanet-gva", "kda", "kda-gva-bounded"])
def test_reference_has_fla_names_and_shapes_and_loads_fla_save_pretrained(tmp_path, name):
    """fla's own model class, built on CPU (no forward: its kernels need CUDA) and saved with save_pretrained,
    loads strictly into the reference path: same parameter names and shapes, same tensors."""
    import warnings

    warnings.filterwarnings("ignore")
    import fla.models as fm

    family = family_of(name)
    fields = {k: v for k, v in CONFIGS[name].items() if k not in ("model_type", "architectures")}
    upstream = getattr(fm, family.upstream_class)(getattr(fm, family.upstream_config_class)(**fields))
    ours = family.build_reference(CONFIGS[name])
    assert {k: v.shape for k, v in upstream.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    upstream.save_pretrained(tmp_path / "ckpt")
    write_checkpoint_folder(tmp_path / "tok", {}, {}, BPE_4K)
    model = load_model(f"{family.name}={tmp_path / 'ckpt'}", device="cpu", tokenizer=str(tmp_path / "tok"))
    for key, tensor in upstream.state_dict().items():
        assert torch.equal(model.lm.state_dict()[key], tensor), key


def test_parameter_counts_and_paper_state_size():
    gdn, kda = get_family("gated_deltanet"), get_family("kda")
    assert gdn.state_floats_per_layer(gdn.paper_config) == 262_144
    assert kda.state_floats_per_layer(kda.paper_config) == 262_144
    lm = random_model("gated_deltanet")
    d, H, K, V, vocab = 64, 2, 16, 32, 4096
    mixer = 2 * d * H * K + d * H * V + 2 * d * H + 2 * H + (2 * H * K + H * V) * 4 + d * H * V + V + H * V * d
    mlp = 3 * d * 128
    expected = 2 * (mixer + mlp + 2 * d) + d
    assert sum(p.numel() for p in lm.parameters()) == expected + 2 * vocab * d
    from harness.model import EvalModel

    model = EvalModel("m", "gated_deltanet", lm, None, torch.device("cpu"), torch.float32, "-", "-", 0)
    assert model.num_params(non_embedding=True) == expected
    assert model.num_params(non_embedding=False) == expected + 2 * vocab * d


def test_bfloat16_load_keeps_decay_parameters_fp32(tmp_path):
    lm = random_model("kda")
    folder = write_checkpoint_folder(tmp_path / "kda", CONFIGS["kda"], lm.state_dict(), BPE_4K)
    model = load_model(f"kda={folder}", device="cpu", dtype="bfloat16")
    mixer = first_mixer(model.lm)
    assert mixer.q_proj.weight.dtype == torch.bfloat16 and mixer.A_log.dtype == torch.float32
    assert model.generate(["hello"], max_new_tokens=3)


def test_unsupported_fla_config_fields_are_refused(tmp_path):
    from baselines.common import ConfigError

    with pytest.raises(ConfigError, match="attnres_block_size=2"):
        get_family("gated_deltanet").build_reference({**CONFIGS["gated_deltanet"], "attnres_block_size": 2})
    with pytest.raises(ConfigError, match="hidden_act='powlu'"):
        get_family("kda").build_reference({**CONFIGS["kda"], "hidden_act": "powlu"})
    with pytest.raises(ConfigError, match="attn layer index 5"):
        get_family("kda").build_reference({**CONFIGS["kda"], "attn": {**HYBRID_ATTN, "layers": [5]}})
    with pytest.raises(ValueError, match="'tanh'"):
        get_family("gated_deltanet").build_reference({**CONFIGS["gated_deltanet"], "output_gate_activation": "tanh"})


def test_hybrid_with_full_attention_has_a_hard_context_limit(tmp_path):
    config = {**CONFIGS["gated_deltanet-hybrid"], "attn": {**HYBRID_ATTN, "window_size": None}}
    torch.manual_seed(0)
    lm = get_family("gated_deltanet").build_reference(config)
    model = load_model(str(write_checkpoint_folder(tmp_path / "full", config, lm.state_dict(), BPE_4K)), device="cpu")
    assert model.max_length == 512
    from harness.model import ContextTooLongError

    with pytest.raises(ContextTooLongError, match="context limit of 512"):
        model.loglikelihood([("word " * 600, " end")])


@pytest.mark.parametrize("name", ["gated_deltanet", "kda"])
def test_fused_output_norm_and_projection_equal_the_modules(name):
    """The mixers' o_proj(o_norm(o, gate)) runs as gdn2.fused's gated_rms_norm_linear (the normed output recomputed
    for o_proj's weight gradient, not kept); a forward hook on o_proj makes it run as the two modules instead.
    Output and every parameter's gradient agree in float64, and the fused path keeps less for the backward pass."""
    m = first_mixer(random_model(name)).double()
    x = torch.randn(2, 40, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fused_kept, modules_kept = fused_matches_modules(m, lambda: mixer_output_and_loss(m, x), [m.o_proj])
    assert fused_kept < modules_kept


@pytest.mark.parametrize("name", ["gated_deltanet", "gated_deltanet-gva", "gated_deltanet-hybrid", "kda",
                                  "kda-gva-bounded", "kda-hybrid"])
def test_pre_norms_fused_into_the_projections_equal_the_modules(name):
    """In training the blocks run their pre-norms inside the mixer's input projections (not the hybrids' attention
    layers, which take no norm) and the MLP's gate and up projections (gdn2.fused.norm_linears); forward hooks on the
    norms make them run as modules instead. The loss and every parameter's gradient agree in float64, and the fused
    blocks keep less for the backward pass."""
    lm = random_model(name).double().train()
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(2))

    def run():
        loss = lm(ids, labels=ids).loss
        return loss, loss

    norms = [module for block in lm.model.layers for module in (block.attn_norm, block.mlp_norm)]
    fused_kept, modules_kept = fused_matches_modules(lm, run, norms)
    assert fused_kept < modules_kept


@pytest.mark.parametrize("name", ["gated_deltanet", "kda"])
def test_decay_recomputed_in_the_backward_pass_gives_the_same_gradients(name, monkeypatch):
    """On the Triton path (the interpreter here, fp32) the mixers hand the chunk operator recompute_g (their decay run
    again on the input they keep), so it keeps no fp32 copy of g: every gradient is bit for bit the one the operator
    gives when it keeps g, and less is kept."""
    import functools

    import baselines.common
    import gdn2.ops

    monkeypatch.setattr(gdn2.ops, "chunk_gdn2", functools.partial(gdn2.ops.chunk_gdn2, backend="triton"))
    m = first_mixer(random_model(name)).train()
    x = torch.randn(1, 70, 64, generator=torch.Generator().manual_seed(4))
    recomputed_kept, recomputed = kept_and_gradients(m, lambda: mixer_output_and_loss(m, x))
    keep_g = baselines.common.gated_delta_rule
    monkeypatch.setattr(f"baselines.{name}.gated_delta_rule",
                        lambda *args, recompute_g=None: keep_g(*args, recompute_g=None))
    kept_kept, kept = kept_and_gradients(m, lambda: mixer_output_and_loss(m, x))
    for a, b in zip(recomputed, kept, strict=True):
        assert torch.equal(a, b)
    assert recomputed_kept < kept_kept


@pytest.mark.parametrize("name", ["gated_deltanet", "gated_deltanet-gva", "kda", "kda-gva-bounded"])
def test_left_padded_batch_equals_each_row_alone(name):
    """Our Gated DeltaNet and KDA models take a left-padded batch: every row's logits, recurrent state and conv
    inputs equal the row run alone, and so does the next step from the batched cache (assert_left_padding_is_exact,
    over more than one chunk). The hybrids refuse padding (their attention layers do not mask it) with an error
    naming the cause."""
    lm = random_model(name).double()
    assert_left_padding_is_exact(lm, [70, 23, 5], CONFIGS[name]["vocab_size"])
    ids, mask = torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    hybrid = random_model(name.split("-")[0] + "-hybrid").double()
    assert not hybrid.masks_left_padding
    with pytest.raises(ValueError, match="padding would enter the recurrent state"):
        hybrid(ids, attention_mask=mask)
