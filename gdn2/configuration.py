"""GDN-2 model configuration (field names follow flash-linear-attention's configs)."""
from __future__ import annotations

from transformers import PretrainedConfig

OUTPUT_GATE_ACTIVATIONS = ("silu", "sigmoid")
GATE_GRANULARITIES = ("channel", "scalar")


class GDN2Config(PretrainedConfig):
    """Configuration of a GDN-2 causal LM: pre-norm blocks of (GDN-2 mixer, SwiGLU MLP), RMSNorm, untied head.

    output_gate_activation: "silu" as in the official GDN-2 code, "sigmoid" as in fla's GatedDeltaNet2 layer;
    the two conventions have identical parameter names, so this switch is what lets both kinds of weights load.
    erase_gate / write_gate: "channel" (GDN-2: one erase gate per key channel, one write gate per value channel) or
    "scalar" (one gate per head, broadcast over its channels): the paper's Table 5 ablations.
    max_position_embeddings: the context length the model was trained at (informational; recurrent models run past
    it, and the harness refuses longer contexts only when asked to).
    """

    model_type = "gdn2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 16,
        head_dim: int = 128,
        expand_v: float = 1.0,
        num_v_heads: int | None = None,
        intermediate_size: int | None = None,
        conv_size: int = 4,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        erase_gate: str = "channel",
        write_gate: str = "channel",
        output_gate_activation: str = "silu",
        norm_eps: float = 1e-5,
        hidden_act: str = "swish",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        if output_gate_activation not in OUTPUT_GATE_ACTIVATIONS:
            raise ValueError(
                f"output_gate_activation must be one of {OUTPUT_GATE_ACTIVATIONS}; got {output_gate_activation!r}"
            )
        for name, value in (("erase_gate", erase_gate), ("write_gate", write_gate)):
            if value not in GATE_GRANULARITIES:
                raise ValueError(f"{name} must be one of {GATE_GRANULARITIES}; got {value!r}")
        if hidden_act not in ("swish", "silu"):
            raise ValueError(f"hidden_act must be 'swish' (SwiGLU MLP); got {hidden_act!r}")
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if num_v_heads % num_heads != 0:
            raise ValueError(f"num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads}")
        if head_dim * expand_v != int(head_dim * expand_v):
            raise ValueError(f"head_dim * expand_v must be an integer; got {head_dim} * {expand_v}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.expand_v = expand_v
        self.num_v_heads = num_v_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else _swiglu_width(hidden_size)
        self.conv_size = conv_size
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.erase_gate = erase_gate
        self.write_gate = write_gate
        self.output_gate_activation = output_gate_activation
        self.norm_eps = norm_eps
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    def state_floats_per_layer(self) -> int:
        """Recurrent state size of one mixer: Hv * K * V floats (the short-conv caches are not counted)."""
        return self.num_v_heads * self.head_dim * self.head_v_dim


def _swiglu_width(hidden_size: int, multiple_of: int = 256) -> int:
    """Llama's rule: 2/3 of 4 * d, rounded up to a multiple of 256."""
    width = int(2 * (4 * hidden_size) / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


# Named configurations. "gdn2-1.3B" is the paper's recurrent model as in the official code (d_model 2304, 18 layers).
NAMED_CONFIGS: dict[str, dict] = {
    "gdn2-1.3B": dict(
        vocab_size=32000, hidden_size=2304, num_hidden_layers=18, num_heads=16, head_dim=128,
        intermediate_size=6208, max_position_embeddings=4096,
    ),
    "gdn2-tiny": dict(
        vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_heads=2, head_dim=32,
        intermediate_size=384, max_position_embeddings=4096,
    ),
}


def named_config(name: str, **overrides) -> GDN2Config:
    """A GDN2Config by name (see NAMED_CONFIGS), with field overrides."""
    if name not in NAMED_CONFIGS:
        raise KeyError(f"unknown GDN-2 config {name!r}; known: {sorted(NAMED_CONFIGS)}")
    return GDN2Config(**{**NAMED_CONFIGS[name], **overrides})
