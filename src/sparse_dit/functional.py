"""The functional core: sparse attention on plain tensors, for models outside diffusers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import kernels
from .attention import SparseAttention
from .errors import ShapeError
from .patterns import resolve_config
from .patterns.base import PlanContext, TextPosition


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "window",
    grid: tuple[int, int, int] | None = None,
    text_len: int = 0,
    text_position: TextPosition = "prefix",
    *,
    layer: int | None = None,
    step: int | None = None,
    num_steps: int | None = None,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    **config: Any,
) -> torch.Tensor:
    """Plan and run sparse self-attention over a video (or image) token sequence.

    Args:
        q, k, v: (B, S, H, D), S = F * H * W + text_len, video tokens in f-major order.
        method: a registered method name (`sparse_dit.list_methods()`).
        grid: (F, H, W) token grid; default (1, 1, S - text_len), a plain 1-D sequence.
        text_len: number of text tokens joined to the video tokens; they are always attended in full.
        text_position: "prefix" ([text | video]) or "suffix" ([video | text]).
        layer, step, num_steps: where the call sits, for the policy knobs (`dense_layers`, `dense_steps`);
            policies that need them are skipped when they are None.
        scale: softmax scale, default D ** -0.5.
        attn_mask: optional model mask (bool, True = attend, or additive), broadcastable to (B, H, S, S).
        **config: the method's options, e.g. `window=(3, 7, 7), block_size=64`.
    Returns:
        (B, S, H, D), like `F.scaled_dot_product_attention` on (B, S, H, D) inputs.

    Example:
        >>> out = sparse_attention(q, k, v, method="window", grid=(8, 16, 16), window=(3, 7, 7), min_seq_len=0)
    """
    if q.dim() != 4:
        raise ShapeError(f"q must be (B, S, H, D), got {tuple(q.shape)}")
    b, s, h, _ = q.shape
    if grid is None:
        grid = (1, 1, s - text_len)
    ctx = PlanContext(
        grid=tuple(int(n) for n in grid),
        text_len=text_len,
        text_position=text_position if text_len else "none",
        batch=b,
        heads=h,
        layer=layer,
        step=step,
        num_steps=num_steps,
        device=q.device,
    )
    if ctx.seq_len != s:
        raise ShapeError(f"grid {ctx.grid} ({ctx.num_video_tokens} tokens) + text_len {text_len} = {ctx.seq_len}, but S = {s}")
    engine = SparseAttention(resolve_config(method, **config))
    if engine.dense_reason(ctx) is not None:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale,
            enable_gqa=k.shape[2] != h,
        )
        return out.transpose(1, 2)
    plan = engine.plan(q, k, ctx)
    return kernels.run(q, k, v, plan, backend=engine.config.backend, scale=scale, attn_mask=attn_mask)
