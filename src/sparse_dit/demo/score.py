"""A pixel-analysis scorer: does a clip show the captioned colour, moving the captioned way? No learned model."""

from __future__ import annotations

import torch

from .clips import COLOURS, MOTIONS, ClipSpec, ShapeSpec

COLOUR_TOLERANCE = 0.25  # Euclidean RGB distance from the captioned colour
MIN_SHIFT_FRACTION = 0.06  # of the shorter side: 4 px at 64 px; a moving object must travel at least this
MAX_STILL_FRACTION = 0.04  # a resting object may drift at most this
MIN_COSINE = 0.7
MIN_AREA_FRACTION = 0.004  # of the frame, in most frames


def _centroids(video: torch.Tensor, colour: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: (x, y) centroid of the pixels near `colour`, and their count. video (T, 3, H, W)."""
    target = torch.tensor(COLOURS[colour]).view(1, 3, 1, 1)
    mask = ((video - target).norm(dim=1) < COLOUR_TOLERANCE).float()  # (T, H, W)
    count = mask.sum(dim=(1, 2))
    ys, xs = torch.meshgrid(torch.arange(video.shape[2]), torch.arange(video.shape[3]), indexing="ij")
    cx = (mask * xs).sum(dim=(1, 2)) / count.clamp_min(1)
    cy = (mask * ys).sum(dim=(1, 2)) / count.clamp_min(1)
    return torch.stack([cx, cy], dim=1), count


def object_passes(video: torch.Tensor, obj: ShapeSpec) -> bool:
    """The colour is present in most frames and its centroid moves as captioned between the first and last quarter."""
    t, _, h, w = video.shape
    centre, count = _centroids(video.float().clamp(0, 1), obj.colour)
    present = count >= MIN_AREA_FRACTION * h * w
    if present.float().mean() < 0.75:
        return False
    quarter = max(1, t // 4)
    first, last = present[:quarter], present[-quarter:]
    if not first.any() or not last.any():
        return False
    shift = centre[-quarter:][last].mean(0) - centre[:quarter][first].mean(0)
    side = min(h, w)
    if obj.motion == "still":
        return float(shift.norm()) < MAX_STILL_FRACTION * side
    direction = torch.tensor(MOTIONS[obj.motion])
    cosine = float(shift @ direction / shift.norm().clamp_min(1e-6))
    return cosine > MIN_COSINE and float(shift.norm()) >= MIN_SHIFT_FRACTION * side


def clip_passes(video: torch.Tensor, spec: ClipSpec) -> bool:
    """Every object of the caption passes. video: (T, 3, H, W) in [0, 1], on any device."""
    video = video.detach().cpu()
    return all(object_passes(video, obj) for obj in spec.objects)
