"""GDN-2 mixers interleaved with sliding-window attention: the hybrid stack that both an fla-format config with an
`attn` section (baselines.gdn2) and a converted lit_gpt swa_gdn2 checkpoint (baselines.gdn2_lit_gpt) build."""
from __future__ import annotations

import torch.nn as nn


def build_hybrid(config, attn_layers: dict[int, dict]) -> nn.Module:
    """GDN-2 mixers interleaved with sliding-window attention (fla's block names), as a MixerStackLM."""
    from baselines.common import build_mixer_stack
    from gdn2.layer import GatedDeltaNet2

    settings = dict(hidden_size=config.hidden_size, norm_eps=config.norm_eps, vocab_size=config.vocab_size,
                    num_hidden_layers=config.num_hidden_layers, intermediate_size=config.intermediate_size,
                    attn_layers=attn_layers, tie_word_embeddings=False)

    def mixer(i: int) -> nn.Module:
        return GatedDeltaNet2(hidden_size=config.hidden_size, num_heads=config.num_heads, head_dim=config.head_dim,
                              expand_v=config.expand_v, num_v_heads=config.num_v_heads, conv_size=config.conv_size,
                              use_short_conv=config.use_short_conv, allow_neg_eigval=config.allow_neg_eigval,
                              output_gate_activation=config.output_gate_activation, norm_eps=config.norm_eps,
                              layer_idx=i, erase_gate=config.erase_gate, write_gate=config.write_gate)

    lm = build_mixer_stack(settings, mixer, config=config)
    return lm
