"""Quality metrics of a sparse video against the dense one from the same seed."""

from __future__ import annotations

import torch


def psnr(video: torch.Tensor, reference: torch.Tensor, max_value: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, per frame then averaged over frames, as SVG computes it.

    video, reference: (T, C, H, W) or (T, H, W, C) in [0, max_value]. Identical frames score +inf.
    """
    if video.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {tuple(video.shape)} vs {tuple(reference.shape)}")
    mse = (video.double() - reference.double()).pow(2).flatten(1).mean(dim=1)
    return float((10 * torch.log10(max_value**2 / mse)).mean())
