"""The low-bit Q·K spec every backend follows: per-block absmax scales and a symmetric integer grid.

For a plan with quant "int8" or "int4", Q and K (in the plan's token order) are rounded block by block:
one scale per (batch row, head, block) equal to the block's largest |x| over its tokens and channels divided
by the mode's number of levels, values round(x / scale) clamped to [-levels, levels]. int4 keeps int8 storage
(the tensor-core path is the same) with 7 levels. P·V stays in the input dtype.

The reference and FlexAttention compute with the dequantised values (`fake_quant`); the Triton kernel takes
the integers and scales (`quantize_blocks`) and dequantises its int32 Q·K products by scale_q * scale_k, so
every backend rounds the same numbers the same way.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..plan import AttentionPlan

QUANT_LEVELS = {"int8": 127.0, "int4": 7.0}
# A block of zeros still gets a positive scale, so x / scale is 0, not nan.
MIN_AMAX = 1e-12


def _round_blocks(x: torch.Tensor, plan: AttentionPlan, axis: Literal["q", "k"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integer grid values (float32, (B, H, S, D)), the scales (float32, (B, H, n)) and each token's block."""
    levels = QUANT_LEVELS[plan.quant]
    b, h, s, _ = x.shape
    x = x.float()
    idx = plan.token_block_index(axis).to(x.device).expand(b, h, s)
    nblocks = plan.num_blocks[0 if axis == "q" else 1]
    amax = torch.zeros(b, h, nblocks, dtype=torch.float32, device=x.device)
    amax = amax.scatter_reduce(2, idx, x.abs().amax(dim=-1), reduce="amax", include_self=True)
    scale = amax.clamp_min(MIN_AMAX) / levels
    values = torch.round(x / scale.gather(2, idx)[..., None]).clamp(-levels, levels)
    return values, scale, idx


def quantize_blocks(x: torch.Tensor, plan: AttentionPlan, axis: Literal["q", "k"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x per block along `axis` ("q" or "k") to the plan's integer grid.

    Args:
        x: (B, H, S, D) in the plan's token order, any float dtype.
        plan: a plan with quant "int8" or "int4".
    Returns:
        int8 (B, H, S, D) contiguous values and float32 (B, H, nblocks) contiguous scales; x is about
        values * scales[block of the token].
    """
    values, scale, _ = _round_blocks(x, plan, axis)
    return values.to(torch.int8).contiguous(), scale.contiguous()


def fake_quant(x: torch.Tensor, plan: AttentionPlan, axis: Literal["q", "k"]) -> torch.Tensor:
    """x (B, H, S, D) rounded to the plan's integer grid and scaled back: float32 (B, H, S, D).

    Computed in float32 whatever x's dtype, so that every backend rounds exactly the numbers the reference does.
    """
    values, scale, idx = _round_blocks(x, plan, axis)
    return values * scale.gather(2, idx)[..., None]


__all__ = ["QUANT_LEVELS", "fake_quant", "quantize_blocks"]
