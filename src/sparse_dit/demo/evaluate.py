"""How well the demo model follows its captions: generate clips and judge them with the pixel scorer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from .clips import COLOURS, MOTIONS, as_latents, parse_caption, render_with_coverage
from .pipeline import CHANNELS
from .score import clip_passes

CAPTIONS = (  # seen in training
    "a red circle moving right",
    "a green square moving up",
    "a blue triangle moving left",
    "a yellow circle moving down",
    "a cyan square moving down right",
)
HELD_OUT_CAPTIONS = (  # never seen: each is a held-out (colour, shape, motion) combination
    "a red circle moving left",
    "a green circle staying still",
    "a blue triangle moving down",
    "a magenta triangle moving right",
    "a cyan square moving up",
)


@dataclass
class PassRate:
    """Share of generated clips whose every object passes the scorer, per caption and overall."""

    per_caption: dict[str, float]

    @property
    def overall(self) -> float:
        return sum(self.per_caption.values()) / len(self.per_caption)


def pass_rate(pipe, captions=CAPTIONS, seeds: int = 20, batch: int = 10, **call) -> PassRate:
    """Generate `seeds` clips per caption (seeds 1000.. so they are new), `batch` per call, and score them."""
    call = {"num_inference_steps": 20, **call, "output_type": "pt"}
    results = {}
    bar = tqdm(total=len(captions) * seeds, desc="scoring", unit="clip")
    for caption in captions:
        spec = parse_caption(caption)
        passed = 0
        for first in range(1000, 1000 + seeds, batch):
            chunk = range(first, min(first + batch, 1000 + seeds))
            videos = pipe(prompt=[caption] * len(chunk), generator=[torch.Generator().manual_seed(s) for s in chunk],
                          **call).frames
            passed += sum(clip_passes(video, spec) for video in videos)
            bar.update(len(chunk))
        results[caption] = passed / seeds
    bar.close()
    return PassRate(results)


def _strip(frames: list[torch.Tensor], scale: int) -> np.ndarray:
    """(H, W, 3) frames in [0, 1] side by side with 2-pixel white gaps, each pixel `scale` x `scale`: uint8 array."""
    tiles = [(f.clamp(0, 1) * 255).round().byte().cpu().numpy() for f in frames]
    gap = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
    row = np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1)
    return row.repeat(scale, axis=0).repeat(scale, axis=1)


def clean_clip(caption: str, generator: torch.Generator, size: int = 64, channels: int = 3) -> torch.Tensor:
    """A rendered 16-frame clip of `caption`, `size` pixels square, as a model of `latent_channels` = `channels`
    sees it: (1, channels, 16, size, size) in [-1, 1]."""
    video, coverage = render_with_coverage(parse_caption(caption), 16, size, size, generator)
    return as_latents(video, coverage if channels > 3 else None)


@torch.no_grad()
def predictions_by_noise(
    pipe, caption: str = CAPTIONS[0], levels: tuple[float, ...] = (0.3, 0.6, 0.9, 0.98),
    frames: tuple[int, ...] = (0, 5, 10, 15), seed: int = 0, scale: int = 2,
) -> tuple[Image.Image, dict[float, float]]:
    """What the model predicts as the clean clip from one noisy clip at several noise levels.

    Renders a 16 x 64 x 64 clip of `caption`, noises it to each t in `levels` and takes the one-step
    prediction `predict_clean` (conditional, no guidance). Returns an image (rows: the clip, then one row
    per level; columns: `frames`; each pixel `scale` x `scale`) and the MSE of each prediction's RGB in [-1, 1]
    units (the coverage channel left out, so models with and without it compare).
    """
    gen = torch.Generator().manual_seed(seed)
    x0 = clean_clip(caption, gen, channels=pipe.latent_channels)
    noise = torch.randn(x0.shape, generator=gen)
    text = pipe.encode_prompt([caption])
    rows, errors = [x0], {}
    for t in levels:
        xt = (1 - t) * x0 + t * noise
        pred = pipe.predict_clean(xt, torch.tensor([t * 1000.0]), text)
        errors[t] = float(((pred - x0)[:, :CHANNELS] ** 2).mean())
        rows.append(pred)
    lines = [_strip([(r[0, :CHANNELS, f].permute(1, 2, 0) + 1) / 2 for f in frames], scale) for r in rows]
    gap = np.full((2 * scale, lines[0].shape[1], 3), 255, np.uint8)
    return Image.fromarray(np.concatenate([x for line in lines for x in (line, gap)][:-1], axis=0)), errors


def soft_centroids(video: torch.Tensor, colour: str) -> torch.Tensor:
    """Per-frame centroid (F, 2) in pixels (x, y) of where `video` (3, F, H, W) in [-1, 1] is near `colour`.

    Pixels weigh (1 - RGB distance / 2)^4: 1 at the colour, under 0.1 at the grey background, so a faint
    hedged prediction still has a centroid (the scorer's hard threshold would see nothing there).
    """
    target = torch.tensor(COLOURS[colour], device=video.device).view(3, 1, 1, 1) * 2 - 1
    weight = (1 - (video.float() - target).norm(dim=0) / 2).clamp(0, 1) ** 4  # (F, H, W)
    ys, xs = torch.meshgrid(torch.arange(video.shape[2], dtype=torch.float32, device=video.device),
                            torch.arange(video.shape[3], dtype=torch.float32, device=video.device), indexing="ij")
    mass = weight.sum(dim=(1, 2)).clamp_min(1e-6)
    return torch.stack([(weight * xs).sum(dim=(1, 2)) / mass, (weight * ys).sum(dim=(1, 2)) / mass], dim=1)


@torch.no_grad()
def motion_from_noise(pipe, captions=CAPTIONS, seeds: int = 2, size: int = 64) -> float:
    """How much of its captioned motion the model knows before it sees any of the clip.

    For each moving caption, the prediction `predict_clean` from pure noise (t = 1): the shift of the captioned
    colour's centroid (`soft_centroids`) from the first to the last 4 of 16 frames, projected on the caption's
    direction, over the same shift in a rendered clip. Averaged over `seeds` noise draws per caption: 1 when it
    draws the object where the caption puts it, 0 when it draws it in the same place in every frame. Sampling
    decides where the object goes in its first steps, from this prediction. `size`: the frame side in pixels.
    """
    shares = []
    for i, caption in enumerate(captions):
        obj = parse_caption(caption).objects[0]
        if obj.motion == "still":
            continue
        direction = torch.tensor(MOTIONS[obj.motion])
        for s in range(seeds):
            gen = torch.Generator().manual_seed(200 + 10 * i + s)
            x0 = clean_clip(caption, gen, size, pipe.latent_channels)
            pred = pipe.predict_clean(torch.randn(x0.shape, generator=gen), torch.tensor([1000.0]), pipe.encode_prompt([caption]))
            moved = [float((c[-4:].mean(0) - c[:4].mean(0)) @ direction)
                     for c in (soft_centroids(pred[0, :CHANNELS].cpu(), obj.colour), soft_centroids(x0[0, :CHANNELS], obj.colour))]
            shares.append(moved[0] / moved[1])
    return sum(shares) / len(shares)


@torch.no_grad()
def sample_sheet(pipe, captions=CAPTIONS + HELD_OUT_CAPTIONS[:2], seed: int = 1000, frames: tuple[int, ...] = (0, 5, 10, 15),
                 scale: int = 2, **call) -> Image.Image:
    """One generated clip per caption from the same seed: a labelled row per caption, a column per frame in `frames`."""
    call = {"num_inference_steps": 20, **call, "output_type": "pt"}
    videos = pipe(prompt=list(captions), generator=[torch.Generator().manual_seed(seed) for _ in captions], **call).frames
    rows = []
    for caption, video in zip(captions, videos):
        row = _strip([video[f].permute(1, 2, 0) for f in frames], scale)
        label = Image.new("RGB", (row.shape[1], 14), "white")
        ImageDraw.Draw(label).text((2, 1), caption, fill="black")
        rows.append(np.concatenate([np.asarray(label), row], axis=0))
    return Image.fromarray(np.concatenate(rows, axis=0))
