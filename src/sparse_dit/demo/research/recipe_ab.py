"""Screen a change to the demo model's recipe in 10 minutes before spending 45 on it.

Trains one variant briefly on one thread (run two side by side on the 2 cores, so both see the same
machine), then prints the clean-clip MSE by noise level on 10 fixed 16-frame clips of the 5 seen captions
(the error from high noise is what decides where sampling puts the object) and `motion_from_noise`, how much
of the captioned motion the prediction from pure noise holds. Example (docs/demo_model.md,
"Fourier coordinates, two wider heads, a higher rate"; those runs were RGB only with a 1-layer T5, which
`"coverage": false, "text_layers": 1` restores):

    python -m sparse_dit.demo.research.recipe_ab --out runs/base --stages 4x64:8:250 --model '{"frequencies": 0, "heads": 4, "head_dim": 32, "coverage": false, "text_layers": 1}' &
    python -m sparse_dit.demo.research.recipe_ab --out runs/fq4 --stages 4x64:8:250 --model '{"frequencies": 4, "coverage": false, "text_layers": 1}' &
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparse_dit.demo import train
from sparse_dit.demo.clips import as_latents, parse_caption, render_with_coverage
from sparse_dit.demo.evaluate import CAPTIONS, motion_from_noise
from sparse_dit.demo.pipeline import CHANNELS, ShapesVideoPipeline


@torch.no_grad()
def clean_error(pipe: ShapesVideoPipeline, levels: tuple[float, ...] = (0.6, 0.9, 0.98)) -> dict[str, float]:
    """Mean x0 MSE ([-1, 1] units) at each noise level over 2 fixed clips of each seen caption, over
    their first and last 4 frames ("{t}_ends"), where the object is farthest from its path's middle, and
    over the pixels the object covers ("{t}_object"), 6% of a frame, which the scorer judges."""
    errors = {}
    for t in levels:
        total, ends, inside = [], [], []
        for i, caption in enumerate(CAPTIONS):
            for s in range(2):
                gen = torch.Generator().manual_seed(100 + 10 * i + s)
                video, cover = render_with_coverage(parse_caption(caption), 16, 64, 64, gen)
                x0 = as_latents(video, cover if pipe.latent_channels > 3 else None)
                xt = (1 - t) * x0 + t * torch.randn(x0.shape, generator=gen)
                pred = pipe.predict_clean(xt, torch.tensor([t * 1000.0]), pipe.encode_prompt([caption]))
                error = (pred - x0)[:, :CHANNELS] ** 2  # RGB, comparable with and without the coverage channel
                total.append(float(error.mean()))
                ends.append(float(error[:, :, [0, 1, 2, 3, 12, 13, 14, 15]].mean()))
                inside.append(float(error.mean(1)[0][cover > 0.5].mean()))
        for name, values in (("", total), ("_ends", ends), ("_object", inside)):
            errors[f"{t}{name}"] = sum(values) / len(values)
    return errors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="4x64:8:250")
    parser.add_argument("--model", default="{}", help="build_components keyword arguments, as JSON")
    parser.add_argument("--train", default="{}", help="train_demo keyword arguments (lr, ema, noise_shift), as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluate-only", action="store_true", help="only measure the model already in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = json.loads((args.out / "ab.json").read_text()) if args.evaluate_only else {}
    if not args.evaluate_only:
        summary = train.train_demo(args.out, [train.Stage.parse(s) for s in args.stages.split(",")], model=json.loads(args.model),
                                   **json.loads(args.train))
        result = {"loss_last_50": summary["final_loss"], "minutes": summary["seconds"] / 60}
    pipe = ShapesVideoPipeline.from_pretrained(args.out)
    result["x0_mse"] = clean_error(pipe)
    result["motion_from_noise"] = motion_from_noise(pipe)
    (args.out / "ab.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
