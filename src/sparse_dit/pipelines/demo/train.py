"""Training the demo model from scratch: rectified flow on procedurally rendered clips, on CPU.

A run is a list of stages (frames x size, batch, steps): most steps on small clips, which are cheap, then a
short stage at the demo size so the model has seen its token offsets. Deterministic for a seed.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .clips import render, sample_spec
from .pipeline import ShapesVideoPipeline, build_components

CAPTION_DROPOUT = 0.1  # share of unconditional examples, for classifier-free guidance


@dataclass(frozen=True)
class Stage:
    """`steps` optimiser steps on clips of `frames` x `size` x `size` pixels, `batch` clips each."""

    frames: int
    size: int
    batch: int
    steps: int

    @classmethod
    def parse(cls, text: str) -> "Stage":
        """From "FRAMESxSIZE:BATCH:STEPS", e.g. "16x32:8:2000"."""
        shape, batch, steps = text.split(":")
        frames, size = shape.split("x")
        return cls(int(frames), int(size), int(batch), int(steps))


def _batch(stage: Stage, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    clips, captions = [], []
    for _ in range(stage.batch):
        spec = sample_spec(gen)
        clips.append(render(spec, stage.frames, stage.size, stage.size, gen))
        captions.append("" if float(torch.rand(1, generator=gen)) < CAPTION_DROPOUT else spec.caption)
    # (B, 3, F, H, W) in [-1, 1], the transformer's pixel-space "latents"
    return torch.stack(clips).permute(0, 2, 1, 3, 4) * 2 - 1, captions


def train_demo(out: Path, stages: list[Stage], seed: int = 0, lr: float = 1e-3, ema: float = 0.999) -> dict:
    """Train, save the EMA weights as a pipeline with `save_pretrained` into `out`, and return the log."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pipe = ShapesVideoPipeline(**build_components(seed=seed))
    params = list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters())
    average = [copy.deepcopy(p.detach()) for p in params]
    optimiser = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    total = sum(s.steps for s in stages)
    warmup = min(100, total // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: min(1.0, (i + 1) / warmup))
    pipe.transformer.train()
    pipe.text_encoder.train()
    log, start = [], time.perf_counter()
    bar = tqdm(total=total, desc="train-demo", unit="step")
    for stage in stages:
        for _ in range(stage.steps):
            x0, captions = _batch(stage, gen)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))  # logit-normal, as SD3 trains
            xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
            pred = pipe.transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=pipe.encode_prompt(captions),
                                    return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred, noise - x0)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            # Warmed-up decay: a fixed 0.999 would still hold 0.999^n of the random init after n steps
            # (32% after 1150), which is what made the first probe's samples pure speckle.
            decay = min(ema, (1 + len(log)) / (10 + len(log)))
            with torch.no_grad():
                for a, p in zip(average, params):
                    a.lerp_(p.detach(), 1 - decay)
            value = loss.detach().item()
            log.append({"step": len(log), "loss": value, "stage": f"{stage.frames}x{stage.size}", "s": time.perf_counter() - start})
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update()
    bar.close()
    with torch.no_grad():
        for a, p in zip(average, params):
            p.copy_(a)
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    out = Path(out)
    pipe.save_pretrained(out)
    summary = {"seed": seed, "stages": [s.__dict__ for s in stages], "seconds": time.perf_counter() - start,
               "final_loss": sum(r["loss"] for r in log[-50:]) / max(1, len(log[-50:])), "log": log}
    (out / "training_log.json").write_text(json.dumps(summary))
    return summary


def smoothed(losses: list[float], window: int = 50) -> list[float]:
    """Running mean of the loss curve, for plotting."""
    return [sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(losses))]


__all__ = ["Stage", "smoothed", "train_demo"]
