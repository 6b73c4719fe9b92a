"""Tiny random models of every family for CPU tests of EvalModel paths: HF-format folders written with
baselines.common.write_checkpoint_folder and loaded through the registry (float64 by default)."""
from __future__ import annotations

import torch

from baselines.common import write_checkpoint_folder
from harness.bundled import BPE_4K
from harness.registry import get_family, load_model

TINY_FLA = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, vocab_size=4096, intermediate_size=128,
                norm_eps=1e-5, max_position_embeddings=512)
CONFIGS = {
    "gdn2": dict(model_type="gdn2", vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16,
                 intermediate_size=128),
    "gated_deltanet": {**TINY_FLA, "model_type": "gated_deltanet", "expand_v": 2.0},
    "kda": {**TINY_FLA, "model_type": "kda"},
    "kda-hybrid": {**TINY_FLA, "model_type": "kda",
                   "attn": {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 24}},
    "mamba2": {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "vocab_size": 4096,
               "hidden_size": 32, "state_size": 8, "head_dim": 8, "expand": 2, "n_groups": 1, "num_hidden_layers": 2,
               "chunk_size": 16, "conv_kernel": 4, "tie_word_embeddings": False},
    "mamba3": {"model_type": "mamba3", "architectures": ["Mamba3ForCausalLM"], "vocab_size": 4096,
               "hidden_size": 32, "state_size": 16, "head_dim": 8, "expand": 2, "n_groups": 1, "num_hidden_layers": 2,
               "chunk_size": 16, "is_mimo": False, "tie_word_embeddings": False},
    "transformer": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=128, vocab_size=4096, max_position_embeddings=512,
                        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0),
}
# The models run in float64, but the fla-format families keep their decay parameters in fp32 (keep_fp32), so their
# results carry fp32 rounding, which a batched matmul may sum in another order (seen: 1.1e-7 relative). Padding that
# reached a real position would change it by O(1).
RTOL = 1e-6
FAMILIES = ["gdn2", "gated_deltanet", "kda", "kda-hybrid", "mamba2", "mamba3", "transformer"]


def random_lm(name: str):
    """A random model of the family with its 1-D parameters (norms, biases, D) moved off their constant init."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    if name == "gdn2":
        from gdn2 import GDN2Config, GDN2ForCausalLM

        lm = GDN2ForCausalLM(GDN2Config(**{k: v for k, v in config.items() if k != "model_type"}))
    elif name.startswith("mamba"):
        from baselines.mamba2 import build_mamba2, mamba2_configs
        from baselines.mamba3 import build_mamba3, mamba3_configs

        make, build = (mamba2_configs, build_mamba2) if name == "mamba2" else (mamba3_configs, build_mamba3)
        lm = build(make(config))
    elif name == "transformer":
        from baselines.transformer import build_llama

        lm = build_llama(config)
    else:
        lm = get_family(config["model_type"]).build_reference(config)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if p.dim() == 1 and not n.endswith(("A_log", "dt_bias")):
                p.add_(0.2 * torch.randn_like(p))
    return lm




def load_tiny(name: str, folder, dtype=torch.float64):
    """The family's tiny random model written to folder and loaded as an EvalModel on the CPU."""
    write_checkpoint_folder(folder, CONFIGS[name], random_lm(name).state_dict(), BPE_4K)
    return load_model(str(folder), device="cpu", dtype=dtype, tokenizer=str(BPE_4K))


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(5, 4096, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
