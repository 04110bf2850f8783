"""Where tokens and blocks sit on the (F, H, W) grid: the shared vocabulary of the geometric methods."""

from __future__ import annotations

import torch

from .base import PlanContext

_FAR = 1 << 30  # coordinate given to text tokens so no distance test ever keeps them by geometry


def token_coords(ctx: PlanContext) -> torch.Tensor:
    """(f, h, w) of every token of the sequence: long (S, 3); text tokens get a far-away sentinel.

    Video tokens are in the f-major order every supported model uses after patching.
    """
    f, h, w = ctx.grid
    idx = torch.arange(ctx.num_video_tokens, device=ctx.device)
    video = torch.stack((idx // (h * w), (idx // w) % h, idx % w), dim=1)
    coords = torch.full((ctx.seq_len, 3), _FAR, dtype=torch.long, device=ctx.device)
    start = ctx.video_start
    coords[start : start + ctx.num_video_tokens] = video
    return coords


def block_boxes(coords: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding box of the video tokens of each block: (lo, hi), long (n, 3) each.

    coords: long (S, 3) from `token_coords`. A block with no video token gets an empty box far away.
    """
    s = coords.shape[0]
    pad = (-s) % block_size
    is_video = coords[:, 0] < _FAR
    lo_src = torch.where(is_video[:, None], coords, torch.full_like(coords, _FAR))
    hi_src = torch.where(is_video[:, None], coords, torch.full_like(coords, -_FAR))
    lo = torch.nn.functional.pad(lo_src, (0, 0, 0, pad), value=_FAR).view(-1, block_size, 3).amin(dim=1)
    hi = torch.nn.functional.pad(hi_src, (0, 0, 0, pad), value=-_FAR).view(-1, block_size, 3).amax(dim=1)
    return lo, hi


def box_gaps(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per-axis distance between the boxes of every pair of blocks: long (n, n, 3), 0 where they overlap."""
    gap_after = lo[None, :, :] - hi[:, None, :]  # key box after query box
    gap_before = lo[:, None, :] - hi[None, :, :]  # key box before query box
    return torch.clamp(torch.maximum(gap_after, gap_before), min=0)
