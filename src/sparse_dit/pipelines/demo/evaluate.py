"""How well the demo model follows its captions: generate clips and judge them with the pixel scorer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from .clips import parse_caption
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
    call = {"num_inference_steps": 20, "guidance_scale": 4.5, **call, "output_type": "pt"}
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
