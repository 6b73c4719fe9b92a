"""End to end: inference forward (no grad), autotuned, the WY kernel + walk vs the prefill walk; training forward."""
import os
import torch
import triton
from benchmarks.bench_kernels import inputs
from gdn2.ops.triton import triton_chunk_gdn2

for B, T in ((8, 4096), (1, 65536), (2, 16384)):
    q, k, v, g, b, w, _ = inputs(B, T, seed=0)
    h0 = torch.randn(B, 16, 128, 128, device="cuda") * 0.1
    res = {}
    for pre in ("0", "1"):
        os.environ["GDN2_TRITON_PREFILL"] = pre
        with torch.no_grad():
            o, ht = triton_chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
            res[pre] = (o.float(), ht)
            ms = triton.testing.do_bench(lambda: triton_chunk_gdn2(q, k, v, g, b, w, initial_state=h0,
                                                                   output_final_state=True), warmup=50, rep=200)
        print(f"B{B} T{T} infer prefill={pre}: {ms:.3f} ms", flush=True)
    d = (res["0"][0] - res["1"][0]).norm() / res["0"][0].norm()
    dh = (res["0"][1] - res["1"][1]).norm() / res["0"][1].norm()
    print(f"  rel diff o {d:.2e}  ht {dh:.2e}", flush=True)
    os.environ.pop("GDN2_TRITON_PREFILL")
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, b, w)]
    ms = triton.testing.do_bench(lambda: triton_chunk_gdn2(*leaves, initial_state=h0, output_final_state=True),
                                 warmup=50, rep=200)
    print(f"B{B} T{T} train fwd: {ms:.3f} ms", flush=True)
