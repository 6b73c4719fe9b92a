"""The short convolution's kernels (gdn2/fused_kernels.py) at the 1.3B model's training shape, per tile config:
forward and backward time and the bytes each must move, against the copy bandwidth measured in the same run.

    python benchmarks/bench_conv.py --out $OUT          # writes <out>/conv-<card>.csv and prints a table

x [8, 2048, 2048] bf16 (one q/k/v projection of a 2K x 8 step), W = 4, a carried cache. The default tiles are
fused_kernels.CONV_FWD_TILE / CONV_BWD_TILE; the others are there to show why those were chosen.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks.csv_rows import write_csv  # noqa: E402

TILES = ((64, 128, 4), (16, 128, 4), (16, 64, 4), (8, 128, 4), (16, 128, 8), (32, 64, 8), (32, 128, 4), (16, 256, 4))


def main(argv=None) -> int:
    from triton.testing import do_bench

    from gdn2 import fused_kernels as fk

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,2048,2048", help="B,T,D")
    parser.add_argument("--out", default=os.environ.get("OUT") or "results/bench")
    args = parser.parse_args(argv)
    B, T, D = (int(n) for n in args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    dy = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    cache = torch.randn(B, D, 3, device="cuda", generator=g).bfloat16()
    weight = torch.randn(D, 4, device="cuda", generator=g) * 0.5
    copy_ms = do_bench(lambda: x.clone())
    gbps = 2 * x.numel() * x.element_size() / copy_ms / 1e6
    reference = None
    rows = []
    card = torch.cuda.get_device_name()
    for tile in TILES:
        fwd = do_bench(lambda: fk.conv_silu_fwd(x, cache, weight, None, tile=tile))
        bwd = do_bench(lambda: fk.conv_silu_bwd(x, cache, weight, None, dy, tile=tile))
        out = (fk.conv_silu_fwd(x, cache, weight, None, tile=tile), *fk.conv_silu_bwd(x, cache, weight, None, dy,
                                                                                      tile=tile)[:2])
        reference = reference or out
        # dweight sums per-tile partials, so its summation order follows the tile
        differs = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                      for a, b in zip(out, reference, strict=True))
        floor_fwd, floor_bwd = 2 * x.nbytes / gbps / 1e6, 3 * x.nbytes / gbps / 1e6   # x in, y out; x, dy in, dx out
        rows.append(dict(card=card, date=datetime.date.today().isoformat(), shape=args.shape,
                         tile="BT={},BD={},w{}".format(*tile), fwd_ms=round(fwd, 4), bwd_ms=round(bwd, 4),
                         fwd_floor_ms=round(floor_fwd, 4), bwd_floor_ms=round(floor_bwd, 4),
                         fwd_default=tile == fk.CONV_FWD_TILE,
                         bwd_default=tile == fk.CONV_BWD_TILE, rel_diff_to_first=f"{differs:.1e}"))
        print(" ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in ("card", "date")), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"conv-{card.replace(' ', '-')}.csv"
    write_csv(rows, str(path))
    print(f"copy bandwidth {gbps:.0f} GB/s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
