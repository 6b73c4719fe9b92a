"""GPU check of the model-level kernels and paths (compiled Triton, not the CPU interpreter the tests use):
gdn2/fused_kernels.py against the torch path of the same autograd Functions at the 1.3B model's shapes (fp32 and
bf16; outputs and every gradient), the chunked linear cross-entropy against F.cross_entropy, a small GDN-2 model's
loss and parameter gradients (fused path against the plain logits path, fp32), the training path's recomputes bit
for bit (the pre-norms' output, g), compile_step (a step after it compiles nothing), and greedy decoding from the
CUDA graph (harness/graph_decode.py) against the plain step for each recurrent family's tiny model, and a bf16
training step of a small GDN-2 at heads of 32 and 64 (finite loss and gradients).

Each group runs in its own process, so a fault that poisons the CUDA context (an illegal memory access) fails its
group and the others still run.

    python benchmarks/check_fused_gpu.py                 # one line per check, PASS / FAIL; exit 1 on a FAIL
    python benchmarks/check_fused_gpu.py --only kernels  # one group in this process
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent.parent))

FAILED = []


def report(name: str, got, want, tol: float) -> None:
    """Largest |got - want| / (max |want| + 1e-6) over the paired tensors against tol."""
    worst = 0.0
    for g, w in zip(got, want, strict=False):
        worst = max(worst, float((g.float() - w.float()).abs().max() / (w.float().abs().max() + 1e-6)))
    ok = worst <= tol
    if not ok:
        FAILED.append(name)
    print(f"{'PASS' if ok else 'FAIL'}  {name:58s} max rel err {worst:.2e} (tol {tol:.0e})", flush=True)


def with_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    torch.manual_seed(1)
    out.backward(torch.randn(out.shape, dtype=out.dtype, device=out.device))   # not randn_like: strides differ
    return [out.detach()] + [leaf.grad for leaf in leaves]


def check_kernels() -> None:
    from gdn2.fused import (
        decay,
        gated_rms_norm,
        gated_rms_norm_linear,
        linear_cross_entropy,
        rms_norm,
        rms_norm_linears,
        short_conv_silu,
        swiglu_down,
    )

    torch.manual_seed(0)
    dev = "cuda"
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(4, 2048, 2304, device=dev).to(dtype)
        w = 1 + 0.1 * torch.randn(2304, device=dev)
        o, z = (torch.randn(4, 2048, 16, 128, device=dev).to(dtype) for _ in range(2))
        wo = 1 + 0.1 * torch.randn(128, device=dev)
        o_proj = torch.randn(2304, 2048, device=dev) * 0.02
        gate, up = (torch.randn(2, 2048, 6208, device=dev).to(dtype) for _ in range(2))
        down = torch.randn(2304, 6208, device=dev) * 0.02
        mlp_gate, mlp_up = (torch.randn(6208, 2304, device=dev) * 0.02 for _ in range(2))
        cx = torch.randn(2, 2048, 2048, device=dev).to(dtype)
        cw, cache = torch.randn(2048, 1, 4, device=dev) * 0.5, torch.randn(2, 2048, 3, device=dev).to(dtype)
        f = (torch.randn(8192, 2048, device=dev) * 4).to(dtype)
        a_log, dt_bias = torch.empty(16, device=dev).uniform_(0, 2.7), torch.randn(2048, device=dev)
        name = str(dtype).replace("torch.", "")
        for label, fn, args in (
            ("rms_norm [8192, 2304]", lambda b: lambda x, w: rms_norm(x, w, 1e-5, backend=b), (x, w)),
            ("gated_rms_norm silu [131072, 128]",
             lambda b: lambda o, z, w: gated_rms_norm(o, z, w, 1e-5, "silu", backend=b), (o, z, wo)),
            ("gated_rms_norm sigmoid [131072, 128]",
             lambda b: lambda o, z, w: gated_rms_norm(o, z, w, 1e-5, "sigmoid", backend=b), (o, z, wo)),
            ("gated_rms_norm_linear silu [131072, 128] -> 2304",
             lambda b: lambda o, z, w, p: gated_rms_norm_linear(o, z, w, p, 1e-5, "silu", backend=b),
             (o, z, wo, o_proj)),
            ("rms_norm_linears [8192, 2304] -> 6208, 6208",
             lambda b: lambda x, w, g, u: torch.cat(rms_norm_linears(x, w, 1e-5, (g, u), backend=b), -1),
             (x, w, mlp_gate, mlp_up)),
            ("swiglu_down [4096, 6208] -> 2304",
             lambda b: lambda g, u, w: swiglu_down(g, u, w, backend=b), (gate, up, down)),
            ("short_conv_silu [2, 2048, 2048] W=4",
             lambda b: lambda c, w: short_conv_silu(c, cache, w, None, backend=b), (cx, cw)),
            ("decay [8192, 2048], 16 heads", lambda b: lambda f, a, d: decay(f, a, d, 128, backend=b),
             (f, a_log, dt_bias)),
        ):
            report(f"{label} {name}", with_grads(fn("triton"), *args), with_grads(fn("torch"), *args), tol)
    hidden = torch.randn(8192, 2304, device=dev)
    head = torch.randn(32000, 2304, device=dev) * 0.02
    labels = torch.randint(0, 32000, (8192,), device=dev)
    labels[::7] = -100
    report("linear_cross_entropy [8192, 2304] x 32000 fp32",
           with_grads(lambda h, w: linear_cross_entropy(h, w, labels), hidden, head),
           with_grads(lambda h, w: F.cross_entropy(h @ w.t(), labels), hidden, head), 1e-4)


def check_recomputes_are_exact() -> None:
    """The training path's recomputes on compiled kernels, bit for bit (tol 0): rms_norm_linears' weight gradients
    under bf16 autocast against dout^T y with the forward's own y, and the chunk operator's gradients with g
    recomputed from f (recompute_g) against g kept, at a 1.3B layer's shapes in bf16."""
    import functools

    from gdn2.fused import _backend, _norm_forward, decay, decay_again, rms_norm_linears
    from gdn2.ops import chunk_gdn2

    torch.manual_seed(0)
    x = torch.randn(8192, 2304, device="cuda", requires_grad=True)
    w = (1 + 0.1 * torch.randn(2304, device="cuda")).requires_grad_()
    lin = (torch.randn(2048, 2304, device="cuda") * 0.02).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (out,) = rms_norm_linears(x, w, 1e-5, (lin,))
    dout = torch.randn_like(out)
    out.backward(dout)
    y = _norm_forward(x.detach(), None, w.detach(), 1e-5, "silu", _backend(x, "auto"), torch.bfloat16,
                      torch.bfloat16, round_x=True)[0]                   # what the forward computed, as it did
    report("rms_norm_linears bf16: the weight gradient from the forward's y", [lin.grad],
           [(dout.t() @ y).float()], 0.0)

    B, T, H, K = 2, 2048, 16, 128
    q, k, v = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    b, wv = (torch.rand(B, T, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    f = torch.randn(B, T, H * K, device="cuda", dtype=torch.bfloat16)
    a_log, dt_bias = torch.empty(H, device="cuda").uniform_(0, 2.7), torch.randn(H * K, device="cuda")
    grads = {}
    for again in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, b, wv, f, a_log, dt_bias)]
        lq, lk, lv, lb, lw, lf, la, ld = leaves
        g = decay(lf, la, ld, K).reshape(B, T, H, K)
        o, _ = chunk_gdn2(lq, lk, lv, g, lb, lw, use_qk_l2norm_in_kernel=True,
                          recompute_g=functools.partial(decay_again, lf, la, ld, K) if again else None)
        torch.manual_seed(1)
        o.backward(torch.randn_like(o))
        grads[again] = [o.detach()] + [t.grad for t in leaves]
    report("chunk_gdn2 bf16, g recomputed (recompute_g) against g kept", grads[True], grads[False], 0.0)


def check_model() -> None:
    from gdn2 import GDN2ForCausalLM, named_config

    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (2, 512), device="cuda")
    grads = {}
    for mode in ("plain", "fused"):
        torch.manual_seed(0)
        model = GDN2ForCausalLM(named_config("gdn2-tiny", num_hidden_layers=2)).cuda().train()
        if mode == "plain":
            logits = model(ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        else:
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads[mode] = [loss.detach()] + [p.grad for p in model.parameters()]
    report("GDN-2 tiny: loss and every parameter gradient, fp32", grads["fused"], grads["plain"], 1e-3)


def bf16_step(head_dim: int) -> None:
    """One bf16-autocast training step of a 2-layer GDN-2 with heads of head_dim on [2, 512] tokens, on the
    autotuned kernels and without compile_step: the loss and every gradient finite."""
    from gdn2 import GDN2ForCausalLM, named_config

    torch.manual_seed(0)
    config = named_config("gdn2-tiny", num_hidden_layers=2, head_dim=head_dim)
    model = GDN2ForCausalLM(config).cuda().train()
    ids = torch.randint(0, 4096, (2, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    if not finite:
        FAILED.append(f"bf16 step, heads of {head_dim}")
    print(f"{'PASS' if finite else 'FAIL'}  bf16 training step, heads of {head_dim}: loss {float(loss.detach()):.4f}, "
          f"loss and every gradient finite: {finite}", flush=True)


def check_bf16_step_heads_32() -> None:
    bf16_step(32)


def check_bf16_step_heads_64() -> None:
    bf16_step(64)


def check_compile_ahead() -> None:
    """compile_step, then a real bf16 training step of a small GDN-2 (heads of 64, the bundled small models'; its
    own process, so nothing is compiled before): the step compiles nothing, every variant it launched was compiled
    ahead, and compile_step left the parameters unchanged and no gradient."""
    from gdn2 import GDN2ForCausalLM, named_config
    from gdn2.ops.triton.compile_ahead import compile_step, counting_compiles

    torch.manual_seed(0)
    model = GDN2ForCausalLM(named_config("gdn2-tiny", num_hidden_layers=2, head_dim=64)).cuda().train()
    ids = torch.randint(0, 4096, (2, 512), device="cuda")

    def loss():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(ids, labels=ids, use_cache=False).loss

    before = [p.detach().clone() for p in model.parameters()]
    variants = compile_step(loss, model.parameters())
    untouched = all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before, strict=True))
    with counting_compiles() as compiled:
        loss().backward()
        torch.cuda.synchronize()
    ok = untouched and variants > 0 and not compiled
    if not ok:
        FAILED.append("compile ahead")
    print(f"{'PASS' if ok else 'FAIL'}  compile_step: {variants} variants ahead; the step then compiled "
          f"{len(compiled)} {sorted(set(compiled))}; parameters and gradients untouched: {untouched}", flush=True)


def check_graph_decode() -> None:
    import tempfile

    sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_families import load_tiny, random_ids

    for family in ("gdn2", "gated_deltanet", "kda", "mamba2", "mamba3"):
        with tempfile.TemporaryDirectory() as folder:
            try:
                model = load_tiny(family, Path(folder) / family, dtype=torch.float32)
            except Exception as err:  # noqa: BLE001
                print(f"SKIP  {family}: {type(err).__name__}: {err}")
                continue
            model.lm.cuda()
            model.device = torch.device("cuda")
            prompts = [random_ids(n, 7 + n) for n in (300, 41, 129)]
            model.static_decode = False
            plain = model.generate_ids_many(prompts, 24, batch_size=3)
            model.static_decode = None                 # CUDA: the graph
            graph = model.generate_ids_many(prompts, 24, batch_size=3)
            same = sum(a == b for a, b in zip(graph, plain, strict=False))
            ok = same == len(prompts)
            if not ok:
                FAILED.append(f"graph decode {family}")
            print(f"{'PASS' if ok else 'FAIL'}  greedy tokens, CUDA graph vs plain step: {family:15s} "
                  f"{same}/{len(prompts)} samples equal", flush=True)


CHECKS = {"compile_ahead": check_compile_ahead, "kernels": check_kernels, "recomputes": check_recomputes_are_exact,
          "model": check_model, "graph_decode": check_graph_decode, "bf16_step_64": check_bf16_step_heads_64,
          "bf16_step_32": check_bf16_step_heads_32}


def run_group(name: str) -> int:
    """One check group in a child process: 1 if it failed (a check failed, raised, or the process died), else 0."""
    done = subprocess.run([sys.executable, __file__, "--only", name], capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode not in (0, 1, 2):
        tail = " | ".join(line for line in done.stderr.strip().splitlines()[-3:])
        print(f"FAIL  {name}: the process ended with exit code {done.returncode}: {tail[:400]}", flush=True)
        return 1
    return int(done.returncode != 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(CHECKS), help="run one group in this process")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this check needs a CUDA GPU (the CPU tests run the kernels in Triton's interpreter)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.only:
        try:
            CHECKS[args.only]()
        except Exception as err:  # noqa: BLE001 - a raising check is a failed check, named with its error
            first_line = (str(err).splitlines() or [""])[0]
            print(f"FAIL  {args.only}: {type(err).__name__}: {first_line[:300]}", flush=True)
            return 2
        return 1 if FAILED else 0
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    failed = [name for name in CHECKS if run_group(name)]
    print(f"{len(failed)} groups failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
