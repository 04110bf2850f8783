"""Sparse attention that returns its log-sum-exp, over the whole sequence or one shard of it.

Ring context parallelism splits the keys over processes: each process computes its queries against one key
shard at a time and merges the partial outputs by their log-sum-exp (LSE), as FlashDecoding merges key splits.
Under a sparse plan a shard holds some of the plan's key blocks, cut at the shard's edges. `shard_attention`
restricts a plan to one (query range, key range) pair of the global sequence by the ranges' global offsets,
returns None without computing anything when no kept block meets both ranges, and otherwise the partial output
with its LSE; `merge` combines the partials of every shard into the exact sparse attention.

A shard becomes a plan of its own over variable blocks (`shard_plan`: each global block cut to the shard's
tokens, in the plan's orders; its keys padded to the queries' length in a block that is never kept), run by
`kernels.run(..., return_lse=True)`: the Triton kernels on CUDA; on the CPU the variable-block gather path
(`kernels.varblock`, backend "gather", or "auto" on long sequences), else the reference. The kernels here are
the backends' own: this module only cuts plans and merges (`gather.merge_lse`).
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import ConfigError
from ..plan import HEAD_DENSE, HEAD_SKIP, AttentionPlan
from . import gather


def _fold_head_modes(plan: AttentionPlan) -> torch.Tensor:
    """The plan's layout with dense heads keeping every block and skipped heads none: bool (B', H', nq, nk)."""
    layout = plan.layout
    if plan.head_mode is None:
        return layout
    mode = plan.head_mode.to(layout.device)[..., None, None]
    return (layout | (mode == HEAD_DENSE)) & (mode != HEAD_SKIP)


def _key_order(plan: AttentionPlan) -> torch.Tensor | None:
    # Plans whose keys are permuted apart from the queries (SVG2) carry `k_order`; others permute both by `order`.
    k_order = getattr(plan, "k_order", None)
    return plan.order if k_order is None else k_order


def gather_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU gather path with its LSE, for a fixed-block plan (any order, head modes; no low-bit Q·K).

    Args:
        q, k, v: (B, S, H, D) with as many heads in k and v as in q.
    Returns:
        out (B, S, H, D) in q's dtype and lse float32 (B, H, S), as `kernels.run(..., return_lse=True)`.
    """
    if plan.q_bounds is not None or plan.k_bounds is not None or plan.quant != "none":
        raise ConfigError("gather_attention_lse takes fixed-block plans with plan.quant='none'; use kernels.run")
    return gather.gather_attention(q, k, v, plan, scale=scale, return_lse=True)


def _axis_blocks(plan: AttentionPlan, axis: str, start: int, length: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Where the tokens start..start+length-1 (original order) fall among the plan's blocks along `axis`.

    Returns:
        perm: long (B', H', length), the range's tokens in the plan's order along the axis (None: already so);
        counts: long (B', H', n), how many of the range's tokens each block holds.
    """
    n = plan.num_blocks[0 if axis == "q" else 1]
    order = plan.order if axis == "q" else _key_order(plan)
    blocks = plan.token_block_index(axis)
    device = plan.layout.device
    if order is None:
        perm = None
        blk = blocks[..., start : start + length]
    else:
        inverse = torch.argsort(order.to(device), dim=-1)
        places = inverse[..., start : start + length]  # where the plan's order puts each of the range's tokens
        shape = torch.broadcast_shapes(blocks.shape[:2], places.shape[:2])
        blk = blocks.expand(*shape, -1).gather(-1, places.expand(*shape, -1))
        perm = torch.argsort(places, dim=-1)
        blk = blk.gather(-1, perm.expand(*shape, -1))
    counts = torch.zeros(*blk.shape[:2], n, dtype=torch.long, device=device)
    counts.scatter_add_(-1, blk, torch.ones_like(blk))
    return perm, counts


def _reorder_tokens(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, H, D) with its tokens taken in `perm` order per (batch row, head), perm long (B', H', L)."""
    if perm is None:
        return x
    b, length, h, d = x.shape
    index = perm.to(x.device).expand(b, h, length)
    return x.transpose(1, 2).gather(2, index[..., None].expand(b, h, length, d)).transpose(1, 2)


def shard_plan(plan: AttentionPlan, q_start: int, q_len: int, k_start: int, k_len: int):
    """The plan restricted to queries q_start..q_start+q_len-1 and keys k_start..k_start+k_len-1 (global
    positions, original order), as a plan of its own over variable blocks; None when no kept block meets both.

    Returns:
        (plan, q_perm, k_perm): the shard's plan over L = max(q_len, k_len) tokens, and the permutations that put
        the shard's queries and keys in its order (None: already in order). Queries and keys are padded to L at
        the end; the padding forms a last block on each axis that is never kept.
    """
    if plan.quant != "none":
        raise ConfigError(f"ring attention cannot cut a plan with plan.quant={plan.quant!r} into key shards (its "
                          "quantisation scales span whole blocks); use Ulysses (ulysses_degree) for this method")
    q_perm, q_counts = _axis_blocks(plan, "q", q_start, q_len)
    k_perm, k_counts = _axis_blocks(plan, "k", k_start, k_len)
    # Only blocks holding some of the shard's tokens in some (row, head); the rest would be empty blocks.
    q_used = (q_counts > 0).flatten(0, -2).any(dim=0).nonzero().flatten()
    k_used = (k_counts > 0).flatten(0, -2).any(dim=0).nonzero().flatten()
    q_counts, k_counts = q_counts[..., q_used], k_counts[..., k_used]
    layout = _fold_head_modes(plan).index_select(-2, q_used).index_select(-1, k_used)
    layout = layout & (q_counts > 0)[..., :, None] & (k_counts > 0)[..., None, :]
    if not bool(layout.any()):
        return None
    length = max(q_len, k_len)
    shape = torch.broadcast_shapes(layout.shape[:2], q_counts.shape[:2], k_counts.shape[:2])

    def bounds(counts: torch.Tensor) -> torch.Tensor:
        counts = counts.expand(*shape, -1)
        edges = counts.cumsum(dim=-1)
        return torch.cat([torch.zeros_like(edges[..., :1]), edges, torch.full_like(edges[..., :1], length)], dim=-1)

    layout = torch.nn.functional.pad(layout.expand(*shape, -1, -1), (0, 1, 0, 1))  # padding blocks: never kept
    sub = AttentionPlan(seq_len=length, layout=layout, block_size=plan.block_size, q_bounds=bounds(q_counts),
                        k_bounds=bounds(k_counts))
    return sub, q_perm, k_perm


def shard_attention(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    k_start: int,
    *,
    backend: str = "auto",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The part of the plan's attention that one key shard contributes to one query shard.

    Args:
        plan: the plan of the whole sequence (S = plan.seq_len tokens).
        q: (B, Sq, H, D), the plan's queries q_start..q_start+Sq-1 (original order).
        k, v: (B, Sk, Hkv, D), its keys and values k_start..k_start+Sk-1; Hkv may divide H (grouped-query).
        backend: the kernel backend that runs the shard's variable-block plan (see `kernels.run`).
    Returns:
        out float32 (B, Sq, H, D) and lse float32 (B, H, Sq), a query that keeps no key of the shard getting 0
        and -inf; or None when no kept block meets both ranges (nothing was computed).
    """
    from . import run  # the package imports this module

    b, sq, h, d = q.shape
    sk = k.shape[1]
    if k.shape[2] != h:
        k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k, v))
    found = shard_plan(plan, q_start, sq, k_start, sk)
    if found is None:
        return None
    sub, q_perm, k_perm = found
    length = sub.seq_len
    qp = torch.nn.functional.pad(_reorder_tokens(q, q_perm), (0, 0, 0, 0, 0, length - sq))
    kp, vp = (torch.nn.functional.pad(_reorder_tokens(x, k_perm), (0, 0, 0, 0, 0, length - sk)) for x in (k, v))
    out, lse = run(qp, kp, vp, sub, backend=backend, scale=scale, return_lse=True)
    out, lse = out[:, :sq].float(), lse[..., :sq].float()
    if q_perm is not None:
        inverse = torch.argsort(q_perm, dim=-1)
        out = _reorder_tokens(out, inverse)
        lse = lse.gather(-1, inverse.to(lse.device).expand(b, h, sq))
    # A query without kept keys here contributes nothing: 0 whatever the backend computed for its empty softmax.
    return out.masked_fill(torch.isneginf(lse).transpose(1, 2)[..., None], 0.0), lse


def merge(parts: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attentions over disjoint key sets into the attention over all of them.

    Args:
        parts: (out float32 (B, S, H, D), lse float32 (B, H, S)) pairs, at least one. A query that attends no
            key of a part has lse -inf there (its out is ignored); one that attends no key of any part gets 0.
    Returns:
        (out float32 (B, S, H, D), lse float32 (B, H, S)).
    """
    acc = acc_lse = None
    for out, lse in parts:
        weight = lse.transpose(1, 2)[..., None]  # (B, S, H, 1): broadcasts against out
        if acc is None:
            acc, acc_lse = out, weight
        else:
            acc, acc_lse = gather.merge_lse(acc, acc_lse, out, weight)
    if acc is None:
        raise ConfigError("merge needs at least one partial attention")
    return acc, acc_lse[..., 0].transpose(1, 2)
