"""What every backend does around its kernel: the plan's token order, skipped heads."""

from __future__ import annotations

import torch

from ..plan import HEAD_SKIP, AttentionPlan


def _cached(plan: AttentionPlan, name: str, device: torch.device, make) -> torch.Tensor:
    key = (name, str(device))
    if key not in plan.cache:
        plan.cache[key] = make()
    return plan.cache[key]


def _order(plan: AttentionPlan, device: torch.device) -> torch.Tensor:
    return _cached(plan, "order", device, lambda: plan.order.to(device))


def _inverse(plan: AttentionPlan, device: torch.device) -> torch.Tensor:
    return _cached(plan, "inverse_order", device, lambda: torch.argsort(_order(plan, device), dim=-1))


def _reorder(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) with its tokens taken in `index` order, index long (B', H', S)."""
    if index.shape[0] == index.shape[1] == 1:
        # One order for every row and head (gna's tiles): a plain row selection, 5-10x cheaper on the CPU than
        # a gather whose index is expanded over (B, H, D).
        return x.index_select(2, index.view(-1))
    b, h, s, d = x.shape
    # One index per tensor's own D: gather reads only index.shape columns, so q's D on a wider v would drop columns.
    return x.gather(2, index.expand(b, h, s)[..., None].expand(b, h, s, d))


def permute(plan: AttentionPlan, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Put (B, H, S, D) tensors in the plan's token order (a no-op without one). Their D may differ (v's head dim)."""
    if plan.order is None:
        return list(tensors)
    order = _order(plan, tensors[0].device)
    return [_reorder(x, order) for x in tensors]


def finish(plan: AttentionPlan, out: torch.Tensor, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero skipped heads and restore the original token order. out: (B, H, S, D), lse: (B, H, S) or None."""
    b, h, s, d = out.shape
    if plan.head_mode is not None:
        skip = (plan.head_mode.to(out.device) == HEAD_SKIP).expand(b, h)
        out = out.masked_fill(skip[..., None, None], 0.0)
        lse = None if lse is None else lse.masked_fill(skip[..., None], float("-inf"))
    if plan.order is not None:
        inverse = _inverse(plan, out.device)
        out = _reorder(out, inverse)
        lse = None if lse is None else _reorder(lse[..., None], inverse)[..., 0]
    return out, lse
