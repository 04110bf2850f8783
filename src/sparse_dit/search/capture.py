"""Capture the attention probabilities of sampled query rows while a pipeline runs dense.

Full attention matrices do not fit in memory at video sizes (4096 tokens x 4 heads x 4 layers x 40 calls
is 10 GB in fp32), so each call keeps `rows` random video query rows: enough to estimate per-head
statistics such as the mass inside a local window, and to draw attention maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SparseDiTError
from ..patterns import resolve_config
from ..plan import PlanContext
from ..plugin import disable_sparse_attention, enable_sparse_attention
from ..plugin.api import runtime_of


@dataclass
class AttentionSample:
    """Attention of sampled query rows in one self-attention call.

    ctx: the call's grid, text span, step and layer. rows: long (R,), sequence positions of the sampled
    video queries (sorted). probs: float32 (B, H, R, S), each row's softmax over all S keys.
    """

    ctx: PlanContext
    rows: torch.Tensor
    probs: torch.Tensor

    @property
    def layer(self) -> int:
        return self.ctx.layer

    @property
    def step(self) -> int | None:
        return self.ctx.step


Observer = Callable[[Any, PlanContext, torch.Tensor, torch.Tensor, "float | None"], None]


def run_observed(pipe: Any, observe: Observer, **call: Any) -> Any:
    """Run `pipe(**call)` with its own dense attention, calling observe(site, ctx, q, k, scale) before every
    self-attention call with the real q, k (B, S, H, D) after the model's norms and RoPE. Returns the output."""
    enable_sparse_attention(pipe, resolve_config("dense", dense_steps=1.0))
    runtime_of(pipe).observers.append(observe)
    try:
        with torch.inference_mode():
            return pipe(**call)
    finally:
        disable_sparse_attention(pipe)


def capture_attention(
    pipe: Any, *, steps: Iterable[int] | None = None, rows: int = 64, seed: int = 0, **call: Any
) -> list[AttentionSample]:
    """Run `pipe(**call)` with its own dense attention and return samples of every self-attention call.

    Args:
        pipe: a diffusers pipeline that `enable_sparse_attention` supports.
        steps: denoising steps to sample (all when None); the others run untouched.
        rows: query rows sampled per call, the same for every head and batch element.
        seed: seeds the row choice.
        call: the pipeline call's arguments.
    """
    gen = torch.Generator().manual_seed(seed)
    wanted = None if steps is None else set(steps)
    samples: list[AttentionSample] = []

    def observe(site, ctx: PlanContext, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
        if wanted is not None and ctx.step not in wanted:
            return
        pick = ctx.video_start + torch.randperm(ctx.num_video_tokens, generator=gen)[:rows].sort().values
        if k.shape[2] != q.shape[2]:  # grouped-query attention: each key head serves several query heads
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        logits = torch.einsum("brhd,bshd->bhrs", q[:, pick.to(q.device)].float(), k.float())
        probs = (logits * (scale if scale is not None else q.shape[-1] ** -0.5)).softmax(dim=-1)
        samples.append(AttentionSample(ctx, pick, probs.cpu()))

    run_observed(pipe, observe, **call)
    if not samples:
        raise SparseDiTError(f"no self-attention call ran at steps {sorted(wanted or [])}; pass steps below num_inference_steps")
    return samples
