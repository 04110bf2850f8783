"""Exact attention mass per (query block, key block): what an ideal mass-based selector would rank by.

Computed from q and k by a chunked softmax over all keys, so memory stays at a few query blocks' rows
whatever the sequence length. O(S^2 D) work: a yardstick and a measurement, never a fast path.
"""

from __future__ import annotations

import torch

from ..ops import block_attention_mass


def block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """Share of each query block's attention that falls on each key block.

    mass[b, h, i, j] = mean over the queries r of block i of sum over keys c of block j of softmax(q_r . K * scale)[c],
    so every row of blocks sums to 1. The last block of either axis may be short.

    Args:
        q, k: (B, S, H, D); k may have fewer heads than q (grouped-query attention), each serving H / H_k heads.
        block_size: tokens per block.
        scale: softmax scale, default D ** -0.5.
    Returns:
        float32 (B, H, n, n), n = ceil(S / block_size).
    """
    s = q.shape[1]
    # Summed mass under dense attention's LSE (computed chunk by chunk on the way), then averaged over rows.
    mass = block_attention_mass(q, k, None, block_size, scale)
    starts = torch.arange(0, s, block_size, device=q.device)
    counts = torch.clamp(starts + block_size, max=s) - starts
    return mass / counts.view(1, 1, -1, 1)


def top_share(mass: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mass held by each query block's top max(1, round(fraction * n)) key blocks.

    Args:
        mass: (..., nq, nk) from `block_mass`, rows summing to 1.
        fraction: share of the key blocks kept, in (0, 1].
    Returns:
        (..., nq), in [0, 1].
    """
    count = max(1, round(fraction * mass.shape[-1]))
    return mass.topk(count, dim=-1).values.sum(dim=-1)


__all__ = ["block_mass", "top_share"]
