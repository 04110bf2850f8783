"""What every backend does around its kernel: the plan's token order, skipped heads."""

from __future__ import annotations

import torch

from ..plan import HEAD_SKIP, AttentionPlan


def permute(plan: AttentionPlan, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Put (B, H, S, D) tensors in the plan's token order (a no-op without one). Their D may differ (v's head dim)."""
    if plan.order is None:
        return list(tensors)
    b, h, s, _ = tensors[0].shape
    perm = plan.order.to(tensors[0].device).expand(b, h, s)[..., None]
    # One index per tensor's own D: gather reads only index.shape columns, so q's D on a wider v would drop columns.
    return [x.gather(2, perm.expand(b, h, s, x.shape[-1])) for x in tensors]


def finish(plan: AttentionPlan, out: torch.Tensor, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero skipped heads and restore the original token order. out: (B, H, S, D), lse: (B, H, S) or None."""
    b, h, s, d = out.shape
    if plan.head_mode is not None:
        skip = (plan.head_mode.to(out.device) == HEAD_SKIP).expand(b, h)
        out = out.masked_fill(skip[..., None, None], 0.0)
        lse = None if lse is None else lse.masked_fill(skip[..., None], float("-inf"))
    if plan.order is not None:
        inverse = torch.argsort(plan.order.to(out.device).expand(b, h, s), dim=-1)
        out = out.gather(2, inverse[..., None].expand(b, h, s, d))
        lse = None if lse is None else lse.gather(2, inverse)
    return out, lse
