"""Execute an `AttentionPlan`. Kernels know nothing of methods: they read the plan and compute.

Backends (what each honours exactly is `capabilities.TABLE`):
- "triton": the block-sparse Triton kernels on CUDA (`kernels.triton`): any plan, fp16/bf16, head dim 64
  or 128, no model mask, forward only.
- "gather": the CPU fast path: each query block's kept key blocks gathered and run through the CPU flash
  SDPA kernel, query blocks grouped by their key count (`kernels.gather`); variable-block plans one SDPA call
  per query cluster over its kept key clusters' tokens (`kernels.varblock`). The LSE on request, from the same
  kernel calls (ring attention's shards). A gradient for fixed-block plans without the LSE (the same gather
  through autograd). No low-bit Q·K, no model mask, one head dim for q, k and v; no compilation.
- "flex": compiled FlexAttention over a BlockMask of the plan's kept blocks (runs on CPU and CUDA; slower
  than "gather" on CPU, see docs/benchmarks.md). Fixed blocks, no model mask; on CPU no LSE, no gradient.
- "reference": dense attention under the plan's expanded token mask; exact, O(S^2) memory, any plan.
- "auto": on CUDA "triton" where it honours the call, else "flex"; on CPU "gather" where it does; below
  AUTO_MIN_SEQ tokens, and for what no fast path honours (low-bit Q·K on CPU, model masks, a gradient through
  variable blocks or the LSE on CPU), "reference" (`capabilities.select_backend`).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError
from ..plan import AttentionPlan
from . import flex, gather, varblock
from .capabilities import AUTO_MIN_SEQ, BACKENDS, Capabilities, backend_capabilities, select_backend
from .inputs import check_inputs
from .reference import reference_attention

__all__ = ["AUTO_MIN_SEQ", "BACKENDS", "Capabilities", "backend_capabilities", "check_inputs", "run", "select_backend"]


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, S, Hkv, D|Dv) checked against q (B, S, H, D) and the plan, repeated to H heads for grouped-query attention."""
    check_inputs(q, k, v)
    b, s, h, _ = q.shape
    if plan.seq_len != s:
        raise ShapeError(f"plan covers S={plan.seq_len} tokens but the inputs have S={s}; plan for this sequence")
    pb, ph = plan.layout.shape[:2]
    if pb not in (1, b) or ph not in (1, h):
        raise ShapeError(f"plan is for (B, H)=({pb}, {ph}), which does not broadcast to the inputs' ({b}, {h})")
    if k.shape[2] != h:  # share each key head across its query heads
        k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k, v))
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
        q, k, v: (B, S, H, D) in fp32, fp16 or bf16; k and v may have fewer heads (grouped-query attention), v
            another head dim Dv where the backend takes one (`check_inputs` says what else they must be).
        plan: the plan, its tensors broadcastable to (B, H).
        backend: "auto", "triton", "gather", "flex" or "reference" (see the module docstring); a backend that
            cannot honour a field of the plan or an option of the call raises `ConfigError`.
        scale: softmax scale, default D ** -0.5.
        attn_mask: optional model mask (bool, True = attend, or additive), broadcastable to (B, H, S, S).
        return_lse: also return the log-sum-exp of the scaled scores, float32 (B, H, S).
    Returns:
        (B, S, H, Dv) in q's dtype, or (out, lse).
    """
    k, v = _expand_kv(q, k, v, plan)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    backend = select_backend(plan, q, attn_mask, return_lse, backend, grad=grad, v_head_dim=v.shape[-1])
    if backend == "gather":
        if grad:
            return gather.gather_attention_autograd(q, k, v, plan, scale=scale)
        if plan.q_bounds is not None or plan.k_bounds is not None:
            return varblock.varblock_attention(q, k, v, plan, scale=scale, return_lse=return_lse)
        return gather.gather_attention(q, k, v, plan, scale=scale, return_lse=return_lse)
    if backend == "triton":
        from .triton import triton_attention

        return triton_attention(q, k, v, plan, scale=scale, return_lse=return_lse)
    if backend == "flex":
        return flex.flex_attention(q, k, v, plan, scale=scale, return_lse=return_lse)
    return reference_attention(q, k, v, plan, scale=scale, attn_mask=attn_mask, return_lse=return_lse)
