"""GDN-2 layer and causal LM: decoding equals the full forward, save/load, parameter counts, registration."""
import pytest
import torch

import gdn2
from gdn2 import GDN2Config, GDN2ForCausalLM, named_config
from gdn2.layer import GatedDeltaNet2
from gdn2.modeling import RMSNorm


def tiny_model(seed=0, **overrides) -> GDN2ForCausalLM:
    torch.manual_seed(seed)
    config = named_config("gdn2-tiny", vocab_size=97, **overrides)
    return GDN2ForCausalLM(config).eval()


@pytest.mark.parametrize("overrides", [{}, {"num_v_heads": 4}, {"output_gate_activation": "sigmoid"},
                                       {"erase_gate": "scalar", "write_gate": "scalar", "num_v_heads": 4}])
def test_prefill_then_decode_equals_full_forward(overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :70], use_cache=True)            # chunkwise prefill over more than one chunk
        cache, pieces = out.past_key_values, [out.logits]
        for t in range(70, 150):                              # then one token at a time
            step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            pieces.append(step.logits)
    assert cache.get_seq_length() == 150
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("erase_gate, write_gate", [("scalar", "channel"), ("channel", "scalar")])
def test_scalar_gate_equals_channel_gate_with_one_value_per_head(erase_gate, write_gate):
    """A scalar gate (one per head) is the channel-wise gate whose projection rows repeat the head's row: the
    channel model built that way gives the same logits (the Table 5 ablations are GDN-2 with tied channels)."""
    ablated = tiny_model(erase_gate=erase_gate, write_gate=write_gate, num_v_heads=4)
    full = tiny_model(num_v_heads=4)
    state = ablated.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("b_proj.weight", "w_proj.weight")):
            channels = full.state_dict()[name].shape[0] // tensor.shape[0]
            state[name] = tensor.repeat_interleave(channels, dim=0)
    full.load_state_dict(state)
    mixer = ablated.model.layers[0].attn
    assert mixer.b_proj.out_features == (2 if erase_gate == "scalar" else 64)   # 2 heads of K = 32
    assert mixer.w_proj.out_features == (4 if write_gate == "scalar" else 128)  # 4 value heads of V = 32
    ids = torch.randint(0, 97, (2, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ablated(ids).logits, full(ids).logits, rtol=1e-5, atol=1e-5)


def test_unknown_gate_granularity_is_refused():
    with pytest.raises(ValueError, match="erase_gate must be one of"):
        named_config("gdn2-tiny", erase_gate="per-key")


def test_cache_memory_is_constant_per_token():
    model = tiny_model()
    with torch.no_grad():
        cache = model(torch.randint(0, 97, (1, 10)), use_cache=True).past_key_values
        before = cache.state_bytes()
        for _ in range(20):
            cache = model(torch.randint(0, 97, (1, 1)), past_key_values=cache, use_cache=True).past_key_values
    assert cache.state_bytes() == before


def test_generate_is_greedy_decoding_with_the_cache():
    model = tiny_model()
    prompt = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, seq)


def test_save_load_round_trip(tmp_path):
    gdn2.register()
    from transformers import AutoModelForCausalLM

    model = tiny_model(num_v_heads=4, output_gate_activation="sigmoid")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GDN2ForCausalLM) and loaded.config.output_gate_activation == "sigmoid"
    ids = torch.randint(0, 97, (1, 80))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_register_leaves_fla_registrations_alone():
    pytest.importorskip("fla.models", reason="fla is an optional GPU extra")
    import fla.models  # noqa: F401  (fla registers its model types at import)
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    before = CONFIG_MAPPING["gated_deltanet"]
    gdn2.register()
    gdn2.register()  # idempotent
    assert CONFIG_MAPPING["gated_deltanet"] is before
    assert type(AutoConfig.for_model("gdn2")) is GDN2Config


def test_paper_config_parameter_counts_on_meta():
    with torch.device("meta"):
        model = GDN2ForCausalLM(named_config("gdn2-1.3B"))
    assert sum(p.numel() for p in model.model.layers.parameters()) == 1_302_638_112
    assert sum(p.numel() for p in model.model.layers[0].attn.parameters()) == 29_454_480
    assert model.config.state_floats_per_layer() == 16 * 128 * 128 == 262_144


def test_mixer_init_follows_the_official_code():
    torch.manual_seed(0)
    layer = GatedDeltaNet2(hidden_size=256, num_heads=4, head_dim=64)
    bound = 2 ** -2.5 * (6 / (256 + 256)) ** 0.5          # xavier-uniform bound for q_proj (256 -> 256)
    assert layer.q_proj.weight.abs().max() <= bound and layer.q_proj.weight.abs().max() > 0.9 * bound
    assert torch.all(layer.g_proj[1].bias == 0)
    A = layer.A_log.exp()
    assert A.min() >= 1 and A.max() <= 16
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
    assert layer.A_log.dtype == torch.float32 and layer.dt_bias.dtype == torch.float32


def test_output_gate_activation_changes_the_output():
    torch.manual_seed(0)
    silu = GatedDeltaNet2(hidden_size=64, num_heads=2, head_dim=16, output_gate_activation="silu")
    sigm = GatedDeltaNet2(hidden_size=64, num_heads=2, head_dim=16, output_gate_activation="sigmoid")
    sigm.load_state_dict(silu.state_dict())
    x = torch.randn(1, 10, 64)
    ys, _ = silu(x)
    yg, _ = sigm(x)
    assert not torch.allclose(ys, yg)
    with pytest.raises(ValueError, match="output_gate_activation"):
        GDN2Config(output_gate_activation="relu")


def test_right_padding_is_refused_not_leaked_into_state():
    """Left padding is skipped exactly (tests/test_gdn2_padding.py); padding after a token is refused."""
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with pytest.raises(ValueError, match="padding_side = 'left'") as refused:
        model(ids, attention_mask=mask)
    # the advice names nothing forward refuses: it takes no packed (cu_seqlens) input
    assert "cu_seqlens" not in str(refused.value)
    with pytest.raises(TypeError, match="cu_seqlens"):
        model(ids.reshape(1, 16), cu_seqlens=torch.tensor([0, 8, 16]))


def test_a_training_step_lowers_the_loss():
    # a training step is another use of the same model code: fit one short batch
    model = tiny_model().train()
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_reorder_cache_selects_batch_rows():
    # beam search reorders the cache: after swapping rows, decoding continues each row's own sequence
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model(ids[:, :39], use_cache=True).past_key_values
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped = model(ids[[1, 0], 39:], past_key_values=cache, use_cache=True).logits
        full = model(ids[[1, 0]], use_cache=False).logits[:, -1:]
    torch.testing.assert_close(swapped, full, rtol=1e-5, atol=1e-5)


def test_chunk_recompute_in_the_first_layers_only():
    """chunk_recompute_enable(layers=N) turns the recompute on in the first N GDN-2 mixers (None: all; 0: none),
    keeps a byte count between the two ends, and refuses a count outside 0..L with the range in the message."""
    from benchmarks.saved_bytes import kept_bytes

    torch.manual_seed(0)
    model = GDN2ForCausalLM(GDN2Config(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_heads=2, head_dim=16,
                                       intermediate_size=64))
    flags = lambda: [m.recompute_chunk for m in model.modules() if isinstance(m, GatedDeltaNet2)]  # noqa: E731
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}
    for layers, expected in ((None, [True] * 3), (1, [True, False, False]), (0, [False] * 3)):
        model.chunk_recompute_enable(layers=layers)
        assert flags() == expected
        kept[layers], _ = kept_bytes(lambda: model(ids, labels=ids, use_cache=False), exclude=params)
    assert kept[None] < kept[1] < kept[0], kept
    model.chunk_recompute_enable(False, layers=2)
    assert flags() == [False] * 3
    for bad in (4, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"from 0 to 3 \(None: all\); got"):
            model.chunk_recompute_enable(layers=bad)


class ShiftedLinear(torch.nn.Linear):
    """A LoRA-like wrapper: the linear plus a trainable shift its own forward adds."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False, dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.shift = torch.nn.Parameter(torch.full((linear.out_features,), 0.1, dtype=linear.weight.dtype))

    def forward(self, x):
        return super().forward(x) + self.shift


class ShiftedNorm(RMSNorm):
    """An RMSNorm subclass whose own forward adds a trainable shift."""

    def __init__(self, norm: RMSNorm):
        super().__init__(norm.weight.numel(), norm.eps)
        self.weight = norm.weight
        self.shift = torch.nn.Parameter(torch.full_like(norm.weight, 0.1))

    def forward(self, x):
        return super().forward(x) + self.shift


def test_training_runs_wrapped_or_hooked_modules_as_themselves():
    """The fused training Functions read module weights directly; a module that is a subclass or wrapper (LoRA-like;
    a norm subclass) or has a forward hook must run as itself: every replaced module's shift gets a gradient, every
    hook fires, and the training loss equals the no-grad loss of the same model (float64, no autocast)."""
    torch.manual_seed(0)
    model = GDN2ForCausalLM(GDN2Config(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_heads=2, head_dim=16,
                                       intermediate_size=64)).double()
    block = model.model.layers[0]
    wrapped = {"q_proj": block.attn, "o_proj": block.attn, "up_proj": block.mlp, "down_proj": block.mlp}
    for name, parent in wrapped.items():
        setattr(parent, name, ShiftedLinear(getattr(parent, name)))
    model.lm_head = ShiftedLinear(model.lm_head)
    third = model.model.layers[2]                   # norm subclasses beside plain linears
    third.attn_norm, third.mlp_norm = ShiftedNorm(third.attn_norm), ShiftedNorm(third.mlp_norm)
    calls = []
    second = model.model.layers[1]
    for module in (second.attn_norm, second.mlp.gate_proj, second.attn.o_norm):
        module.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    with torch.no_grad():
        reference = model(ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-12, atol=0)
    shifted = [getattr(parent, name) for name, parent in wrapped.items()]
    shifted += [model.lm_head, third.attn_norm, third.mlp_norm]
    assert all(m.shift.grad is not None and m.shift.grad.abs().sum() > 0 for m in shifted)
    assert sorted(calls) == sorted(["RMSNorm", "Linear", "GatedRMSNorm"] * 2)        # one training, one no-grad pass


def test_saved_bytes_by_module_counts_the_fused_training_path():
    """benchmarks/saved_bytes.py follows modules without hooking them (a hooked module runs unfused): the fused pieces
    stay on (no linear that reads a pre-norm keeps anything of its own), and the bytes by module add up to every byte
    the forward keeps."""
    from benchmarks.saved_bytes import kept_bytes, saved_bytes_by_module

    torch.manual_seed(0)
    model = GDN2ForCausalLM(GDN2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16,
                                       intermediate_size=64))
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    by_module = saved_bytes_by_module(model, ids, "cpu")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = kept_bytes(lambda: model(input_ids=ids, labels=ids), exclude=params)
    assert sum(by_module.values()) == total
    fused_away = ("q_proj", "k_proj", "v_proj", "b_proj", "w_proj", "gate_proj", "up_proj", "o_proj", "down_proj")
    assert not [name for name in by_module if name.rsplit(".", 1)[-1] in fused_away], sorted(by_module)
