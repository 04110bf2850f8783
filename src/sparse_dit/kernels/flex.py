"""Compiled FlexAttention over a BlockMask built from the plan (CPU and CUDA; on CPU `gather` is faster).

Every kept block is passed as a *full* block, so no mask function runs inside the kernel; inductor's C++
FlexAttention template then really skips the dropped blocks. The BlockMask is built once per plan and kept
in `plan.cache`; the compiled kernel is shared and recompiles only for a new shape.
"""

from __future__ import annotations

import torch

from ..plan import HEAD_DENSE, AttentionPlan
from .layout import finish, permute
from .quant import fake_quant

_compiled = None


def compiled_flex_attention():
    """The process-wide compiled `flex_attention` (compiled on first use)."""
    global _compiled
    if _compiled is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # Past the recompile limit dynamo silently runs eager flex, which materialises S x S scores
        # (15x slower than dense); every (S, block, heads) shape is its own compile, so raise it.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 256)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def block_mask(plan: AttentionPlan, device: torch.device):
    """The plan's FlexAttention BlockMask (every kept block full), cached on the plan."""
    key = ("flex_block_mask", str(device))
    if key in plan.cache:
        return plan.cache[key]
    from torch.nn.attention.flex_attention import BlockMask

    layout = plan.layout.to(device)
    if plan.head_mode is not None:
        dense = (plan.head_mode.to(device) == HEAD_DENSE)[..., None, None]
        layout = layout | dense
    counts = layout.sum(dim=-1, dtype=torch.int32)
    # Kept key blocks first, in ascending order, so each query block walks K and V forward.
    indices = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    mask = BlockMask.from_kv_blocks(
        torch.zeros_like(counts),
        indices.clone(),  # the same tensor as both index sets trips an inductor C++ codegen bug in torch 2.13
        counts,
        indices,
        BLOCK_SIZE=plan.block_size,
        seq_lengths=(plan.seq_len, plan.seq_len),
    )
    plan.cache[key] = mask
    return mask


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float | None, return_lse: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention with compiled FlexAttention. q, k, v: (B, S, H, D); returns (B, S, H, D) [, lse (B, H, S)]."""
    qh, kh, vh = permute(plan, *(x.transpose(1, 2) for x in (q, k, v)))
    if plan.quant != "none":  # rounded in float32 as the reference rounds, then back to the input dtype
        qh, kh = fake_quant(qh, plan, "q").to(qh.dtype), fake_quant(kh, plan, "k").to(kh.dtype)
    result = compiled_flex_attention()(
        qh.contiguous(), kh.contiguous(), vh.contiguous(), block_mask=block_mask(plan, q.device), scale=scale,
        return_lse=return_lse,
    )
    out, lse = finish(plan, *(result if return_lse else (result, None)))
    out = out.transpose(1, 2)
    return (out, lse.float()) if return_lse else out
