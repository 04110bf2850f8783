"""Exact attention mass per (query block, key block): what an ideal mass-based selector would rank by.

Computed from q and k by a chunked softmax over all keys, so memory stays at a few query blocks' rows
whatever the sequence length. O(S^2 D) work: a yardstick and a measurement, never a fast path.
"""

from __future__ import annotations

import torch

# Query rows per chunk: 1024 rows x 16k keys x 2 heads in fp32 is 128 MB per batch row.
CHUNK_ROWS = 1024


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
    b, s, h, d = q.shape
    if k.shape[2] != h:
        k = k.repeat_interleave(h // k.shape[2], dim=2)
    scale = d**-0.5 if scale is None else scale
    n = -(-s // block_size)
    pad = n * block_size - s
    qh = q.transpose(1, 2).float()  # (B, H, S, D)
    kh = k.transpose(1, 2).float()
    out = torch.empty(b, h, n, n, dtype=torch.float32, device=q.device)
    rows = max(block_size, CHUNK_ROWS // block_size * block_size)
    for start in range(0, s, rows):
        stop = min(s, start + rows)
        probs = (qh[:, :, start:stop] @ kh.transpose(-1, -2) * scale).softmax(dim=-1)  # (B, H, r, S)
        per_key_block = torch.nn.functional.pad(probs, (0, pad)).view(b, h, stop - start, n, block_size).sum(-1)
        first, last = start // block_size, -(-stop // block_size)
        row_pad = (last - first) * block_size - (stop - start)
        summed = torch.nn.functional.pad(per_key_block, (0, 0, 0, row_pad)).view(b, h, last - first, block_size, n).sum(3)
        counts = (torch.clamp(torch.arange(first + 1, last + 1, device=q.device) * block_size, max=s)
                  - torch.arange(first, last, device=q.device) * block_size)
        out[:, :, first:last] = summed / counts.view(1, 1, -1, 1)
    return out


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
