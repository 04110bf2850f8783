"""Attention maps as images: where one query token of one head looks, frame by frame."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..search.capture import AttentionSample

# Anchors of a perceptually ordered dark-to-bright map (close to matplotlib's "magma").
_MAGMA = np.array([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]], dtype=np.float32)
DECADES = 3.0  # shown dynamic range: probabilities below max / 10**DECADES are black


def magma(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB of shape (..., 3)."""
    pos = np.clip(values, 0, 1) * (len(_MAGMA) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_MAGMA) - 2)
    frac = (pos - lo)[..., None]
    return (_MAGMA[lo] * (1 - frac) + _MAGMA[lo + 1] * frac).round().astype(np.uint8)


def attention_map(sample: AttentionSample, head: int, row: int, batch: int = 0, scale: int = 4) -> Image.Image:
    """One query row's attention over the video keys, frames tiled in a near-square grid.

    Log scale over DECADES decades below the row's maximum; the query's own token is outlined in cyan.
    Each token is a `scale` x `scale` square. Returns an RGB image.
    """
    ctx = sample.ctx
    f, h, w = ctx.grid
    probs = sample.probs[batch, head, row, ctx.video_start : ctx.video_start + f * h * w].view(f, h, w)
    logp = torch.log10(probs.clamp_min(1e-30))
    values = ((logp - logp.max() + DECADES) / DECADES).numpy()
    cols = math.ceil(math.sqrt(f))
    grid_rows = math.ceil(f / cols)
    gap = 2
    canvas = np.full((grid_rows * (h * scale + gap) - gap, cols * (w * scale + gap) - gap, 3), 255, dtype=np.uint8)
    tiles = magma(values).repeat(scale, axis=1).repeat(scale, axis=2)  # (F, H*s, W*s, 3)
    for i in range(f):
        y, x = (i // cols) * (h * scale + gap), (i % cols) * (w * scale + gap)
        canvas[y : y + h * scale, x : x + w * scale] = tiles[i]
    image = Image.fromarray(canvas)
    token = int(sample.rows[row]) - ctx.video_start
    qf, qy, qx = token // (h * w), (token // w) % h, token % w
    y, x = (qf // cols) * (h * scale + gap) + qy * scale, (qf % cols) * (w * scale + gap) + qx * scale
    ImageDraw.Draw(image).rectangle([x - 1, y - 1, x + scale, y + scale], outline=(0, 255, 255))
    return image


def labelled_grid(panels: list[list[tuple[str, Image.Image]]], pad: int = 6, label_height: int = 14) -> Image.Image:
    """Panels in rows and columns, each with a text label above it; all panels of a row share a height."""
    widths = [max(img.width for _, img in row) for row in zip(*panels)] if panels else []
    heights = [max(img.height for _, img in row) + label_height for row in panels]
    sheet = Image.new("RGB", (sum(widths) + pad * (len(widths) + 1), sum(heights) + pad * (len(heights) + 1)), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for row, height in zip(panels, heights):
        x = pad
        for (label, img), width in zip(row, widths):
            draw.text((x, y), label, fill=(0, 0, 0))
            sheet.paste(img, (x, y + label_height))
            x += width + pad
        y += height + pad
    return sheet
