"""The CPU fast path: gather each query block's kept key blocks and run the CPU flash SDPA kernel on them.

Query blocks are grouped by how many key blocks they keep, so every batch of query blocks handed to SDPA
has the same key length and needs no padding mask; batches are small (`CHUNK` query blocks) so the gathered
keys and values stay in cache. On 2 CPU cores this is 1.4-2x faster than compiled FlexAttention over the same
plan (docs/benchmarks.md) and needs no compilation. The grouping is built once per plan and kept in
`plan.cache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import HEAD_DENSE, AttentionPlan
from .layout import finish, fixed_blocks_without_mask, permute, wants_lse_or_grad

CHUNK = 16  # query blocks per SDPA call: the gathered K and V of a chunk fit in L2/L3


@dataclass(frozen=True)
class _Group:
    rows: torch.Tensor  # long (R,): flat query-block rows (b * H + h) * n + i
    cols: torch.Tensor  # long (R, kept): flat key-block rows of the same (b, h)
    valid: torch.Tensor | None  # bool (R, 1, 1, kept * block): False at padding keys past S; None if no padding


def supports(plan: AttentionPlan, q: torch.Tensor, attn_mask: torch.Tensor | None, return_lse: bool) -> bool:
    """Fixed blocks, no model mask, no LSE, no gradient."""
    return fixed_blocks_without_mask(plan, attn_mask) and not wants_lse_or_grad(q, return_lse)


def groups(plan: AttentionPlan, batch: int, heads: int, device: torch.device) -> list[_Group]:
    """Query-block rows grouped by how many key blocks they keep, with those blocks; cached on the plan."""
    key = ("gather_groups", batch, heads, str(device))
    if key in plan.cache:
        return plan.cache[key]
    bs, s = plan.block_size, plan.seq_len
    n = plan.num_blocks[0]
    layout = plan.layout.to(device).expand(batch, heads, n, n)
    if plan.head_mode is not None:
        layout = layout | (plan.head_mode.to(device) == HEAD_DENSE).expand(batch, heads)[..., None, None]
    layout = layout.reshape(-1, n)  # (B*H*n, n)
    counts = layout.sum(dim=-1)
    # Kept blocks first, ascending, then as flat rows of the (b, h) slice each query block belongs to.
    order = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True)
    base = (torch.arange(layout.shape[0], device=device) // n * n)[:, None]
    found = []
    for kept in counts.unique().tolist():
        rows = (counts == kept).nonzero().flatten()
        cols = order[rows, :kept] + base[rows]
        valid = None
        if s % bs:  # the last key block is short: mask its padding keys where it is kept
            key_pos = (cols % n)[..., None] * bs + torch.arange(bs, device=device)
            valid = (key_pos < s).reshape(len(rows), 1, 1, kept * bs)
            if bool(valid.all()):
                valid = None
        found.append(_Group(rows, cols, valid))
    plan.cache[key] = found
    return found


def attend_blocks(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, groups: list[_Group], scale: float | None) -> torch.Tensor:
    """The kernel proper. qb, kb, vb: (B*H*n, block, D) block rows; returns the output block rows."""
    out = torch.empty_like(qb)
    bs, d = qb.shape[1:]
    for group in groups:
        kept = group.cols.shape[1]
        for start in range(0, len(group.rows), CHUNK):
            rows = group.rows[start : start + CHUNK]
            cols = group.cols[start : start + CHUNK].flatten()
            kg = kb.index_select(0, cols).view(len(rows), 1, kept * bs, d)
            vg = vb.index_select(0, cols).view(len(rows), 1, kept * bs, d)
            mask = None if group.valid is None else group.valid[start : start + CHUNK]
            out[rows] = F.scaled_dot_product_attention(qb[rows][:, None], kg, vg, attn_mask=mask, scale=scale)[:, 0]
    return out


def block_rows(plan: AttentionPlan, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """(B, S, H, D) tensors in the plan's order, padded to whole blocks, as (B*H*n, block, D) block rows."""
    b, s, h, d = tensors[0].shape
    n = plan.num_blocks[0]
    permuted = permute(plan, *(x.transpose(1, 2) for x in tensors))
    return [F.pad(x, (0, 0, 0, n * plan.block_size - s)).reshape(b * h * n, plan.block_size, d) for x in permuted]


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float | None) -> torch.Tensor:
    """Sparse attention by gathered SDPA. q, k, v: (B, S, H, D); returns (B, S, H, D)."""
    b, s, h, d = q.shape
    qb, kb, vb = block_rows(plan, q, k, v)
    out = attend_blocks(qb, kb, vb, groups(plan, b, h, q.device), scale)
    out, _ = finish(plan, out.view(b, h, -1, d)[:, :, :s], None)
    return out.transpose(1, 2)
