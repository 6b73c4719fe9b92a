"""Mamba-2 / Mamba-3 families: tiny checkpoints written here in fla format (config.json + model.safetensors) and
mamba-ssm format (config.json + pytorch_model.bin, backbone.embedding names, tied head), loaded through the harness;
prefill + decode == full forward; parameter and state counts at the paper's config; named errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from baselines.mamba2 import Mamba2Family, build_mamba2, mamba2_configs
from baselines.mamba3 import Mamba3Family, build_mamba3, mamba3_configs
from harness.registry import get_family, load_model, parse_spec

TOKENIZER = str(Path(__file__).resolve().parents[1] / "harness" / "bundled" / "bpe-4k")

FLA_M2 = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "vocab_size": 4096, "hidden_size": 32,
          "state_size": 8, "head_dim": 8, "expand": 2, "n_groups": 1, "num_hidden_layers": 2, "chunk_size": 16,
          "conv_kernel": 4, "tie_word_embeddings": False}
FLA_M3 = {"model_type": "mamba3", "architectures": ["Mamba3ForCausalLM"], "vocab_size": 4096, "hidden_size": 32,
          "state_size": 16, "head_dim": 8, "expand": 2, "n_groups": 1, "num_hidden_layers": 2, "chunk_size": 16,
          "is_mimo": False, "tie_word_embeddings": False}
FLA_M3_MIMO = {**FLA_M3, "is_mimo": True, "mimo_rank": 2, "chunk_size": 8, "is_outproj_norm": True}
SSM_M2 = {"d_model": 32, "n_layer": 2, "vocab_size": 4090, "pad_vocab_size_multiple": 8, "d_intermediate": 0,
          "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16},
          "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "tie_embeddings": True,
          "attn_layer_idx": [], "attn_cfg": {}}
SSM_M3 = {"d_model": 32, "n_layer": 2, "vocab_size": 4096, "d_intermediate": 64,
          "ssm_cfg": {"layer": "Mamba3", "d_state": 16, "headdim": 8, "is_mimo": True, "mimo_rank": 2,
                      "chunk_size": 8},
          "rms_norm": True, "tie_embeddings": True}

FAMILIES = {"mamba2": (mamba2_configs, build_mamba2), "mamba3": (mamba3_configs, build_mamba3)}


def _random_lm(family, config, seed=0):
    make, build = FAMILIES[family]
    torch.manual_seed(seed)
    lm = build(make(config)).eval()
    with torch.no_grad():                      # make constant-initialised parameters random as well
        for name, p in lm.named_parameters():
            if name.endswith(("D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "norm.weight", "norm_f.weight")):
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return lm


def write_fla(tmp_path, family, config, name="fla"):
    lm = _random_lm(family, config)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(folder / "model.safetensors"))
    return folder, lm


def write_mamba_ssm(tmp_path, family, config, name="ssm"):
    """As MambaLMHeadModel.save_pretrained: backbone.embedding.* names, lm_head.weight saved too (tied)."""
    lm = _random_lm(family, config)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in lm.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    return folder, lm


def _logits(lm, ids):
    with torch.no_grad():
        return lm(ids).logits


@pytest.mark.parametrize("family,config", [("mamba2", FLA_M2), ("mamba3", FLA_M3), ("mamba3", FLA_M3_MIMO)])
def test_fla_format_loads_and_matches(tmp_path, family, config):
    folder, original = write_fla(tmp_path, family, config)
    model = load_model(f"{family}={folder}", device="cpu", tokenizer=TOKENIZER)
    assert parse_spec(str(folder)) == (family, str(folder))           # bare path: config.json names the family
    assert model.family == family and model.backend.startswith("torch reference")
    ids = torch.randint(0, 4096, (1, 45))
    torch.testing.assert_close(_logits(model.lm, ids), _logits(original, ids), rtol=0, atol=0)
    assert model.state_floats_per_layer() == 8 * 8 * config["state_size"]    # H=8 heads of 8, N=state_size
    lp = model.loglikelihood([("The quick brown", " fox")])
    assert len(lp) == 1 and lp[0][0] < 0


@pytest.mark.parametrize("family,config", [("mamba2", SSM_M2), ("mamba3", SSM_M3)])
def test_mamba_ssm_format_loads_with_tied_head(tmp_path, family, config):
    folder, original = write_mamba_ssm(tmp_path, family, config)
    assert parse_spec(str(folder))[0] == family
    with pytest.raises(FileNotFoundError, match="GPT-NeoX"):
        load_model(f"{family}={folder}", device="cpu")
    model = load_model(str(folder), device="cpu", tokenizer=TOKENIZER)
    lm = model.lm
    assert lm.lm_head.weight is lm.backbone.embeddings.weight
    assert lm.backbone.embeddings.num_embeddings == 4096                # vocab padded to the multiple (4090 -> 4096)
    ids = torch.randint(0, 4090, (1, 33))
    torch.testing.assert_close(_logits(lm, ids), _logits(original, ids), rtol=0, atol=0)


def test_names_and_shapes_equal_fla_models():
    """Our state dict == fla 0.6.0's Mamba2ForCausalLM / Mamba3ForCausalLM state dict (names and shapes)."""
    fla_models = pytest.importorskip("fla.models")
    for family, config, cls, cfg_cls in [
        ("mamba2", FLA_M2, fla_models.Mamba2ForCausalLM, fla_models.Mamba2Config),
        ("mamba3", FLA_M3, fla_models.Mamba3ForCausalLM, fla_models.Mamba3Config),
        ("mamba3", FLA_M3_MIMO, fla_models.Mamba3ForCausalLM, fla_models.Mamba3Config),
    ]:
        fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        with torch.device("meta"):
            theirs = cls(cfg_cls(**fields))
            ours = FAMILIES[family][1](FAMILIES[family][0](config))
        shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
        assert shapes(ours) == shapes(theirs)


@pytest.mark.parametrize("family,config", [("mamba2", FLA_M2), ("mamba3", FLA_M3), ("mamba3", FLA_M3_MIMO),
                                           ("mamba3", SSM_M3)])
def test_prefill_then_decode_equals_full_forward(family, config):
    lm = _random_lm(family, config, seed=3)
    ids = torch.randint(0, 4096, (1, 50))
    with torch.no_grad():
        full = lm(ids).logits
        out = lm(ids[:, :21], use_cache=True)          # prefill longer than a chunk, not a multiple of it
        cache, parts = out.past_key_values, [out.logits]
        out = lm(ids[:, 21:40], past_key_values=cache, use_cache=True)   # a second segment continues the state
        parts.append(out.logits)
        for t in range(40, 50):                         # then one token at a time (recurrent step)
            out = lm(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.seen_tokens == 50
    before = cache.state_bytes()
    with torch.no_grad():
        lm(ids[:, :1], past_key_values=cache, use_cache=True)
    assert cache.state_bytes() == before               # O(1) state per token


def test_generate_greedy_runs(tmp_path):
    folder, _ = write_fla(tmp_path, "mamba3", FLA_M3_MIMO)
    model = load_model(str(folder), device="cpu", tokenizer=TOKENIZER)
    ids = model.generate_ids(model.encode("Once upon a time"), max_new_tokens=6)
    assert len(ids) <= 6


def test_mismatched_weights_name_the_tensors(tmp_path):
    folder, lm = write_fla(tmp_path, "mamba2", FLA_M2)
    state = dict(lm.state_dict())
    state.pop("backbone.layers.1.mixer.A_log")
    state["backbone.layers.0.mixer.conv1d.weight"] = torch.zeros(3, 1, 4)
    state["backbone.layers.0.mixer.extra"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_model(f"mamba2={folder}", device="cpu", tokenizer=TOKENIZER)
    message = str(err.value)
    for name in ("backbone.layers.1.mixer.A_log", "backbone.layers.0.mixer.conv1d.weight",
                 "backbone.layers.0.mixer.extra"):
        assert name in message


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not 'Mamba2'"):
        mamba2_configs({**SSM_M2, "ssm_cfg": {"layer": "Mamba3"}})
    with pytest.raises(ValueError, match="hybrid"):
        mamba2_configs({**SSM_M2, "attn_layer_idx": [1]})
    with pytest.raises(ValueError, match="unsupported Mamba3 ssm_cfg keys"):
        mamba3_configs({**SSM_M3, "ssm_cfg": {"layer": "Mamba3", "bogus": 1}})
    with pytest.raises(ValueError, match="rope_fraction"):
        mamba3_configs({**FLA_M3, "rope_fraction": 0.25})


def test_claims():
    m2, m3 = get_family("mamba2"), get_family("mamba3")
    assert m2.claims(FLA_M2) and not m3.claims(FLA_M2)
    assert m3.claims(FLA_M3) and not m2.claims(FLA_M3)
    assert m2.claims(SSM_M2) and not m3.claims(SSM_M2)
    assert m3.claims(SSM_M3) and not m2.claims(SSM_M3)
    mamba1 = {**SSM_M2, "ssm_cfg": {}}
    assert not m2.claims(mamba1) and not m3.claims(mamba1)
    assert isinstance(m2, Mamba2Family) and isinstance(m3, Mamba3Family)
    assert "torch reference" in m2.backend(torch.device("cpu")) and "torch reference" in m3.backend(torch.device("cpu"))


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_model("mamba2=state-spaces/mamba2-130m", device="cpu")


def test_conformance_hook_skips_on_cpu():
    from harness.doctor import ConformanceSkipped

    for family in ("mamba2", "mamba3"):
        with pytest.raises(ConformanceSkipped, match="runs only on CUDA"):
            get_family(family).conformance_models(torch.device("cpu"))


# ------------------------------------------------------------------------------------------ the paper's config
PAPER = {"hidden_size": 2048, "expand": 2, "head_dim": 64, "state_size": 64, "n_groups": 1}


def _mixer_params(family, extra):
    make, build = FAMILIES[family]
    config = {"model_type": family, "vocab_size": 32000, "num_hidden_layers": 1, **PAPER, **extra}
    with torch.device("meta"):
        lm = build(make(config))
    return sum(p.numel() for p in lm.backbone.layers[0].mixer.parameters()), make(config).mixer.state_floats()


def test_paper_config_counts():
    """d_model 2048, expand 2, head dim 64 (H = 64), d_state 64: state 64*64*64 = 262,144 floats per layer.
    Mamba-2 mixer: in_proj 2048*(2*4096 + 2*64 + 64) + conv (4096+128)*(4+1) + 3*64 + norm 4096 + out 4096*2048.
    Mamba-3 SISO: in_proj 2048*(2*4096 + 2*64 + 3*64 + 16) + B/C biases 2*64*64 + B/C norms 2*64 + dt_bias, D + out.
    Mamba-3 MIMO (rank 4): in_proj 2048*(2*4096 + 2*64*4 + 3*64 + 16) + biases 2*64*4*64 + mimo_x/z/o 3*64*4*64 + ..."""
    m2, s2 = _mixer_params("mamba2", {})
    assert m2 == 2048 * 8384 + 4224 * 5 + 3 * 64 + 4096 + 4096 * 2048 == 25_584_448
    m3, s3 = _mixer_params("mamba3", {})
    assert m3 == 2048 * 8528 + 2 * 64 * 64 + 2 * 64 + 2 * 64 + 4096 * 2048 == 25_862_400
    m3m, s3m = _mixer_params("mamba3", {"is_mimo": True, "mimo_rank": 4})
    assert m3m == 2048 * 8912 + 2 * 64 * 4 * 64 + 3 * 64 * 4 * 64 + 2 * 64 + 2 * 64 + 4096 * 2048 == 26_722_560
    assert s2 == s3 == s3m == 262_144
    for family, cfg in (("mamba2", {}), ("mamba3", {}), ("mamba3", {"is_mimo": True, "mimo_rank": 4})):
        assert get_family(family).state_floats_per_layer({"model_type": family, **PAPER, **cfg}) == 262_144


@pytest.mark.parametrize("family,config", [("mamba2", FLA_M2), ("mamba3", FLA_M3)])
def test_training_loss_with_labels_equals_the_loss_of_the_logits(family, config):
    """With labels and autograd on, MambaLM's loss is the chunked linear cross-entropy (no logits kept): the same
    loss and the same gradient of every parameter as cross-entropy over its full logits, in float64; ignored labels
    (-100) count for nothing. Without autograd it returns the logits and their loss."""
    lm = _random_lm(family, config).double().train()
    ids = torch.randint(0, config["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 5:9] = -100

    def loss_and_grads(fused: bool):
        lm.zero_grad(set_to_none=True)
        if fused:
            out = lm(ids, labels=labels)
            assert out.logits is None
            loss = out.loss
        else:
            logits = lm(ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in lm.parameters()]

    fused, plain = loss_and_grads(True), loss_and_grads(False)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        out = lm(ids, labels=labels)
    assert out.logits.shape == (2, 21, config["vocab_size"])
    torch.testing.assert_close(out.loss, plain[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm_before_gate,groups", [(False, 1), (False, 4), (True, 4)])
def test_gated_norm_out_equals_the_two_modules(norm_before_gate, groups):
    """gated_norm_out (one Function that keeps y, z and 1/rms and recomputes the normed output) against
    out_proj(GroupedRMSNormGated(y, z)): output and the gradients of y, z, the norm weight and the projection weight
    agree in float64, for Mamba-2's order (gate, then norm) and Mamba-3's (norm, then gate), over one group and
    several; under bf16 autocast the outputs are the same bits; and the Function keeps less."""
    from baselines.mamba_common import GroupedRMSNormGated, gated_norm_out
    from tests.test_baselines_fla import kept_and_gradients

    gen = torch.Generator().manual_seed(4)
    norm = GroupedRMSNormGated(32, eps=1e-5, group_size=32 // groups, norm_before_gate=norm_before_gate)
    out_proj = torch.nn.Linear(32, 24, bias=False)
    with torch.no_grad():
        norm.weight.mul_(1 + 0.3 * torch.randn(32, generator=gen))
    mods = torch.nn.ModuleList([norm, out_proj]).double()
    y = torch.randn(2, 7, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    z = torch.randn(2, 7, 32, dtype=torch.float64, generator=gen, requires_grad=True)

    def run(fused: bool):
        def forward():
            out = gated_norm_out(norm, out_proj, y, z, torch.float64) if fused else out_proj(norm(y, z))
            return out, (out * torch.linspace(-1, 1, 24, dtype=torch.float64)).square().sum()
        y.grad = z.grad = None
        kept, grads = kept_and_gradients(mods, forward)
        return kept, grads + [y.grad.clone(), z.grad.clone()]

    fused_kept, fused = run(True)
    modules_kept, modules = run(False)
    for a, b in zip(fused, modules, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fused_kept < modules_kept
    mods.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        yb, zb = y.detach().bfloat16(), z.detach().bfloat16()
        assert torch.equal(gated_norm_out(norm, out_proj, yb, zb, torch.float32), out_proj(norm(yb, zb).float()))


def training_loss_fused_and_as_modules(family, config, hooked) -> tuple[int, int]:
    """A tiny float64 model's training loss and every gradient, fused and with hooked(lm)'s modules run as
    themselves (tests.test_baselines_fla.fused_matches_modules: asserted equal); returns the bytes kept each way."""
    from tests.test_baselines_fla import fused_matches_modules

    lm = _random_lm(family, config).double().train()
    ids = torch.randint(0, config["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(3))

    def run():
        loss = lm(ids, labels=ids).loss
        return loss, loss

    return fused_matches_modules(lm, run, hooked(lm))


@pytest.mark.parametrize("family,config", [("mamba2", FLA_M2), ("mamba3", {**FLA_M3, "is_outproj_norm": True}),
                                           ("mamba3", FLA_M3_MIMO)])
def test_mixers_output_path_fused_equals_the_modules(family, config):
    """The Mamba mixers run their gated norm and out_proj as gated_norm_out (Mamba-2; Mamba-3 SISO with
    is_outproj_norm; MIMO's per-rank norm stays as modules); a forward hook on each out_proj makes them run as the
    two modules. The loss and every parameter's gradient agree in float64, and the fused model keeps less for the
    backward pass (MIMO, with nothing fused, the same)."""
    fused_kept, modules_kept = training_loss_fused_and_as_modules(
        family, config, lambda lm: [layer.mixer.out_proj for layer in lm.backbone.layers])
    assert fused_kept < modules_kept if not config.get("is_mimo") else fused_kept == modules_kept


@pytest.mark.parametrize("family,config", [("mamba2", FLA_M2), ("mamba3", FLA_M3), ("mamba3", FLA_M3_MIMO)])
def test_pre_norm_fused_into_in_proj_equals_the_modules(family, config):
    """In training the Mamba blocks run their pre-norm inside the mixer's in_proj (gdn2.fused.norm_linears); a
    forward hook on each block's norm makes it run as a module instead. The loss and every parameter's gradient
    agree in float64, and the fused blocks keep less for the backward pass."""
    fused_kept, modules_kept = training_loss_fused_and_as_modules(
        family, config, lambda lm: [layer.norm for layer in lm.backbone.layers])
    assert fused_kept < modules_kept


@pytest.mark.parametrize("family,config", [("mamba2", FLA_M2), ("mamba3", FLA_M3), ("mamba3", FLA_M3_MIMO)])
def test_left_padded_batch_equals_each_row_alone(family, config):
    """Mamba-2 and Mamba-3 take a left-padded batch (attention_mask 0 before a row's tokens): Mamba-2's mixers zero
    the conv inputs and outputs at padded positions (a conv bias far from 0 here would otherwise write into the
    state), Mamba-3's zero x and DT (no write, no decay, no rotary advance, a zero previous value for the first
    token's trapezoid term). Every row's logits and state equal the row alone, and so does the next step, over
    several chunks (tests.test_baselines_fla.assert_left_padding_is_exact)."""
    from tests.test_baselines_fla import assert_left_padding_is_exact

    lm = _random_lm(family, config).double()
    if family == "mamba2":
        with torch.no_grad():
            for layer in lm.backbone.layers:
                layer.mixer.conv1d.bias.add_(1.0)
    assert_left_padding_is_exact(lm, [40, 23, 5], config["vocab_size"])
