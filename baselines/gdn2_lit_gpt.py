"""Convert checkpoints of the official GDN-2 training code (lit_gpt GPT, chutesai/GatedDeltaNet-2) into our
GDN2ForCausalLM.

The official model (lit_gpt/model.py) is GPT: transformer.wte -> transformer.h[i] = Block(norm_1, attn, norm_2,
mlp) -> transformer.ln_f -> lm_head. With gdn2_per_layer=1 every block's `attn` is lit_gpt.gdn2.GatedDeltaNet2,
whose parameter names are ours (q/k/v_proj, q/k/v_conv1d, f_proj.0/1, b_proj, w_proj, A_log, dt_bias, g_proj.0/1,
o_norm, o_proj) with the SiLU output gate; the MLP is LLaMAMLP -> SwiGLU(w1, w2, w3): w3(silu(w1 x) * w2 x).

    transformer.wte.weight              -> model.embeddings.weight
    transformer.h.{i}.norm_1.weight     -> model.layers.{i}.attn_norm.weight
    transformer.h.{i}.attn.<name>       -> model.layers.{i}.attn.<name>
    transformer.h.{i}.norm_2.weight     -> model.layers.{i}.mlp_norm.weight
    transformer.h.{i}.mlp.swiglu.w1/w2/w3.weight -> model.layers.{i}.mlp.gate_proj / up_proj / down_proj.weight
    transformer.ln_f.weight             -> model.norm.weight
    lm_head.weight                      -> lm_head.weight

Sizes come from the tensors (heads from A_log, head_dim from q_proj, value head dim from g_proj.0, MLP width
from w1, vocabulary = padded_vocab_size from wte). The checkpoint carries no config, so norm_eps (1e-5 in every
official config) and the training context (block_size 4096) are arguments. GDN-2+ blocks are refused by name.

Hybrids (swa_gdn2_1.3B: gdn2_per_layer=2, the odd blocks are CausalSelfAttention with a fused qkv `attn.attn`
[(n_head + 2 n_query_groups) * head_size, d] laid out per query group as [q_1..q_g, k, v], output `attn.proj`,
RoPE on the full head (rotary_percentage 1.0, base 10000), window local_window) become GDN-2 blocks interleaved with
baselines.common.SlidingWindowAttention (q_proj/k_proj/v_proj split out of the fused weight, o_proj = proj).
The attention head size (128 in every official config) and the window (2048) are arguments.

CLI:  python -m baselines.gdn2_lit_gpt CHECKPOINT OUT_DIR [--tokenizer PATH] [--norm-eps 1e-5] [--block-size 4096]
writes an HF folder (config.json + model.safetensors [+ tokenizer files]) that `gdn2=OUT_DIR` loads (a hybrid is
written as an fla-format GatedDeltaNet2 folder with an `attn` section and the SiLU gate named explicitly).
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import torch

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
WRAPPER_PREFIXES = ("_forward_module.", "_orig_mod.", "module.")
MLP_NAMES = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
GDN2_PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_conv1d.weight", "k_conv1d.weight",
               "v_conv1d.weight", "f_proj.0.weight", "f_proj.1.weight", "b_proj.weight", "w_proj.weight", "A_log",
               "dt_bias", "g_proj.0.weight", "g_proj.1.weight", "g_proj.1.bias", "o_norm.weight", "o_proj.weight")


class LitGPTConversionError(ValueError):
    """A lit_gpt checkpoint that cannot become a GDN2ForCausalLM; the message names the tensors."""


def find_lit_gpt_file(path: Path) -> Path:
    """The checkpoint file: `path` itself, or the single .pth/.pt/.ckpt file in the folder `path`."""
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"lit_gpt checkpoint {path} does not exist")
    files = sorted(f for f in path.iterdir() if f.suffix in CHECKPOINT_SUFFIXES)
    if len(files) != 1:
        raise FileNotFoundError(f"expected one lit_gpt checkpoint (*.pth, *.pt, *.ckpt) in {path}; found "
                                f"{[f.name for f in files] or 'none'}: pass the file itself")
    return files[0]


def read_lit_gpt_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a lit_gpt checkpoint: a bare GPT state dict, or a training checkpoint {"model": ..., ...};
    wrapper prefixes (_forward_module., _orig_mod., module.) are removed."""
    file = find_lit_gpt_file(Path(path).expanduser())
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"lit_gpt checkpoint {file} could not be read ({type(err).__name__}: {err}); it is "
                         "corrupt, truncated, or holds pickled objects other than tensors") from err
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file} holds no state dict of tensors (top-level keys: "
                         f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")
    state = {}
    for name, tensor in obj.items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = tensor
    return state


def lit_gpt_to_gdn2(state: dict[str, torch.Tensor], norm_eps: float = 1e-5, max_position_embeddings: int = 4096,
                    allow_neg_eigval: bool = False, source: str = "checkpoint", attn_head_size: int = 128,
                    local_window: int | None = 2048):
    """lit_gpt GPT state dict -> (GDN2Config, state dict in our names, {layer: attention settings} for hybrids).
    Raises LitGPTConversionError naming every tensor it cannot place."""
    from gdn2 import GDN2Config

    def need(name: str) -> torch.Tensor:
        if name not in state:
            raise LitGPTConversionError(f"{source}: tensor {name!r} is missing; is this a lit_gpt GDN-2 checkpoint?")
        return state[name]

    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise LitGPTConversionError(f"{source}: no contiguous transformer.h.N blocks (found layers {layers})")
    attention = [i for i in layers if f"transformer.h.{i}.attn.attn.weight" in state]
    recurrent = [i for i in layers if i not in attention]
    if not recurrent:
        raise LitGPTConversionError(f"{source}: no GDN-2 blocks (every block is softmax attention)")
    wte = need("transformer.wte.weight")
    first = f"transformer.h.{recurrent[0]}.attn."
    num_heads = need(first + "A_log").shape[0]
    key_dim, hidden = need(first + "q_proj.weight").shape
    head_dim = key_dim // num_heads
    head_v_dim = need(first + "g_proj.0.weight").shape[0]
    value_dim = need(first + "v_proj.weight").shape[0]
    use_short_conv = first + "q_conv1d.weight" in state
    config = GDN2Config(
        vocab_size=wte.shape[0], hidden_size=hidden, num_hidden_layers=len(layers), num_heads=num_heads,
        head_dim=head_dim, expand_v=head_v_dim / head_dim, num_v_heads=value_dim // head_v_dim,
        intermediate_size=need(f"transformer.h.{recurrent[0]}.mlp.swiglu.w1.weight").shape[0],
        conv_size=state[first + "q_conv1d.weight"].shape[-1] if use_short_conv else 4,
        use_short_conv=use_short_conv, allow_neg_eigval=allow_neg_eigval, output_gate_activation="silu",
        norm_eps=norm_eps, max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
    )
    renamed: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    attn_layers = {}
    for i in attention:
        settings, tensors = _split_attention(state, i, hidden, attn_head_size, local_window, source)
        attn_layers[i] = settings
        renamed.update(tensors)
    for name, tensor in state.items():
        if re.fullmatch(r"transformer\.h\.(\d+)\.attn\.(attn|proj)\.weight", name) and \
                int(name.split(".")[2]) in attn_layers:
            continue
        new = _rename(name)
        layer = re.match(r"transformer\.h\.(\d+)\.attn\.", name)
        if layer is not None and int(layer.group(1)) in attn_layers:
            new = None  # an attention block holds only attn.attn and attn.proj
        if new is None:
            unplaced.append(name)
        else:
            renamed[new] = tensor
    if unplaced:
        raise LitGPTConversionError(
            f"{source}: {len(unplaced)} tensor(s) have no place in GDN2ForCausalLM: {', '.join(sorted(unplaced)[:8])}"
            + (" ..." if len(unplaced) > 8 else "") + " (biases in norms/MLP, GDN-2+ blocks or parallel-residual "
            "configs are not supported)")
    return config, renamed, attn_layers


def _split_attention(state, i: int, hidden: int, head_size: int, window: int | None, source: str):
    """lit_gpt CausalSelfAttention of block i -> (SlidingWindowAttention settings, its tensors in our names)."""
    qkv = state[f"transformer.h.{i}.attn.attn.weight"]
    proj = state.get(f"transformer.h.{i}.attn.proj.weight")
    if proj is None:
        raise LitGPTConversionError(f"{source}: attention block {i} has attn.attn.weight but no attn.proj.weight")
    if hidden % head_size:
        raise LitGPTConversionError(f"{source}: attention head size {head_size} does not divide n_embd={hidden}; "
                                    "pass the head size the checkpoint was trained with")
    n_head = hidden // head_size
    rows = qkv.shape[0] // head_size - n_head
    if qkv.shape[0] % head_size or rows <= 0 or rows % 2:
        raise LitGPTConversionError(f"{source}: transformer.h.{i}.attn.attn.weight {tuple(qkv.shape)} does not fit "
                                    f"n_head={n_head} heads of {head_size}; pass the attention head size")
    groups = rows // 2
    per_group = qkv.view(groups, n_head // groups + 2, head_size, hidden)
    q = per_group[:, :-2].reshape(n_head * head_size, hidden)
    k = per_group[:, -2].reshape(groups * head_size, hidden)
    v = per_group[:, -1].reshape(groups * head_size, hidden)
    prefix = f"model.layers.{i}.attn."
    tensors = {prefix + "q_proj.weight": q.clone(), prefix + "k_proj.weight": k.clone(),
               prefix + "v_proj.weight": v.clone(), prefix + "o_proj.weight": proj}
    settings = dict(num_heads=n_head, num_kv_heads=groups, qkv_bias=False, window_size=window, rope_theta=10000.0)
    return settings, tensors


def _rename(name: str) -> str | None:
    if name == "transformer.wte.weight":
        return "model.embeddings.weight"
    if name == "transformer.ln_f.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
    if m is None:
        return None
    i, rest = m.groups()
    if rest == "norm_1.weight":
        return f"model.layers.{i}.attn_norm.weight"
    if rest == "norm_2.weight":
        return f"model.layers.{i}.mlp_norm.weight"
    if rest.startswith("attn.") and rest[len("attn."):] in GDN2_PARAMS:
        return f"model.layers.{i}.{rest}"
    m = re.fullmatch(r"mlp\.swiglu\.(w[123])\.weight", rest)
    if m is not None:
        return f"model.layers.{i}.mlp.{MLP_NAMES[m.group(1)]}.weight"
    return None


def convert_lit_gpt_checkpoint(path: str | Path, norm_eps: float = 1e-5, max_position_embeddings: int = 4096,
                               allow_neg_eigval: bool = False, attn_head_size: int = 128,
                               local_window: int | None = 2048):
    """A lit_gpt GDN-2 checkpoint (file, or folder holding one) -> GDN2ForCausalLM with its weights (strict);
    for a hybrid (swa_gdn2) checkpoint, the GDN-2 + sliding-window-attention MixerStackLM (its .config is the
    GDN2Config, its .attn_layers the attention settings per layer)."""
    from baselines.gdn2_hybrid import build_hybrid
    from gdn2 import GDN2ForCausalLM
    from harness.checkpoint import load_weights_strict

    file = find_lit_gpt_file(Path(path).expanduser())
    config, state, attn_layers = lit_gpt_to_gdn2(read_lit_gpt_state(file), norm_eps, max_position_embeddings,
                                                 allow_neg_eigval, str(file), attn_head_size, local_window)
    with torch.device("meta"):
        lm = GDN2ForCausalLM(config) if not attn_layers else build_hybrid(config, attn_layers)
    lm = lm.to_empty(device="cpu")
    load_weights_strict(lm, state, str(file))
    if attn_layers:
        lm.attn_layers = attn_layers
    return lm.eval()


def hybrid_fla_config(config, attn_layers: dict[int, dict]) -> dict:
    """An fla-format GatedDeltaNet2 config.json dict for a converted hybrid (baselines.gdn2 loads it back)."""
    spec = next(iter(attn_layers.values()))
    return dict(
        model_type="gated_deltanet2", architectures=["GatedDeltaNet2ForCausalLM"], vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers, num_heads=config.num_heads,
        head_dim=config.head_dim, expand_v=config.expand_v, num_v_heads=config.num_v_heads,
        intermediate_size=config.intermediate_size, conv_size=config.conv_size, use_short_conv=config.use_short_conv,
        allow_neg_eigval=config.allow_neg_eigval, norm_eps=config.norm_eps, output_gate_activation="swish",
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        attn={"layers": sorted(attn_layers), **spec},
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: convert a lit_gpt checkpoint into an HF folder of GDN2ForCausalLM. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m baselines.gdn2_lit_gpt", description=main.__doc__)
    parser.add_argument("checkpoint", help="lit_gpt checkpoint file (.pth/.pt/.ckpt) or the folder holding it")
    parser.add_argument("out_dir", help="folder to write config.json + model.safetensors into")
    parser.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json to copy next to the weights")
    parser.add_argument("--norm-eps", type=float, default=1e-5)
    parser.add_argument("--block-size", type=int, default=4096, help="training context (max_position_embeddings)")
    parser.add_argument("--allow-neg-eigval", action="store_true")
    parser.add_argument("--attn-head-size", type=int, default=128, help="hybrids: attention head size")
    parser.add_argument("--local-window", type=int, default=2048, help="hybrids: sliding window (0: full)")
    args = parser.parse_args(argv)
    try:
        lm = convert_lit_gpt_checkpoint(args.checkpoint, args.norm_eps, args.block_size, args.allow_neg_eigval,
                                        args.attn_head_size, args.local_window or None)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(lm, "attn_layers", None):
        from baselines.common import write_checkpoint_folder

        write_checkpoint_folder(out, hybrid_fla_config(lm.config, lm.attn_layers), lm.state_dict())
    else:
        lm.save_pretrained(out)
    if args.tokenizer:
        source = Path(args.tokenizer)
        files = [source] if source.is_file() else [f for f in source.iterdir() if f.name.startswith(
            ("tokenizer", "special_tokens_map"))]
        for f in files:
            shutil.copy(f, out / f.name)
    print(f"wrote {out} ({sum(p.numel() for p in lm.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
