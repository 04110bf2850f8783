"""The torch reference: dense attention under the plan's expanded token mask. Exact, O(S^2) memory; for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plan import HEAD_DENSE, AttentionPlan
from .layout import finish, permute
from .quant import fake_quant


def token_mask(plan: AttentionPlan, batch: int, heads: int) -> torch.Tensor:
    """The plan's block layout expanded to tokens, in the plan's (permuted) orders: bool (B, H, S, S), rows in
    the query order, columns in the key order."""
    s = plan.seq_len
    nq, nk = plan.num_blocks
    layout = plan.layout.expand(batch, heads, nq, nk)
    q_idx = plan.token_block_index("q").expand(batch, heads, s)
    k_idx = plan.token_block_index("k").expand(batch, heads, s)
    rows = layout.gather(2, q_idx[..., None].expand(batch, heads, s, nk))
    mask = rows.gather(3, k_idx[:, :, None, :].expand(batch, heads, s, s))
    if plan.head_mode is not None:
        dense = (plan.head_mode == HEAD_DENSE).expand(batch, heads)
        mask = mask | dense[..., None, None]
    return mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention by masking dense attention.

    Args:
        q, k, v: (B, S, H, D), already checked against the plan by `kernels.run`.
        attn_mask: optional mask from the model (bool, True = attend, or additive float), broadcastable to
            (B, H, S, S), in the original token order.
    Returns:
        out (B, S, H, D) in q's dtype, and with `return_lse` the log-sum-exp of the scaled scores, float32 (B, H, S).
        A query that attends no key gets output 0 and LSE -inf.
    """
    b, s, h, d = q.shape
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    mask = token_mask(plan, b, h)
    qh, kh, vh = permute(plan, qh, kh, vh)
    if attn_mask is not None:
        user_mask = attn_mask.expand(b, h, s, s)
        # The model's mask is in the original order: rows follow the queries' order, columns the keys'.
        if plan.order is not None:
            rows = plan.order.to(q.device).expand(b, h, s)
            user_mask = user_mask.gather(2, rows[..., None].expand(b, h, s, s))
        if plan.key_order is not None:
            cols = plan.key_order.to(q.device).expand(b, h, s)
            user_mask = user_mask.gather(3, cols[:, :, None, :].expand(b, h, s, s))
        mask = mask & user_mask if user_mask.dtype == torch.bool else user_mask.masked_fill(~mask, float("-inf"))

    if plan.quant == "none" and not return_lse:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        lse = None
    else:
        if plan.quant != "none":
            qh, kh = fake_quant(qh, plan, "q"), fake_quant(kh, plan, "k")
        scores = (qh.float() @ kh.float().transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
        scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        # A query that attends nothing has lse -inf: subtract 0 there (exp(-inf - -inf) would be NaN), so its
        # output is 0, as SDPA gives it without the LSE.
        shift = lse.masked_fill(torch.isneginf(lse), 0.0)
        out = (torch.exp(scores - shift[..., None]) @ vh.float()).to(q.dtype)

    out, lse = finish(plan, out, lse)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
