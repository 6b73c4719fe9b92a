"""One prefill config, pinned: inference forward with GDN2_TRITON_PREFILL=1 against =0 (rel diff) and its time."""
import os
import sys
import torch
import triton
from benchmarks.bench_kernels import inputs
from gdn2.ops.triton import chunk_prefill, triton_chunk_gdn2
from gdn2.ops.triton.utils import config_name, pin_config

i, B, T = (int(x) for x in sys.argv[1:4])
cfg = chunk_prefill.PREFILL_CONFIGS[i]
pin_config(chunk_prefill.gdn2_fwd_kernel_prefill, cfg)
q, k, v, g, b, w, _ = inputs(B, T, seed=0)
h0 = torch.randn(B, 16, 128, 128, device="cuda") * 0.1
res, ms = {}, {}
for pre in ("0", "1"):
    os.environ["GDN2_TRITON_PREFILL"] = pre
    with torch.no_grad():
        o, ht = triton_chunk_gdn2(q, k, v, g, b, w, initial_state=h0, output_final_state=True)
        torch.cuda.synchronize()
        res[pre] = (o.float(), ht)
        ms[pre] = triton.testing.do_bench(lambda: triton_chunk_gdn2(q, k, v, g, b, w, initial_state=h0,
                                                                    output_final_state=True), warmup=25, rep=100)
d = ((res["0"][0] - res["1"][0]).norm() / res["0"][0].norm()).item()
dh = ((res["0"][1] - res["1"][1]).norm() / res["0"][1].norm()).item()
print(f"B{B} T{T} {config_name(cfg):16s} split {ms['0']:.3f} ms  prefill {ms['1']:.3f} ms  diff o {d:.1e} ht {dh:.1e}")
