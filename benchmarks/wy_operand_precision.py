"""How much of the float64 answer survives if the WY inverse A is stored in 16 bits (CPU, no GPU needed).

The wy kernel reads A [TT, H, 64] in fp32 and multiplies it on the tensor cores in tf32 (10-bit mantissa): 256 B per
token and head, the largest single read of the forward after g. Storing A as fp16 (10-bit mantissa, range +-65504)
or bf16 (7-bit mantissa) would halve that. This measures what each rounding of A alone costs: the chunkwise forward in
float64 with A = (I + T)^-1 exact, then with A rounded to tf32 (what the kernels multiply today), fp16 and bf16 before
Y = A E and U = A Z; every other step stays float64. Reports ||o - o_ref|| / ||o_ref|| and the same for the final
state, next to the bf16 bound of the GPU check (1e-2) and the largest |A| entry (fp16 overflows past 65504).

    python benchmarks/wy_operand_precision.py [--T 4096] [--heads 4]
"""
from __future__ import annotations

import argparse

import torch

CHUNK = 64


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


def inputs(T, heads, K, V, g_scale, seed):
    """One sequence [T, heads, .] in float64, drawn like bench_kernels.inputs (unit q, k; g = -softplus(N - 2) / 2,
    times g_scale; b, w uniform), and an initial state [heads, K, V]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(T, heads, K, generator=gen, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(T, heads, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(T, heads, V, generator=gen, dtype=torch.float64)
    g = -torch.nn.functional.softplus(torch.randn(T, heads, K, generator=gen, dtype=torch.float64) - 2) * 0.5 * g_scale
    b = torch.rand(T, heads, K, generator=gen, dtype=torch.float64)
    w = torch.rand(T, heads, V, generator=gen, dtype=torch.float64)
    h0 = torch.randn(heads, K, V, generator=gen, dtype=torch.float64) * 0.1
    return q, k, v, g, b, w, h0


def chunk_forward(q, k, v, g, b, w, h0, round_a):
    """The WY chunk form of gdn2/ops/chunk_torch.py with an explicit A, rounded by round_a. Returns o [T, H, V],
    the final state [H, K, V] and max |A|."""
    T, H, K = q.shape
    scale = K ** -0.5
    n = T // CHUNK
    q, k, v, g, b, w = (x.reshape(n, CHUNK, H, -1).transpose(1, 2) for x in (q, k, v, g, b, w))   # [n, H, C, .]
    G = g.cumsum(2)
    diff = G[:, :, :, None, :] - G[:, :, None, :, :]                                 # [n, H, C, C, K]: G_r - G_s
    lower = torch.ones(CHUNK, CHUNK, dtype=torch.bool).tril()
    decay = torch.where(lower[:, :, None], diff, torch.full_like(diff, float("-inf"))).exp()
    T_ = torch.einsum("nhrk,nhsk,nhrsk->nhrs", b * k, k, decay).tril(-1)
    A = torch.linalg.inv(torch.eye(CHUNK, dtype=torch.float64) + T_)
    A_used = round_a(A)
    Y = A_used @ (G.exp() * b * k)
    U = A_used @ (w * v)
    Aqk = torch.einsum("nhrk,nhsk,nhrsk->nhrs", q * scale, k, decay)
    Qg = q * scale * G.exp()
    Kt = (G[:, :, -1:] - G).exp() * k
    S = h0
    outs = []
    for i in range(n):
        R = U[i] - Y[i] @ S
        outs.append(Qg[i] @ S + Aqk[i] @ R)
        S = G[i, :, -1].exp()[:, :, None] * S + Kt[i].transpose(-1, -2) @ R
    o = torch.stack(outs).transpose(1, 2).reshape(T, H, -1)
    return o, S, A.abs().max().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args()
    print(f"T={args.T}, heads={args.heads}, K=V=128, float64 except A; relative error vs A exact (bf16 bound 1e-2)")
    print(f"{'case':26s} {'A rounded to':32s} {'o rel. err':>11s} {'state rel. err':>15s} {'max |A|':>9s}")
    for case, g_scale in (("bench inputs", 1.0), ("strong decay (g x 8)", 8.0)):
        for seed in (0, 1):
            x = inputs(args.T, args.heads, 128, 128, g_scale, seed)
            o_ref, s_ref, _ = chunk_forward(*x, ROUNDINGS["float64 (reference)"])
            for name, fn in list(ROUNDINGS.items())[1:]:
                o, s, amax = chunk_forward(*x, fn)
                err_o = ((o - o_ref).norm() / o_ref.norm()).item()
                err_s = ((s - s_ref).norm() / s_ref.norm()).item()
                print(f"{case + f' seed {seed}':26s} {name:32s} {err_o:11.2e} {err_s:15.2e} {amax:9.3g}", flush=True)


if __name__ == "__main__":
    main()
