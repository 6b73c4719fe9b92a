"""Bytes a block keeps for the backward pass, per token and layer, by the module that keeps them.

Runs one training forward pass of a GDN2ForCausalLM (any named config, a few layers), or of our Gated DeltaNet, KDA,
Mamba-2 or Mamba-3 model at its 1.3B config (--family; a few layers), under bf16 autocast with a saved-tensors hook
that records every tensor autograd keeps, attributed to the innermost module running when it was saved; each storage
is counted once. Two sequence lengths are run and the difference is divided by the extra tokens, so what does not
grow with the tokens (autocast's bf16 copies of the weights) drops out. On CPU the chunk kernels run in Triton's
interpreter (TRITON_INTERPRET=1 is set here), so the tensors are the ones the GPU path keeps; the Mamba scans run
their torch reference there (mamba-ssm's kernels need CUDA), which keeps other tensors than the kernels do.

    .venv/bin/python benchmarks/saved_bytes.py --config gdn2-1.3B --layers 1 --lengths 64,128 [--chunk-recompute]
    .venv/bin/python benchmarks/saved_bytes.py --family kda --layers 1

Prints a table (KB per token per layer) and the total; no GPU needed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")      # before any Triton kernel module is imported

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent.parent))


def saved_bytes_by_module(model: torch.nn.Module, ids: torch.Tensor, device_type: str) -> dict[str, int]:
    """{module path: bytes of the storages first kept for backward while that module ran} for one forward pass.
    The module being run is followed with global module hooks: hooks on the modules themselves would make the model
    run its modules unfused (gdn2.fused.plain), so the count would not be the training path's."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(module): name or "(model)" for name, module in model.named_modules()}
    stack: list[str] = ["(model)"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    kept: dict[str, int] = defaultdict(int)

    def enter(module, inputs) -> None:
        if id(module) in names:
            stack.append(names[id(module)])

    def leave(module, inputs, output) -> None:       # returns None: the output stays as it is
        if id(module) in names:
            stack.pop()

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            kept[stack[-1]] += storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device_type, dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids)
    finally:
        for h in handles:
            h.remove()
    return kept


def kept_bytes(fn, exclude: set[int] = frozenset()):
    """(bytes of the distinct storages autograd keeps for the backward pass while fn() runs, fn's result); storages
    whose data_ptr is in `exclude` (e.g. a model's parameters) are not counted."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(n for ptr, n in seen.items() if ptr not in exclude), out


def piece_of(path: str) -> str:
    """'model.layers.3.attn.q_conv1d' -> 'attn.q_conv1d' (the layer index dropped)."""
    parts = path.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[i + 2:]) or "(block)"
    return path


def use_triton_paths_on_cpu() -> None:
    """The layer and the fused pieces pick torch paths on CPU ('auto'); point them at the Triton paths (run by the
    interpreter here), whose autograd Functions keep what they keep on a GPU."""
    import functools

    import gdn2.fused
    import gdn2.layer
    import gdn2.ops
    from gdn2.ops import chunk_gdn2

    gdn2.layer.chunk_gdn2 = functools.partial(chunk_gdn2, backend="triton")
    gdn2.ops.chunk_gdn2 = gdn2.layer.chunk_gdn2       # the baselines' gated_delta_rule looks it up at each call
    gdn2.fused._backend = lambda x, backend: "torch" if x.dtype == torch.float64 else "triton"


def main(argv=None) -> int:
    from gdn2 import GDN2ForCausalLM, named_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gdn2-1.3B", help="a named GDN-2 config (--family gdn2)")
    parser.add_argument("--family", default="gdn2", choices=("gdn2", "gated_deltanet", "kda", "mamba2", "mamba3"),
                        help="gated_deltanet, kda, mamba2, mamba3: our model of that family at its 1.3B config (the "
                             "Mamba scans on the CPU run the torch reference, which keeps other tensors than "
                             "mamba-ssm's kernels: their rows other than the scan's are the GPU path's)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lengths", default="64,128", help="two sequence lengths (multiples of 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk-recompute", action="store_true",
                        help="model.chunk_recompute_enable(): the chunk intermediates recomputed in the backward pass")
    args = parser.parse_args(argv)
    from gdn2.ops.triton.chunk import BF16_UNDER_INTERPRETER

    # only the kept tensors' sizes are read here, which the interpreter gets right for bfloat16 too
    warnings.filterwarnings("ignore", message=re.escape(BF16_UNDER_INTERPRETER))
    short, long = (int(x) for x in args.lengths.split(","))
    if long <= short:
        raise SystemExit(f"error: --lengths takes two lengths, the second larger; got {args.lengths}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        use_triton_paths_on_cpu()
    torch.manual_seed(0)
    if args.family == "gdn2":
        config = named_config(args.config, num_hidden_layers=args.layers, vocab_size=4096)
        with device:
            model = GDN2ForCausalLM(config)
        model.chunk_recompute_enable(args.chunk_recompute)
        title = (f"{args.config}: hidden {config.hidden_size}, {config.num_heads} heads of {config.head_dim}, MLP "
                 f"{config.intermediate_size}")
    else:
        from harness.registry import get_family

        if args.chunk_recompute:
            raise SystemExit("error: --chunk-recompute is GDN2ForCausalLM's switch (--family gdn2)")
        family = get_family(args.family)
        fields = {**family.paper_config, "num_hidden_layers": args.layers, "vocab_size": 4096}
        with device:
            if args.family == "mamba2":
                from baselines.mamba2 import build_mamba2, mamba2_configs

                model = build_mamba2(mamba2_configs(fields))
            elif args.family == "mamba3":
                from baselines.mamba3 import build_mamba3, mamba3_configs

                model = build_mamba3(mamba3_configs(fields))
            else:
                model = family.build_reference(fields)
        title = f"{args.family} 1.3B config: " + ", ".join(f"{k} {v}" for k, v in sorted(fields.items())
                                                           if k not in ("model_type", "architectures"))
    model.train()
    vocab = 4096
    runs = []
    for T in (short, long):
        ids = torch.randint(0, vocab, (args.batch, T), device=device)
        runs.append(saved_bytes_by_module(model, ids, device.type))
    tokens = args.batch * (long - short)
    per_piece: dict[str, float] = defaultdict(float)
    for path in set(runs[0]) | set(runs[1]):
        per_piece[piece_of(path)] += (runs[1].get(path, 0) - runs[0].get(path, 0)) / tokens / args.layers
    print(f"# {title}; bf16 autocast; {args.layers} layer(s), lengths {short} and {long}, batch "
          f"{args.batch}; {device.type}{'; chunk intermediates recomputed' if args.chunk_recompute else ''}")
    print(f"{'kept by':<28s} {'KB per token per layer':>24s}")
    for piece, nbytes in sorted(per_piece.items(), key=lambda kv: -kv[1]):
        if abs(nbytes) >= 1:
            print(f"{piece:<28s} {nbytes / 1024:>24.2f}")
    total = sum(per_piece.values())
    print(f"{'total':<28s} {total / 1024:>24.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
