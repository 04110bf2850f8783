"""Training the demo model from scratch: rectified flow on procedurally rendered clips, on CPU.

A run is a list of stages (frames x size, batch, steps), with one learning-rate schedule over all of them.
Small clips are cheap (attention is quadratic in tokens), so the default run takes most of its steps on whole
16-frame clips of 32 x 32 pixels (1024 tokens, about 0.25 s a step on 2 cores), where the model learns what each
caption means, and then a few hundred at the demo's 64 x 64 (4096 tokens, about 2.2 s a step), where it learns
the finer shapes; the coordinate planes the transformer reads are in [-1, 1] at any size, so what it learned at
32 carries over. A stage may also train on a window of fewer frames cut from a 16-frame clip; the time planes say
which part of the clip it is. Midway the self-attention QK-norm gains are ramped up and held, which makes the
model's attention concentrated as a real video DiT's is. Deterministic for a seed.

The loss is on the predicted clean clip, MSE(x0_pred, x0), with noise levels drawn
uniform and shifted towards noise as the sampler's schedule is: a velocity loss weights the x0 error by
1/t^2 (400x at t = 0.05), which let the small-t examples swamp the caption signal.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .clips import ClipSpec, as_latents, render_with_coverage, sample_spec
from .pipeline import SHIFT, ShapesVideoPipeline, build_components

CAPTION_DROPOUT = 0.1  # share of unconditional examples, for classifier-free guidance
CLIP_FRAMES = 16  # the length a motion is rendered over; shorter stages train on a window of it
FINAL_LR = 0.1  # the cosine schedule ends at this fraction of the peak rate
DEFAULT_STAGES = "16x32:2:4000,16x64:2:600"
# The self-attention QK-norm gains rise from 1 to 3.5 over these steps, after the captioned motion is learned at 1,
# and stay there: a query-key logit can then reach 3.5^2 * 8 = 98 and attention concentrates as a real video
# DiT's does (docs/demo_model.md, "Concentrated attention").
DEFAULT_QK_GAIN = 3.5
DEFAULT_QK_GAIN_RAMP = (1500, 3000)


@dataclass(frozen=True)
class Stage:
    """`steps` optimiser steps on clips of `frames` x `size` x `size` pixels, `batch` clips each."""

    frames: int
    size: int
    batch: int
    steps: int

    @classmethod
    def parse(cls, text: str) -> "Stage":
        """From "FRAMESxSIZE:BATCH:STEPS", e.g. "4x64:8:1200"."""
        shape, batch, steps = text.split(":")
        frames, size = shape.split("x")
        return cls(int(frames), int(size), int(batch), int(steps))


def _batch(stage: Stage, gen: torch.Generator, draw: Callable[[torch.Generator], ClipSpec] = sample_spec,
           coverage: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Clips (B, 3, F, H, W) in [-1, 1] (B, 4, ... with `coverage`), the clip time of each frame (B, F), and captions."""
    clips, times, captions = [], [], []
    length = max(stage.frames, CLIP_FRAMES)
    for _ in range(stage.batch):
        spec = draw(gen)
        start = int(torch.randint(length - stage.frames + 1, (1,), generator=gen))
        video, covered = render_with_coverage(spec, length, stage.size, stage.size, gen)
        clips.append(as_latents(video, covered if coverage else None)[:, :, start : start + stage.frames])
        times.append(torch.linspace(-1, 1, length)[start : start + stage.frames])
        captions.append("" if float(torch.rand(1, generator=gen)) < CAPTION_DROPOUT else spec.caption)
    return torch.cat(clips), torch.stack(times), captions


def _noise_levels(batch: int, gen: torch.Generator, shift: float = SHIFT) -> torch.Tensor:
    """t in (0, 1) for each clip: uniform, shifted by `shift` (by default as the sampler's timesteps are: t > 0.9 for 18%)."""
    u = torch.rand(batch, generator=gen).clamp(1e-3, 1 - 1e-3)
    return shift * u / (1 + (shift - 1) * u)


def qk_gain_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The RMS-norm gains of every self-attention layer's queries and keys (`attn1.norm_q`, `attn1.norm_k`)."""
    return [p for name, p in transformer.named_parameters()
            if ".attn1.norm_q." in name or ".attn1.norm_k." in name]


def gain_at(step: int, gain: float, ramp: tuple[int, int]) -> float:
    """The factor the self-attention QK-norm gains are scaled by at `step`: 1 until ramp[0], rising linearly to
    `gain` at ramp[1], then `gain`."""
    start, end = ramp
    if step >= end:
        return gain
    return 1 + (gain - 1) * max(0.0, (step - start) / (end - start))


def train_demo(out: Path, stages: list[Stage], seed: int = 0, lr: float = 2e-3, ema: float = 0.998,
               noise_shift: float = SHIFT, device: str = "cpu", draw: Callable[[torch.Generator], ClipSpec] = sample_spec,
               model: dict | None = None, qk_gain: float = DEFAULT_QK_GAIN,
               qk_gain_ramp: tuple[int, int] = DEFAULT_QK_GAIN_RAMP, train_qk_gain: bool = False) -> dict:
    """Train, save the EMA weights as a pipeline with `save_pretrained` into `out`, and return the log.

    Data and noise are drawn on the CPU from one generator, so a seed gives the same batches on any device.
    `draw` picks each clip's spec (experiments narrow the captions with it); `model`: `build_components` arguments.
    `qk_gain`, `qk_gain_ramp`: the self-attention QK-norm gains (and their running average) are scaled up by
    `gain_at(step, qk_gain, qk_gain_ramp)` as training goes. A query-key logit is at most gain^2 * sqrt(head_dim),
    so gains near 1 leave a softmax over thousands of keys diffuse, while gains of 2 from the start slow the
    learning of the captioned motion (docs/demo_model.md). With `qk_gain` 1 the gains are trained like any weight;
    otherwise they follow the schedule alone unless `train_qk_gain`: trained, the optimiser pulled layer 0's back
    from 2.0 to 1.5 and its attention stayed diffuse.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pipe = ShapesVideoPipeline(**build_components(seed=seed, **(model or {}))).to(device)
    params = list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters())
    average = [copy.deepcopy(p.detach()) for p in params]
    gains = {id(p) for p in qk_gain_parameters(pipe.transformer)}
    gain_pairs = [(p, a) for p, a in zip(params, average) if id(p) in gains]
    with torch.no_grad():
        for p, a in gain_pairs:
            p.mul_(gain_at(0, qk_gain, qk_gain_ramp))
            a.copy_(p)
    frozen = gains if qk_gain != 1.0 and not train_qk_gain else set()
    trained = [p for p in params if id(p) not in frozen]
    for p in params:
        p.requires_grad_(id(p) not in frozen)
    optimiser = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    total = sum(s.steps for s in stages)
    warmup = min(100, total // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: _rate(i, warmup, total))
    pipe.transformer.train()
    pipe.text_encoder.train()
    log, start = [], time.perf_counter()
    bar = tqdm(total=total, desc="train-demo", unit="step")
    out = Path(out)
    for index, stage in enumerate(stages):
        for _ in range(stage.steps):
            x0, times, captions = _batch(stage, gen, draw, coverage=pipe.latent_channels > 3)
            noise = torch.randn(x0.shape, generator=gen)
            t = _noise_levels(x0.shape[0], gen, noise_shift)
            x0, times, noise, t = (x.to(device) for x in (x0, times, noise, t))
            sigma = t.view(-1, 1, 1, 1, 1)
            xt = (1 - sigma) * x0 + sigma * noise
            clean = pipe.predict_clean(xt, t * 1000, pipe.encode_prompt(captions), times=times)
            loss = torch.nn.functional.mse_loss(clean, x0)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimiser.step()
            schedule.step()
            ratio = gain_at(len(log) + 1, qk_gain, qk_gain_ramp) / gain_at(len(log), qk_gain, qk_gain_ramp)
            if ratio != 1.0:
                with torch.no_grad():
                    for p, a in gain_pairs:
                        p.mul_(ratio)
                        a.mul_(ratio)
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
        if index < len(stages) - 1:  # a checkpoint per stage, to sample from while the run goes on
            _save_average(pipe, params, average, out / f"stage-{index + 1}")
    bar.close()
    _save_average(pipe, params, average, out)
    summary = {"seed": seed, "stages": [s.__dict__ for s in stages], "qk_gain": qk_gain, "qk_gain_ramp": list(qk_gain_ramp),
               "train_qk_gain": train_qk_gain, "seconds": time.perf_counter() - start,
               "final_loss": sum(r["loss"] for r in log[-50:]) / max(1, len(log[-50:])), "log": log}
    (out / "training_log.json").write_text(json.dumps(summary))
    (out / "loss_curve.svg").write_text(loss_curve_svg(log))
    return summary


def _rate(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay from 1 to FINAL_LR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def _save_average(pipe: ShapesVideoPipeline, params: list[torch.Tensor], average: list[torch.Tensor], path: Path) -> None:
    """save_pretrained with the EMA weights, leaving the training weights in place."""
    with torch.no_grad():
        current = [p.detach().clone() for p in params]
        for a, p in zip(average, params):
            p.copy_(a)
        pipe.save_pretrained(path)
        for c, p in zip(current, params):
            p.copy_(c)


def smoothed(losses: list[float], window: int = 50) -> list[float]:
    """Running mean of the loss curve, for plotting."""
    return [sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(losses))]


def loss_curve_svg(log: list[dict], width: int = 640, height: int = 320) -> str:
    """The training loss (50-step running mean, log scale) with the stage boundaries marked, as SVG."""
    values = smoothed([r["loss"] for r in log])
    pad, n = 56, len(values)
    lo, hi = math.log10(min(values)), math.log10(max(values))
    lo, hi = math.floor(lo * 2) / 2, math.ceil(hi * 2) / 2

    def sx(i: float) -> float:
        return pad + i / max(1, n - 1) * (width - 2 * pad)

    def sy(v: float) -> float:
        return height - pad - (math.log10(v) - lo) / max(hi - lo, 1e-9) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="loss curve">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 14}" text-anchor="middle" font-size="13">optimiser step</text>',
             f'<text x="14" y="{height / 2}" text-anchor="middle" font-size="13" transform="rotate(-90 14 {height / 2})">'
             "loss (50-step mean)</text>"]
    for k in range(int(lo * 2), int(hi * 2) + 1):
        v = 10 ** (k / 2)
        parts.append(f'<text x="{pad - 6}" y="{sy(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.3g}</text>')
    for tick in range(0, n, max(1, int(round(n / 5, -2)) or 1)):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height - pad + 16}" text-anchor="middle" font-size="11">{tick}</text>')
    stage_starts = [i for i in range(n) if i == 0 or log[i]["stage"] != log[i - 1]["stage"]]
    for i in stage_starts:
        parts.append(f'<line x1="{sx(i):.1f}" y1="{pad}" x2="{sx(i):.1f}" y2="{height - pad}" stroke="#bbb" stroke-dasharray="4"/>')
        parts.append(f'<text x="{sx(i) + 4:.1f}" y="{pad - 6}" font-size="11">{log[i]["stage"]}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(values))
    parts.append(f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["DEFAULT_QK_GAIN", "DEFAULT_QK_GAIN_RAMP", "DEFAULT_STAGES", "Stage", "gain_at", "loss_curve_svg", "qk_gain_parameters", "smoothed", "train_demo"]
