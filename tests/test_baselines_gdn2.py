"""GDN-2 checkpoint formats: our HF folders (save_pretrained), fla-format GatedDeltaNet2 folders (sigmoid output
gate, fla field names, hybrids with sliding-window attention), and the official lit_gpt checkpoints."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from baselines.common import write_checkpoint_folder
from baselines.gdn2 import gdn2_config_fields, is_fla_config
from baselines.gdn2_lit_gpt import LitGPTConversionError, convert_lit_gpt_checkpoint
from baselines.gdn2_lit_gpt import main as convert_main
from gdn2 import GDN2Config, GDN2ForCausalLM
from harness.bundled import BPE_4K
from harness.registry import load_model

HAS_FLA = importlib.util.find_spec("fla") is not None
TINY = dict(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, intermediate_size=128)
FLA_GDN2 = dict(model_type="gated_deltanet2", architectures=["GatedDeltaNet2ForCausalLM"], hidden_size=64,
                num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=1.0, hidden_ratio=4, intermediate_size=None,
                vocab_size=4096, fuse_norm=True, fuse_swiglu=True, attn_mode="chunk", max_position_embeddings=1024)


def perturbed(lm):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if p.dim() == 1 and not n.endswith(("A_log", "dt_bias")):
                p.add_(0.2 * torch.randn_like(p))
    return lm.eval()


def our_model(**overrides):
    torch.manual_seed(0)
    return perturbed(GDN2ForCausalLM(GDN2Config(**{**TINY, **overrides})))


def ids(T=90, seed=0):
    return torch.randint(0, 4096, (1, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ our HF folders
def test_our_folder_via_save_pretrained_loads(tmp_path):
    lm = our_model()
    lm.save_pretrained(tmp_path / "m")
    write_checkpoint_folder(tmp_path / "m", {**lm.config.to_dict()}, lm.state_dict(), BPE_4K)  # + tokenizer files
    model = load_model(str(tmp_path / "m"), device="cpu")
    assert model.family == "gdn2" and isinstance(model.lm, GDN2ForCausalLM)
    with torch.no_grad():
        assert torch.equal(model.lm(ids()).logits, lm(ids()).logits)
    assert model.state_floats_per_layer() == 2 * 16 * 16


def test_gdn2_prefill_plus_decode_equals_full_through_evalmodel():
    model = load_model("gdn2-tiny-random", device="cpu")
    tokens = list(range(5, 205))
    full_lp, _ = model.token_logprobs(tokens, score_from=1, segment=4096)
    seg_lp, _ = model.token_logprobs(tokens, score_from=1, segment=7)   # 7-token segments continue the cache
    assert torch.allclose(full_lp, seg_lp, atol=1e-4)


# ------------------------------------------------------------------------------ fla-format GatedDeltaNet2
def fla_layer_by_hand(m, x):
    """fla.layers.gdn2.GatedDeltaNet2.forward written out with a token-serial recurrence (sigmoid output gate)."""
    if HAS_FLA:
        from fla.ops.gdn2.naive import naive_recurrent_gdn2
    else:
        from gdn2.ops import naive_recurrent_gdn2
    B, T, _ = x.shape

    def conv(p, c):
        W = c.weight.shape[-1]
        return F.silu(F.conv1d(F.pad(p(x).transpose(1, 2), (W - 1, 0)), c.weight, groups=c.weight.shape[0])
                      .transpose(1, 2))

    def l2n(t):
        return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)

    q = l2n(conv(m.q_proj, m.q_conv1d).view(B, T, m.num_heads, -1))
    k = l2n(conv(m.k_proj, m.k_conv1d).view(B, T, m.num_heads, -1))
    v = conv(m.v_proj, m.v_conv1d).view(B, T, m.num_v_heads, -1)
    g = (-m.A_log.exp()[:, None] * F.softplus(m.f_proj(x) + m.dt_bias).view(B, T, m.num_heads, -1))
    b = m.b_proj(x).sigmoid().view(B, T, m.num_heads, -1)
    w = m.w_proj(x).sigmoid().view(B, T, m.num_v_heads, -1)
    o = naive_recurrent_gdn2(q, k, v, g, b, w)[0]
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.o_norm.eps) * m.o_norm.weight
    o = o * torch.sigmoid(m.g_proj(x).view(B, T, m.num_v_heads, -1))
    return m.o_proj(o.reshape(B, T, -1))


@pytest.mark.parametrize("variant", ["gated_deltanet2", "gdn2-type-with-fla-fields"])
def test_fla_gdn2_folder_loads_into_our_model_with_sigmoid_gate(tmp_path, variant):
    config = dict(FLA_GDN2) if variant == "gated_deltanet2" else {
        **{k: v for k, v in FLA_GDN2.items() if k != "architectures"}, "model_type": "gdn2"}
    assert is_fla_config(config)
    fields, attn = gdn2_config_fields(config)
    assert fields["output_gate_activation"] == "sigmoid" and fields["norm_eps"] == 1e-6 and not attn
    assert fields["intermediate_size"] == 256  # fla's GatedMLP rule: 2/3 * 4 * 64 rounded up to 256
    source = perturbed(GDN2ForCausalLM(GDN2Config(**fields)))   # weights "trained with fla's layer"
    folder = write_checkpoint_folder(tmp_path / variant, config, source.state_dict(), BPE_4K)
    model = load_model(str(folder), device="cpu")
    assert isinstance(model.lm, GDN2ForCausalLM) and model.lm.config.output_gate_activation == "sigmoid"
    assert "sigmoid" in model.info["checkpoint_format"]
    mixer = model.lm.model.layers[0].attn
    x = torch.randn(1, 80, 64)
    with torch.no_grad():
        ours, _ = mixer(x)
        assert torch.allclose(ours, fla_layer_by_hand(mixer, x), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_FLA, reason="flash-linear-attention is not installed (extras [gpu])")
def test_our_gdn2_layer_has_fla_gdn2_layer_names_and_shapes():
    import warnings

    warnings.filterwarnings("ignore")
    from fla.layers.gdn2 import GatedDeltaNet2 as FLALayer

    theirs = FLALayer(hidden_size=64, head_dim=16, num_heads=2, num_v_heads=4, expand_v=2.0)
    ours = GDN2ForCausalLM(GDN2Config(**{**TINY, "num_v_heads": 4, "expand_v": 2.0})).model.layers[0].attn
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_fla_gdn2_hybrid_folder(tmp_path):
    config = {**FLA_GDN2, "attn": {"layers": [1], "num_heads": 4, "window_size": 16}, "tie_word_embeddings": True}
    from baselines.gdn2 import build_model

    torch.manual_seed(0)
    lm = perturbed(build_model(config))
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}  # tied: the head is not stored
    state["model.embeddings.weight"] = lm.lm_head.weight.detach().clone()
    folder = write_checkpoint_folder(tmp_path / "hyb", config, state, BPE_4K)
    model = load_model(f"gdn2={folder}", device="cpu")
    assert model.info["hybrid_attention_layers"] == [1] and model.max_length is None
    x = ids(120)
    with torch.no_grad():
        full = model.lm(x).logits
        out = model.lm(x[:, :50], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for t in range(50, 120):
            out = model.lm(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=2e-5, rtol=1e-4)


def test_fla_gdn2_conv_bias_is_refused(tmp_path):
    from baselines.common import ConfigError

    with pytest.raises(ConfigError, match="conv_bias"):
        gdn2_config_fields({**FLA_GDN2, "conv_bias": True})


# ------------------------------------------------------------------------------ official lit_gpt checkpoints
def to_lit_gpt(lm: GDN2ForCausalLM, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our weights under the official code's names (lit_gpt/model.py GPT, Block, LLaMAMLP -> SwiGLU w1/w2/w3)."""
    out = {prefix + "transformer.wte.weight": lm.model.embeddings.weight, prefix + "lm_head.weight": lm.lm_head.weight,
           prefix + "transformer.ln_f.weight": lm.model.norm.weight}
    for i, block in enumerate(lm.model.layers):
        h = f"{prefix}transformer.h.{i}."
        out[h + "norm_1.weight"] = block.attn_norm.weight
        out[h + "norm_2.weight"] = block.mlp_norm.weight
        out[h + "mlp.swiglu.w1.weight"] = block.mlp.gate_proj.weight
        out[h + "mlp.swiglu.w2.weight"] = block.mlp.up_proj.weight
        out[h + "mlp.swiglu.w3.weight"] = block.mlp.down_proj.weight
        for name, tensor in block.attn.state_dict().items():
            out[h + "attn." + name] = tensor
    return {k: v.detach().clone() for k, v in out.items()}


def lit_gpt_swiglu(x, w1, w2, w3):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w2), w3)


@pytest.fixture
def lit_checkpoint(tmp_path):
    lm = our_model()  # silu output gate, as the official layer
    path = tmp_path / "out" / "iter-000100-ckpt.pth"
    path.parent.mkdir()
    torch.save({"model": to_lit_gpt(lm, prefix="_forward_module."), "iter_num": 100, "step_count": 25}, path)
    return lm, path


def test_lit_gpt_checkpoint_converts_exactly(lit_checkpoint):
    lm, path = lit_checkpoint
    converted = convert_lit_gpt_checkpoint(path)
    assert converted.config.output_gate_activation == "silu"
    assert (converted.config.num_heads, converted.config.head_dim, converted.config.intermediate_size) == (2, 16, 128)
    with torch.no_grad():
        assert torch.equal(converted(ids()).logits, lm(ids()).logits)
        x = torch.randn(3, 64)
        state = torch.load(path, weights_only=True)["model"]
        p = "_forward_module.transformer.h.1.mlp.swiglu."
        assert torch.allclose(converted.model.layers[1].mlp(x),
                              lit_gpt_swiglu(x, state[p + "w1.weight"], state[p + "w2.weight"], state[p + "w3.weight"]))


def test_lit_gpt_checkpoint_through_registry_and_cli(lit_checkpoint, tmp_path):
    lm, path = lit_checkpoint
    model = load_model(f"gdn2={path}", device="cpu", tokenizer=str(BPE_4K))
    assert "lit_gpt" in model.info["converted_from"]
    with pytest.raises((ValueError, FileNotFoundError), match="--tokenizer"):
        load_model(f"gdn2={path}", device="cpu")
    assert convert_main([str(path.parent), str(tmp_path / "hf"), "--tokenizer", str(BPE_4K)]) == 0
    reloaded = load_model(str(tmp_path / "hf"), device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.lm(ids()).logits, lm(ids()).logits)


def test_lit_gpt_swa_hybrid_converts(tmp_path):
    """swa_gdn2 layout: block 1 is lit_gpt CausalSelfAttention with a fused qkv laid out per query group as
    [q_1..q_g, k, v] (here 4 heads of 16, 2 query groups, window 16)."""
    from baselines.gdn2 import build_hybrid

    torch.manual_seed(0)
    config = GDN2Config(**TINY)
    attn = {1: dict(num_heads=4, num_kv_heads=2, qkv_bias=False, window_size=16, rope_theta=10000.0)}
    hybrid = perturbed(build_hybrid(config, attn))
    state = {}
    for i, block in enumerate(hybrid.model.layers):
        h = f"transformer.h.{i}."
        state[h + "norm_1.weight"], state[h + "norm_2.weight"] = block.attn_norm.weight, block.mlp_norm.weight
        state[h + "mlp.swiglu.w1.weight"] = block.mlp.gate_proj.weight
        state[h + "mlp.swiglu.w2.weight"] = block.mlp.up_proj.weight
        state[h + "mlp.swiglu.w3.weight"] = block.mlp.down_proj.weight
        if i == 1:
            q, k, v = (w.view(-1, 16, 64) for w in (block.attn.q_proj.weight, block.attn.k_proj.weight,
                                                   block.attn.v_proj.weight))
            fused = [torch.cat([q[2 * g], q[2 * g + 1], k[g], v[g]]) for g in range(2)]
            state[h + "attn.attn.weight"] = torch.cat(fused)
            state[h + "attn.proj.weight"] = block.attn.o_proj.weight
        else:
            for name, tensor in block.attn.state_dict().items():
                state[h + "attn." + name] = tensor
    state.update({"transformer.wte.weight": hybrid.model.embeddings.weight, "lm_head.weight": hybrid.lm_head.weight,
                  "transformer.ln_f.weight": hybrid.model.norm.weight})
    torch.save({"model": {k: v.detach().clone() for k, v in state.items()}}, tmp_path / "swa.pth")
    converted = convert_lit_gpt_checkpoint(tmp_path / "swa.pth", attn_head_size=16, local_window=16)
    assert converted.attn_layers == attn
    with torch.no_grad():
        assert torch.allclose(converted(ids(60)).logits, hybrid(ids(60)).logits, atol=1e-5)
    assert convert_main([str(tmp_path / "swa.pth"), str(tmp_path / "hf"), "--attn-head-size", "16",
                         "--local-window", "16", "--tokenizer", str(BPE_4K)]) == 0
    reloaded = load_model(str(tmp_path / "hf"), device="cpu")
    assert reloaded.info["hybrid_attention_layers"] == [1] and reloaded.lm.config.output_gate_activation == "silu"
    with torch.no_grad():
        assert torch.allclose(reloaded.lm(ids(60)).logits, hybrid(ids(60)).logits, atol=1e-5)


def test_lit_gpt_bad_checkpoints_are_refused_by_name(lit_checkpoint, tmp_path):
    lm, _ = lit_checkpoint
    state = to_lit_gpt(lm)
    attention = {"transformer.h.1.attn.attn.weight": torch.zeros(40, 64), "transformer.h.1.attn.proj.weight":
                 torch.zeros(64, 64)}
    torch.save({**state, **attention}, tmp_path / "hybrid.pth")
    with pytest.raises(LitGPTConversionError, match=r"attn.attn.weight \(40, 64\) does not fit n_head=4"):
        convert_lit_gpt_checkpoint(tmp_path / "hybrid.pth", attn_head_size=16)
    attention["transformer.h.1.attn.attn.weight"] = torch.zeros(3 * 64, 64)  # fits; but GDN-2 tensors remain
    torch.save({**state, **attention}, tmp_path / "mixed.pth")
    with pytest.raises(LitGPTConversionError, match=r"no place in GDN2ForCausalLM: transformer.h.1.attn.A_log"):
        convert_lit_gpt_checkpoint(tmp_path / "mixed.pth", attn_head_size=16)
    torch.save({**state, "transformer.h.0.norm_1.bias": torch.zeros(64)}, tmp_path / "bias.pth")
    with pytest.raises(LitGPTConversionError, match="transformer.h.0.norm_1.bias"):
        convert_lit_gpt_checkpoint(tmp_path / "bias.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth could not be read"):
        convert_lit_gpt_checkpoint(tmp_path / "broken.pth")
    assert convert_main([str(tmp_path / "hybrid.pth"), str(tmp_path / "x")]) == 2
