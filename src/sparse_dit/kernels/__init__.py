"""Execute an `AttentionPlan`. Kernels know nothing of methods: they read the plan and compute.

Backends:
- "triton": the block-sparse Triton kernels on CUDA (`kernels.triton`): any plan, fp16/bf16, head dim 64
  or 128, no model mask, forward only.
- "gather": the CPU fast path: each query block's kept key blocks gathered and run through the CPU flash
  SDPA kernel, query blocks grouped by their key count (`kernels.gather`). Fixed blocks, no model mask, no
  LSE, no gradient; no compilation.
- "flex": compiled FlexAttention over a BlockMask of the plan's kept blocks (runs on CPU and CUDA; slower
  than "gather" on CPU, see docs/benchmarks.md). Fixed blocks, no model mask; on CPU no LSE, no gradient.
- "reference": dense attention under the plan's expanded token mask; exact, O(S^2) memory, any plan.
- "auto": on CUDA "triton" where it applies, else "flex"; on CPU "gather" where it applies; below
  AUTO_MIN_SEQ tokens, and for what no fast path runs (variable blocks on CPU, model masks, LSE), "reference".
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, ShapeError
from ..plan import AttentionPlan
from . import flex, gather
from .reference import reference_attention

BACKENDS = ("auto", "triton", "gather", "flex", "reference")
AUTO_MIN_SEQ = 512  # below it the reference is as fast and exact


def _triton_supports(plan: AttentionPlan, q: torch.Tensor, attn_mask: torch.Tensor | None, return_lse: bool) -> bool:
    """Whether the Triton backend can run the call; it is imported on first use (that builds its kernels)."""
    try:
        from .triton import supports
    except ImportError:  # triton is not installed
        return False
    return supports(plan, q, attn_mask, return_lse)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"q, k, v must be (B, S, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, s, h, d = q.shape
    if k.shape[:2] != (b, s) or v.shape[:2] != (b, s) or k.shape[-1] != d:
        raise ShapeError(
            f"sparse attention is self-attention: k and v must be (B={b}, S={s}, H, D={d}); got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[2] != h:  # grouped-query attention: share each key head across its query heads
        if h % k.shape[2] or v.shape[2] != k.shape[2]:
            raise ShapeError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[2]}, {v.shape[2]})")
        k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k, v))
    if plan.seq_len != s:
        raise ShapeError(f"plan covers S={plan.seq_len} tokens but the inputs have S={s}; plan for this sequence")
    pb, ph = plan.layout.shape[:2]
    if pb not in (1, b) or ph not in (1, h):
        raise ShapeError(f"plan is for (B, H)=({pb}, {ph}), which does not broadcast to the inputs' ({b}, {h})")
    return k, v


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    backend: str = "auto",
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Compute attention as `plan` prescribes.

    Args:
        q, k, v: (B, S, H, D) in fp32, fp16 or bf16; k and v may have fewer heads (grouped-query attention).
        plan: the plan, its tensors broadcastable to (B, H).
        backend: "auto", "triton", "gather", "flex" or "reference" (see the module docstring).
        scale: softmax scale, default D ** -0.5.
        attn_mask: optional model mask (bool, True = attend, or additive), broadcastable to (B, H, S, S).
        return_lse: also return the log-sum-exp of the scaled scores, float32 (B, H, S).
    Returns:
        (B, S, H, D) in q's dtype, or (out, lse).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    k, v = _check_inputs(q, k, v, plan)
    if backend == "auto" and q.is_cuda and _triton_supports(plan, q, attn_mask, return_lse):
        backend = "triton"
    if backend == "auto":
        name, fast = ("flex", flex) if q.is_cuda else ("gather", gather)
        fits = fast.supports(plan, q, attn_mask, return_lse) and plan.seq_len >= AUTO_MIN_SEQ
        backend = name if fits else "reference"
    if backend == "gather":
        if not gather.supports(plan, q, attn_mask, return_lse):
            raise ConfigError(
                "backend 'gather' runs fixed-block plans without a model attention mask, LSE or gradient; use "
                "backend 'auto' or 'reference' for this call"
            )
        return gather.gather_attention(q, k, v, plan, scale=scale)
    if backend == "triton":
        if not _triton_supports(plan, q, attn_mask, return_lse):
            raise ConfigError(
                "backend 'triton' needs triton installed and CUDA fp16/bf16 tensors with head dim 64 or 128, no model "
                "attention mask and no gradient; use backend 'auto' for this call"
            )
        from .triton import triton_attention

        return triton_attention(q, k, v, plan, scale=scale, return_lse=return_lse)
    if backend == "flex":
        if not flex.supports(plan, q, attn_mask, return_lse):
            raise ConfigError(
                "backend 'flex' runs fixed-block plans without a model attention mask (on CPU: no gradient, no "
                "LSE); use backend 'auto' or 'reference' for this call"
            )
        return flex.flex_attention(q, k, v, plan, scale=scale, return_lse=return_lse)
    return reference_attention(q, k, v, plan, scale=scale, attn_mask=attn_mask, return_lse=return_lse)
