"""Probe how fast the demo model learns the caption's direction, in 3 minutes on one thread.

The session-8 model knew little of the captioned direction before it saw the clip (docs/demo_model.md, "What
the previous model lacked"). This isolates that part of the task: it trains only at pure noise (t = 1, where the clean clip is a
function of the caption alone), on 16-frame clips of SIZE x SIZE pixels (32 by default: 1024 tokens, about 6x
faster a step than the demo's 64), optionally on a narrowed set of captions, then prints `motion_from_noise`
for each moving caption of that set. Objects scale with the frame, so the task is the demo's at a quarter of
the tokens. Example (docs/demo_model.md, "The direction plateau"; `--model` restores the RGB-only model with
a 1-layer T5 that those probes ran on, no longer `build_components`' default):

    python -m sparse_dit.demo.research.direction_probe --out runs/one --colours red --shapes circle --motions left,right \
        --model '{"coverage": false, "text_layers": 1}' &
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from sparse_dit.demo import train
from sparse_dit.demo.clips import COLOURS, MOTIONS, SHAPES, ClipSpec, ShapeSpec, random_object
from sparse_dit.demo.evaluate import motion_from_noise
from sparse_dit.demo.pipeline import ShapesVideoPipeline

PURE_NOISE_SHIFT = 1e4  # shifts the uniform draws to t > 0.99 for all but 1% of them


def narrowed(colours: list[str], shapes: list[str], motions: list[str]):
    """A spec drawer (for `train_demo(draw=...)`) of single objects from these lists, held-out combinations included."""

    def draw(gen: torch.Generator) -> ClipSpec:
        return ClipSpec((random_object(gen, colours, shapes, motions),))

    return draw


def probe_captions(colours: list[str], shapes: list[str], motions: list[str], n: int = 6) -> list[str]:
    """Up to `n` moving captions of this set, taking the motions in turn so that no direction dominates the score."""
    moving = [m for m in motions if m != "still"]
    objects = list(itertools.product(colours, shapes))
    count = min(n, len(moving) * len(objects))
    # A stride coprime with the object count visits distinct objects, and (coprime with the shape count too) varies shapes.
    stride = next(k for k in itertools.count(max(1, len(objects) // count)) if math.gcd(k, len(objects)) == 1)
    return [ShapeSpec(*objects[(i * stride) % len(objects)], moving[i % len(moving)]).caption for i in range(count)]


def evaluate(path: Path, captions: list[str], size: int) -> dict[str, float]:
    """`motion_from_noise` of the pipeline saved at `path`, per caption."""
    pipe = ShapesVideoPipeline.from_pretrained(path)
    return {c: motion_from_noise(pipe, (c,), seeds=4, size=size) for c in captions}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2, help="clips per optimiser step")
    parser.add_argument("--colours", default=",".join(COLOURS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--motions", default=",".join(MOTIONS), help="comma-separated, e.g. 'left,right,up left'")
    parser.add_argument("--model", default="{}", help="build_components keyword arguments, as JSON")
    parser.add_argument("--train", default="{}", help="train_demo keyword arguments (lr, ema), as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluate-only", action="store_true", help="score the pipeline already saved at --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    colours, shapes, motions = (getattr(args, name).split(",") for name in ("colours", "shapes", "motions"))
    captions = probe_captions(colours, shapes, motions)
    saved = args.out / "probe.json"
    result = json.loads(saved.read_text()) if args.evaluate_only and saved.exists() else {}
    if not args.evaluate_only:
        summary = train.train_demo(args.out, [train.Stage(16, args.size, args.batch, args.steps)], noise_shift=PURE_NOISE_SHIFT,
                                   draw=narrowed(colours, shapes, motions), model=json.loads(args.model), **json.loads(args.train))
        result = {"loss_last_50": summary["final_loss"], "minutes": summary["seconds"] / 60}
    per_caption = evaluate(args.out, captions, args.size)
    result.update(motion_from_noise=sum(per_caption.values()) / len(per_caption), per_caption=per_caption)
    saved.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
