"""Where a sparse method costs quality: each denoising step and each layer made sparse alone, and the error by frame.

    OMP_NUM_THREADS=1 python scripts/sparse_sensitivity.py                       # gna, the demo's 16 frames
    python scripts/sparse_sensitivity.py --method clear --num-frames 32

Runs the demo pipeline dense and then with `--method` at its defaults in four ways, each scored by PSNR against the
dense clip of the same prompt and seed, averaged over the prompts:

- every sparse step (the method's own dense warm-up first): the figure `sparse-dit eval` reports;
- one layer only (`dense_layers` = all the others), for each self-attention layer;
- one denoising step only, for each step after the warm-up: sparse attention is switched on for that step's
  transformer call and off again in `callback_on_step_end`;
- the first run's error per frame;
- for a distilled model (`--reference` set), its dense warm-up run on the reference's weights, switched to its own
  in `callback_on_step_end` when the warm-up ends: what its fine-tuned weights cost on the steps they were not
  trained for (`sparse-dit distill` trains the sparse steps unless `--train-warmup`).

If the steps' errors were independent, their mean squared errors would add up to the all-steps figure; the script
prints that sum next to the sum of their root mean squared errors, which is what errors pointing the same way add
up to. A distilled model (`--pipeline` a `sparse-dit distill` folder) is scored against the shipped model's dense
clips with `--reference demo`. `--overall-only` stops after the first two figures.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from sparse_dit import load_demo_pipeline
from sparse_dit.evals.metrics import psnr
from sparse_dit.patterns import resolve_config
from sparse_dit.plugin import attention_sites


def decibels(mse: float) -> float:
    """PSNR of a mean squared error on [0, 1] pixels; inf for none."""
    return -10 * math.log10(mse) if mse > 0 else math.inf


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="gna", help="a registered method, at its defaults")
    parser.add_argument("--pipeline", default=None, help="demo variant or a train-demo / distill folder (default: demo)")
    parser.add_argument("--reference", default=None, help="the pipeline whose dense clips are the reference (default: --pipeline)")
    parser.add_argument("--prompts", nargs="+", default=["a red circle moving left", "a green square moving up"])
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overall-only", action="store_true",
                        help="only every sparse step, and the warm-up on the reference's weights")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    shipped = lambda name: None if name == "demo" else name  # noqa: E731  (as the CLI's --pipeline takes it)
    pipe = load_demo_pipeline(shipped(args.pipeline))
    reference = load_demo_pipeline(shipped(args.reference)) if args.reference else pipe
    for p in {id(pipe): pipe, id(reference): reference}.values():
        p.set_progress_bar_config(disable=True)

    def generate(p, prompt: str, callback=None) -> torch.Tensor:
        out = p(prompt, num_frames=args.num_frames, num_inference_steps=args.steps, callback_on_step_end=callback,
                generator=torch.Generator().manual_seed(args.seed)).frames[0]
        return torch.from_numpy(np.asarray(out)).float()  # (F, H, W, 3) in [0, 1]

    dense = [generate(reference, prompt) for prompt in args.prompts]

    def score(callback_factory=None, **options) -> tuple[float, list[torch.Tensor]]:
        values, errors = [], []
        for prompt, want in zip(args.prompts, dense):
            if callback_factory is None:
                pipe.enable_sparse_attention(args.method, **options)
                got = generate(pipe, prompt)
            else:
                got = generate(pipe, prompt, callback_factory())
            pipe.disable_sparse_attention()
            values.append(psnr(got, want))
            errors.append(got - want)
        return sum(values) / len(values), errors

    overall, errors = score()
    print(f"{args.method}, every sparse step: {overall:.2f} dB")
    warmup = resolve_config(args.method).dense_step_count(args.steps)
    if reference is not pipe and warmup:
        own = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        theirs = reference.transformer.state_dict()

        def switched():
            pipe.transformer.load_state_dict(theirs)
            pipe.enable_sparse_attention(args.method)

            def callback(p, i, t, tensors):
                if i == warmup - 1:
                    p.transformer.load_state_dict(own)
                return tensors
            return callback

        switch, _ = score(switched)
        pipe.transformer.load_state_dict(own)
        print(f"{args.method}, the {warmup} warm-up steps on the reference's weights: {switch:.2f} dB")
    if args.overall_only:
        return
    frames = torch.stack([e.pow(2).mean(dim=(1, 2, 3)) for e in errors]).mean(dim=0)
    print("per frame, dB:", " ".join(f"{decibels(m):.1f}" for m in frames.tolist()))
    layers = len(attention_sites(pipe))
    for layer in range(layers):
        alone, _ = score(dense_layers=tuple(i for i in range(layers) if i != layer))
        print(f"layer {layer} alone: {alone:.2f} dB")

    def only(step: int):
        def factory():
            if step == 0:
                pipe.enable_sparse_attention(args.method, dense_steps=0)

            def callback(p, i, t, tensors):
                if i == step - 1:
                    p.enable_sparse_attention(args.method, dense_steps=0)
                elif i == step:
                    p.disable_sparse_attention()
                return tensors
            return callback
        return factory

    mse_sum = rmse_sum = 0.0
    for step in range(warmup, args.steps):
        alone, _ = score(only(step))
        mse = 10 ** (-alone / 10)
        mse_sum, rmse_sum = mse_sum + mse, rmse_sum + math.sqrt(mse)
        print(f"step {step} alone: {alone:.2f} dB")
    print(f"every step, if their errors were independent (MSEs add): {decibels(mse_sum):.2f} dB; "
          f"if they point the same way (RMSEs add): {decibels(rmse_sum ** 2):.2f} dB; measured {overall:.2f} dB")


if __name__ == "__main__":
    main()
