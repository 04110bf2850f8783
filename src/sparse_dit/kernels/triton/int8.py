"""Per-block integer quantization of Q and K for the int8 Q·K variant of the block-sparse kernel.

The scales follow the torch reference (`reference.fake_quant`) exactly: one scale per (batch row, head,
block) equal to amax / levels, values round(x / scale) clamped to [-levels, levels]. int4 uses the same
int8 storage and tensor-core path with 7 levels, so both modes share one kernel.
"""

from __future__ import annotations

import torch

from ...plan import AttentionPlan
from ..reference import _QUANT_LEVELS


def quantize_blocks(x: torch.Tensor, plan: AttentionPlan, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x per block along `axis` ("q" or "k").

    Args:
        x: (B, H, S, D) in the plan's token order, any float dtype.
    Returns:
        int8 (B, H, S, D) contiguous values and float32 (B, H, nblocks) contiguous scales.
    """
    levels = _QUANT_LEVELS[plan.quant]
    b, h, s, _ = x.shape
    x = x.float()
    idx = plan.token_block_index(axis).to(x.device).expand(b, h, s)
    nblocks = plan.num_blocks[0 if axis == "q" else 1]
    amax = torch.zeros(b, h, nblocks, dtype=torch.float32, device=x.device)
    amax = amax.scatter_reduce(2, idx, x.abs().amax(dim=-1), reduce="amax", include_self=True)
    scale = amax.clamp_min(1e-12) / levels
    values = torch.round(x / scale.gather(2, idx)[..., None]).clamp(-levels, levels)
    return values.to(torch.int8).contiguous(), scale.contiguous()
