"""Padding of `gna` plans (tiled vs raster order) and the cost of the tiled order's permutation, on the CPU.

    OMP_NUM_THREADS=1 python scripts/gna_report.py [--threads N] [--batch B]

Sizes are the demo model's: 16 frames of 64 x 64 pixels, patch 1 x 4 x 4 -> grid (16, 16, 16), 4096 tokens,
2 heads of 64 (`sparse_dit.load_demo_pipeline().transformer.config`), no text in self-attention.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparse_dit import kernels
from sparse_dit.kernels.layout import finish, permute
from sparse_dit.patterns import PlanContext
from sparse_dit.patterns.gna import GnaConfig, gna_padding, gna_plan

GRID = (16, 16, 16)
CONFIGS = [  # (label, options)
    ("default (kernel 0.5 -> 8x8x8, stride 1)", {}),
    ("kernel 8x8x8, stride 4 (strided)", {"stride": 4}),
    ("kernel 8x8x8, stride 8 (blocked)", {"stride": 8}),
    ("kernel 12x12x12, stride 4", {"kernel_size": 12, "stride": 4}),
    ("kernel 4x8x8, stride 1", {"kernel_size": (4, 8, 8)}),
    ("kernel 5x7x7, stride 1", {"kernel_size": (5, 7, 7)}),
    ("kernel 3x7x7, dilation 1x2x2", {"kernel_size": (3, 7, 7), "dilation": (1, 2, 2)}),
]


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: workspaces, first-touch pages
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def padding_table(block_size: int) -> None:
    print(f"grid {GRID}, block {block_size}: share of the computed video x video work outside the neighbourhood")
    print(f"{'config':44s} {'exact':>7s} {'tile':>10s} {'tiled':>7s} {'pad':>6s} {'raster':>7s} {'pad':>6s}")
    for label, options in CONFIGS:
        r = gna_padding(GRID, GnaConfig(**options), block_size=block_size)
        t, ra = r["tiled"], r["raster"]
        print(f"{label:44s} {r['exact']:7.3f} {'x'.join(map(str, t['tile'])):>10s} {t['computed']:7.3f} "
              f"{t['padding']:6.1%} {ra['computed']:7.3f} {ra['padding']:6.1%}")


def permutation_cost(batch: int, heads: int, head_dim: int, reps: int) -> None:
    ctx = PlanContext(grid=GRID, batch=batch, heads=heads)
    spec = GnaConfig().resolved(GRID)
    tiled, raster = gna_plan(ctx, spec, 64, "tiled"), gna_plan(ctx, spec, 64, "raster")
    q, k, v = (torch.randn(batch, ctx.seq_len, heads, head_dim) for _ in range(3))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))

    def perm_only():
        pq, pk, pv = permute(tiled, qh, kh, vh)
        finish(tiled, pv, None)  # the output's un-permute (same size as v)

    order = tiled.order.view(-1)
    inverse = torch.argsort(order)  # a plan could keep it: static plans are cached

    def index_select_only():
        # Rows of H * D contiguous values per token, and the inverse made once: what kernels/layout.py could do.
        pq, pk, pv = (x.index_select(1, order) for x in (q, k, v))
        pv.index_select(1, inverse)

    times = {
        "permute q,k,v + un-permute out": median_seconds(perm_only, reps),
        "  same, index_select on (B, S, H, D), cached inverse": median_seconds(index_select_only, reps),
        f"gna tiled, gather (density {tiled.density:.3f}, incl. permutation)": median_seconds(lambda: kernels.run(q, k, v, tiled, "gather"), reps),
        f"gna raster, gather (density {raster.density:.3f})": median_seconds(lambda: kernels.run(q, k, v, raster, "gather"), reps),
        "dense SDPA": median_seconds(lambda: F.scaled_dot_product_attention(qh, kh, vh), reps),
    }
    print(f"\nB={batch}, S={ctx.seq_len}, H={heads}, D={head_dim}, float32, {torch.get_num_threads()} thread(s), median of {reps}")
    for name, seconds in times.items():
        print(f"  {name:58s} {seconds * 1e3:8.2f} ms")
    attn = times[next(n for n in times if n.startswith("gna tiled"))]
    print(f"  permutation / tiled call: {times['permute q,k,v + un-permute out'] / attn:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    padding_table(64)
    padding_table(128)
    permutation_cost(args.batch, 2, 64, args.reps)
    permutation_cost(args.batch, 4, 32, args.reps)


if __name__ == "__main__":
    main()
