"""Screen a change to the demo model's recipe in 10 minutes before spending 70 on it.

Trains one variant briefly on one thread (run two side by side on the 2 cores, so both see the same
machine), then prints the clean-clip MSE by noise level on 10 fixed 16-frame clips of the 5 seen captions:
the error from high noise is what decides where sampling puts the object. Example (docs/demo_model.md,
"Fourier coordinates, two wider heads, a higher rate"):

    python scripts/demo_recipe_ab.py --out runs/base --stages 4x64:8:250 --model '{"frequencies": 0, "heads": 4, "head_dim": 32}' &
    python scripts/demo_recipe_ab.py --out runs/fq4 --stages 4x64:8:250 --model '{"frequencies": 4}' &
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from sparse_dit.pipelines.demo import train
from sparse_dit.pipelines.demo.evaluate import CAPTIONS, clean_clip
from sparse_dit.pipelines.demo.pipeline import ShapesVideoPipeline, build_components


@torch.no_grad()
def clean_error(pipe: ShapesVideoPipeline, levels: tuple[float, ...] = (0.6, 0.9, 0.98)) -> dict[str, float]:
    """Mean x0 MSE ([-1, 1] units) at each noise level over 2 fixed clips of each seen caption, and
    ("{t}_ends") over their first and last 4 frames, where the object is farthest from its path's middle."""
    errors = {}
    for t in levels:
        total, ends = [], []
        for i, caption in enumerate(CAPTIONS):
            for s in range(2):
                gen = torch.Generator().manual_seed(100 + 10 * i + s)
                x0 = clean_clip(caption, gen)
                xt = (1 - t) * x0 + t * torch.randn(x0.shape, generator=gen)
                pred = pipe.predict_clean(xt, torch.tensor([t * 1000.0]), pipe.encode_prompt([caption]))
                total.append(float(((pred - x0) ** 2).mean()))
                ends.append(float(((pred - x0)[:, :, [0, 1, 2, 3, 12, 13, 14, 15]] ** 2).mean()))
        errors[f"{t}"] = sum(total) / len(total)
        errors[f"{t}_ends"] = sum(ends) / len(ends)
    return errors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="4x64:8:250")
    parser.add_argument("--model", default="{}", help="build_components keyword arguments, as JSON")
    parser.add_argument("--train", default="{}", help="train_demo keyword arguments (lr, ema), as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train.build_components = functools.partial(build_components, **json.loads(args.model))
    summary = train.train_demo(args.out, [train.Stage.parse(s) for s in args.stages.split(",")], **json.loads(args.train))
    result = {"loss_last_50": summary["final_loss"], "minutes": summary["seconds"] / 60,
              "x0_mse": clean_error(ShapesVideoPipeline.from_pretrained(args.out))}
    (args.out / "ab.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
