"""Writing clips: mp4 and gif, and the side-by-side (dense | sparse | amplified difference) comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(T, C, H, W) in [0, 1] -> (T, H, W, C) uint8."""
    return (video.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


def side_by_side(dense: torch.Tensor, sparse: torch.Tensor, amplify: float = 4.0, gap: int = 2) -> torch.Tensor:
    """Frames of [dense | sparse | |dense - sparse| x amplify], separated by white columns.

    dense, sparse: (T, C, H, W) in [0, 1]. Returns (T, C, H, 3W + 2 gap).
    """
    diff = ((dense - sparse).abs() * amplify).clamp(0, 1)
    sep = torch.ones(*dense.shape[:3], gap, dtype=dense.dtype)
    return torch.cat([dense, sep, sparse, sep, diff], dim=-1)


def write_video(video: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write (T, C, H, W) frames in [0, 1] as .mp4 (H.264) or .gif, chosen by the suffix."""
    import imageio
    import imageio.v3 as iio

    path = Path(path)
    frames = to_uint8(video)
    if path.suffix == ".gif":
        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    else:
        # H.264 wants even sizes; pad by one pixel where needed.
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        imageio.mimwrite(path, frames, fps=fps, codec="libx264", quality=8, macro_block_size=1)
    return path
