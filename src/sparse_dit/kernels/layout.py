"""What every backend does around its kernel: the plan's token orders, skipped heads.

Every backend permutes through `permute(plan, q, k, v)` and restores through `finish`, so a plan field read
here (`order`, `k_order`) is honoured by all of them alike.
"""

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


def _key_order(plan: AttentionPlan, device: torch.device) -> torch.Tensor:
    if plan.k_order is None:
        return _order(plan, device)
    return _cached(plan, "k_order", device, lambda: plan.k_order.to(device))


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


def permute(plan: AttentionPlan, q: torch.Tensor, *kv: torch.Tensor) -> list[torch.Tensor]:
    """Put (B, H, S, D) queries in the plan's query order and keys and values in its key order (`k_order`, else
    `order`); a no-op without them. Their D may differ (v's head dim). Returns [q, *kv]."""
    device = q.device
    q = q if plan.order is None else _reorder(q, _order(plan, device))
    if plan.key_order is None:
        return [q, *kv]
    key_order = _key_order(plan, device)
    return [q, *(_reorder(x, key_order) for x in kv)]


def finish(plan: AttentionPlan, out: torch.Tensor, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero skipped heads and restore the original token order (the output's rows are queries: `order`).
    out: (B, H, S, D), lse: (B, H, S) or None."""
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
