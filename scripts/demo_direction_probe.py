"""Probe how fast the demo model learns the caption's direction, in 3 minutes on one thread.

The shipped model knows little of the captioned direction before it sees the clip (docs/demo_model.md, "What
it lacks"). This isolates that part of the task: it trains only at pure noise (t = 1, where the clean clip is a
function of the caption alone), on 16-frame clips of SIZE x SIZE pixels (32 by default: 1024 tokens, about 6x
faster a step than the demo's 64), optionally on a narrowed set of captions, then prints `motion_from_noise`
for each moving caption of that set. Objects scale with the frame, so the task is the demo's at a quarter of
the tokens. Example (docs/demo_model.md, "The direction plateau"):

    python scripts/demo_direction_probe.py --out runs/one --colours red --shapes circle --motions left,right &
    python scripts/demo_direction_probe.py --out runs/all --motions left,right &
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from sparse_dit.pipelines.demo import train
from sparse_dit.pipelines.demo.clips import COLOURS, MOTIONS, SHAPES, ClipSpec, ShapeSpec
from sparse_dit.pipelines.demo.evaluate import motion_from_noise
from sparse_dit.pipelines.demo.pipeline import ShapesVideoPipeline

PURE_NOISE_SHIFT = 1e4  # shifts the uniform draws to t > 0.99 for all but 1% of them


def narrowed(colours: list[str], shapes: list[str], motions: list[str]):
    """A spec drawer (for `train_demo(draw=...)`) of single objects from these lists, held-out combinations included."""

    def draw(gen: torch.Generator) -> ClipSpec:
        pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
        return ClipSpec((ShapeSpec(pick(colours), pick(shapes), pick(motions)),))

    return draw


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of 2 clips")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--colours", default=",".join(COLOURS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--motions", default=",".join(MOTIONS), help="comma-separated, e.g. 'left,right,up left'")
    parser.add_argument("--model", default="{}", help="build_components keyword arguments, as JSON")
    parser.add_argument("--train", default="{}", help="train_demo keyword arguments (lr, ema), as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    colours, shapes, motions = (getattr(args, name).split(",") for name in ("colours", "shapes", "motions"))
    stages = [train.Stage(16, args.size, 2, args.steps)]
    summary = train.train_demo(args.out, stages, noise_shift=PURE_NOISE_SHIFT, draw=narrowed(colours, shapes, motions),
                               model=json.loads(args.model), **json.loads(args.train))
    pipe = ShapesVideoPipeline.from_pretrained(args.out)
    moving = [ShapeSpec(c, s, m).caption for c, s, m in itertools.product(colours, shapes, motions) if m != "still"]
    captions = moving[:: max(1, len(moving) // 6)][:6]  # up to 6, spread over the set
    per_caption = {c: motion_from_noise(pipe, (c,), seeds=4, size=args.size) for c in captions}
    result = {"loss_last_50": summary["final_loss"], "minutes": summary["seconds"] / 60,
              "motion_from_noise": sum(per_caption.values()) / len(per_caption), "per_caption": per_caption}
    (args.out / "probe.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
