"""The functional core: sparse attention on plain tensors, for models outside diffusers."""

from __future__ import annotations

from typing import Any

import torch

from .attention import SparseAttention
from .plan import TextPosition


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

    Each call builds its planner afresh. To reuse plans and a dynamic method's state across the layers and
    steps of a generation, keep a `sparse_dit.SparseAttention(method, **config)` and call it instead.

    Example:
        >>> out = sparse_attention(q, k, v, method="window", grid=(8, 16, 16), window=(3, 7, 7), min_seq_len=0)
    """
    attention = SparseAttention(method, **config)
    return attention(q, k, v, grid=grid, text_len=text_len, text_position=text_position, layer=layer, step=step,
                     num_steps=num_steps, scale=scale, attn_mask=attn_mask)
