"""How much of the float64 answer survives if the WY inverse A is stored in 16 bits, or if the pair products T and Aqk
take 16-bit operands (CPU, no GPU needed).

The wy kernel reads A [TT, H, 64] in fp32 and multiplies it on the tensor cores in tf32 (10-bit mantissa): 256 B per
token and head, the largest single read of the forward after g. Storing A as fp16 (10-bit mantissa, range +-65504)
or bf16 (7-bit mantissa) would halve that. This measures what each rounding of A alone costs: the chunkwise forward
of gdn2/ops/chunk_torch.py in float64 with A = (I + T)^-1 formed explicitly, exact, then rounded to tf32 (what the
kernels multiply today), fp16 and bf16 before Y = A E and U = A Z; every other step stays float64. Inputs:
bench_kernels.inputs, on the CPU. Reports ||o - o_ref|| / ||o_ref|| and the same for the final state, next to the
bf16 bound of the GPU check (1e-2) and the largest |A| entry (fp16 overflows past 65504).

Rows "T, Aqk factors": the merged wy kernel's pair products. It forms T and Aqk as (x e^(G - m)) (k e^(m - G))^T
with m halfway between each channel's largest and smallest G in the chunk, both factors in tf32 today; this rounds
those two factors (to tf32, bf16, fp16) and keeps every other step float64 (A exact from the rounded T).

    PYTHONPATH=. python benchmarks/wy_operand_precision.py [--T 4096] [--heads 4]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_kernels import inputs
from gdn2.ops.chunk_torch import CHUNK_SIZE, _pad_to_chunks, _pairwise_decayed_products


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """x (float64) rounded to fp32, then to tf32's 10-bit mantissa (round to nearest, ties away), as float64."""
    bits = x.float().view(torch.int32)
    bits = (bits + 0x1000) & ~0x1FFF
    return bits.view(torch.float32).double()


ROUNDINGS = {
    "float64 (reference)": lambda a: a,
    "tf32 (today's product operand)": round_tf32,
    "fp16": lambda a: a.half().double(),
    "bf16": lambda a: a.bfloat16().double(),
}


def midpoint_pair_products(x, y, G, inclusive: bool, round_factors):
    """The merged kernel's form of sum_d x_rd y_sd e^(G_rd - G_sd) for s < r (s <= r if inclusive): x, y, G
    [..., C, D] float64, the two factors x e^(G - m), y e^(m - G) (m per chunk and channel, halfway between G's largest
    and smallest value) rounded by round_factors, the product in float64. -> [..., C, C]."""
    m = (G.amax(-2, keepdim=True) + G.amin(-2, keepdim=True)) / 2
    product = round_factors(x * (G - m).exp()) @ round_factors(y * (m - G).exp()).transpose(-1, -2)
    return torch.tril(product, 0 if inclusive else -1)


def chunk_forward(q, k, v, g, b, w, h0, round_a, round_pairs=None):
    """chunk_torch's chunkwise forward for q, k, g, b [1, T, H, K], v, w [1, T, H, V] (T a multiple of the chunk),
    h0 [1, H, K, V], all float64, with A = (I + T)^-1 formed explicitly and rounded by round_a before Y = A E and
    U = A Z; with round_pairs, T and Aqk in the merged kernel's midpoint form with their factors rounded by it
    (exact pairwise products otherwise). Returns o [1, H, NC, C, V], the final state and max |A|."""
    scale = q.shape[-1] ** -0.5
    qc, kc, vc, gc, bc, wc = (_pad_to_chunks(x, CHUNK_SIZE) for x in (q, k, v, g, b, w))       # [1, H, NC, C, D]
    G = gc.cumsum(-2)
    if round_pairs is None:
        strict_lower = _pairwise_decayed_products(bc * kc, kc, G, inclusive=False)
        A_qk = _pairwise_decayed_products(qc * scale, kc, G, inclusive=True)
    else:
        strict_lower = midpoint_pair_products(bc * kc, kc, G, False, round_pairs)
        A_qk = midpoint_pair_products(qc * scale, kc, G, True, round_pairs)
    A = torch.linalg.inv(torch.eye(CHUNK_SIZE, dtype=G.dtype) + strict_lower)
    Y = round_a(A) @ (G.exp() * bc * kc)
    U = round_a(A) @ (wc * vc)
    q_gamma = qc * scale * G.exp()
    k_tail = (G[..., -1:, :] - G).exp() * kc
    state = h0
    outputs = []
    for n in range(qc.shape[2]):
        R = U[:, :, n] - Y[:, :, n] @ state
        outputs.append(q_gamma[:, :, n] @ state + A_qk[:, :, n] @ R)
        state = G[:, :, n, -1, :, None].exp() * state + k_tail[:, :, n].transpose(-1, -2) @ R
    return torch.stack(outputs, 2), state, A.abs().max().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args()
    print(f"T={args.T}, heads={args.heads}, K=V=128, float64 except A; relative error vs A exact (bf16 bound 1e-2)")
    print(f"{'case':26s} {'A rounded to':32s} {'o rel. err':>11s} {'state rel. err':>15s} {'max |A|':>9s}")
    for case, g_scale in (("bench inputs", 1.0), ("strong decay (g x 8)", 8.0)):
        for seed in (0, 1):
            q, k, v, g, b, w, _ = (x.double() for x in inputs(1, args.T, seed, heads=args.heads, dtype=torch.float64,
                                                              device="cpu"))
            gen = torch.Generator().manual_seed(seed)
            h0 = torch.randn(1, args.heads, 128, 128, dtype=torch.float64, generator=gen) * 0.1
            x = (q, k, v, g * g_scale, b, w, h0)
            exact = ROUNDINGS["float64 (reference)"]
            o_ref, s_ref, _ = chunk_forward(*x, exact)

            def report(label, o, s, amax):
                err_o = ((o - o_ref).norm() / o_ref.norm()).item()
                err_s = ((s - s_ref).norm() / s_ref.norm()).item()
                print(f"{case + f' seed {seed}':26s} {label:32s} {err_o:11.2e} {err_s:15.2e} {amax:9.3g}", flush=True)
            for name, fn in list(ROUNDINGS.items())[1:]:
                report(name, *chunk_forward(*x, fn))
            for name, fn in ROUNDINGS.items():
                report("T, Aqk factors " + name.split(" ")[0], *chunk_forward(*x, exact, round_pairs=fn))


if __name__ == "__main__":
    main()
