"""Sparse attention that returns its log-sum-exp, over the whole sequence or one shard of it.

Ring context parallelism splits the keys over processes: each process computes its queries against one key
shard at a time and merges the partial outputs by their log-sum-exp (LSE), as FlashDecoding merges key splits.
Under a sparse plan a shard holds some of the plan's key blocks, cut at the shard's edges. `shard_attention`
restricts a plan to one (query range, key range) pair of the global sequence by the ranges' global offsets,
returns None without computing anything when no kept block meets both ranges, and otherwise the partial output
with its LSE; `merge` combines the partials of every shard into the exact sparse attention.

A shard is computed one of two ways:
- fixed-block plans without a token order on the CPU (`block_sparse_lse`): queries and keys are padded at the
  front to the global block grid, so every block of the shard is a global block or the part of one inside
  the shard; the kept key blocks are gathered and run through the CPU flash kernel, which returns the LSE,
  and the padding keys are masked, never attended;
- any other plan or device: the shard becomes a plan of its own over variable blocks (each global block cut to
  the shard's tokens, in the plan's orders), run by `kernels.run(..., return_lse=True)`: the Triton kernels on
  CUDA, the reference elsewhere; on the CPU with backend "gather" (or "auto" on long sequences) by
  `varblock_lse`, one flash-kernel call per query block. Its keys are padded to the queries' length in a block
  that is never kept.

`gather_attention_lse` is the same CPU kernel for a whole fixed-block plan: the gather path with an LSE.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..errors import ConfigError
from ..plan import HEAD_DENSE, HEAD_SKIP, AttentionPlan
from .capabilities import AUTO_MIN_SEQ
from .layout import finish, permute

CHUNK = 16  # query blocks per flash-kernel call, as in `kernels.gather`


def block_sparse_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    key_start: int = 0,
    key_stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with its LSE on the CPU, over fixed blocks in the tensors' own order.

    Args:
        q: (B, Lq, H, D) queries, Lq = nq * block_size.
        k, v: (B, Lk, H, D) keys and values, Lk = nk * block_size.
        layout: bool (B', H', nq, nk), broadcastable to (B, H): True where query block i attends key block j.
        key_start, key_stop: only keys at positions key_start..key_stop-1 exist; the others are padding, masked
            wherever their block is kept (default: all Lk keys).
    Returns:
        out float32 (B, Lq, H, D) and lse float32 (B, H, Lq); a query that attends no key gets 0 and -inf.
    """
    b, lq, h, d = q.shape
    lk, bs = k.shape[1], block_size
    if lq % bs or lk % bs:
        raise ConfigError(f"block_sparse_lse takes whole blocks: Lq={lq} and Lk={lk} must be multiples of {bs}")
    nq, nk = lq // bs, lk // bs
    key_stop = lk if key_stop is None else key_stop
    qb, kb, vb = (x.transpose(1, 2).reshape(-1, bs, x.shape[-1]) for x in (q, k, v))
    flat = layout.to(q.device).expand(b, h, nq, nk).reshape(b * h * nq, nk)
    counts = flat.sum(dim=-1)
    # Kept blocks first, ascending, as in `kernels.gather.groups`.
    order = torch.argsort((~flat).to(torch.int8), dim=-1, stable=True)
    base = (torch.arange(flat.shape[0], device=q.device) // nq * nk)[:, None]
    positions = torch.arange(lk, device=q.device).view(nk, bs)
    valid = (positions >= key_start) & (positions < key_stop)
    out = torch.zeros(b * h * nq, bs, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b * h * nq, bs), float("-inf"), dtype=torch.float32, device=q.device)
    for kept in counts.unique().tolist():
        if kept == 0:
            continue
        group = (counts == kept).nonzero().flatten()
        for start in range(0, len(group), CHUNK):
            rows = group[start : start + CHUNK]
            cols = order[rows, :kept]
            flat_cols = (cols + base[rows]).flatten()
            r = len(rows)
            kg = kb.index_select(0, flat_cols).view(r, 1, kept * bs, d)
            vg = vb.index_select(0, flat_cols).view(r, 1, kept * bs, vb.shape[-1])
            ok = valid[cols].view(r, 1, 1, kept * bs)
            # The raw CPU flash kernel takes an additive mask and returns the LSE beside the output.
            mask = None if bool(ok.all()) else torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, float("-inf"))
            part, part_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qb.index_select(0, rows)[:, None], kg, vg, attn_mask=mask, scale=scale)[:2]
            out[rows] = part[:, 0].float()
            lse[rows] = part_lse[:, 0].float()
            if mask is not None:  # a block row whose kept keys are all padding attends nothing
                dead = ~ok.view(r, -1).any(dim=-1)
                if bool(dead.any()):
                    out[rows[dead]] = 0.0
                    lse[rows[dead]] = float("-inf")
    return out.view(b, h, lq, -1).transpose(1, 2), lse.view(b, h, lq)


def varblock_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *,
                 scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with its LSE on the CPU over any blocks: one flash-kernel call per query block with
    the tokens of its kept key blocks. For the shards of plans with an order or variable blocks.

    Args:
        q, k, v: (B, S, H, D) already in the plan's order; the plan has no order or head modes of its own.
    Returns:
        out float32 (B, S, H, D) and lse float32 (B, H, S); a query that attends no key gets 0 and -inf.
    """
    if plan.order is not None or _key_order(plan) is not None or plan.head_mode is not None or plan.quant != "none":
        raise ConfigError("varblock_lse takes plans without orders, head modes or low-bit Q·K")
    b, s, h, d = q.shape
    nq, nk = plan.num_blocks

    def edges(axis: str) -> list:
        lengths = plan.block_lengths(axis).expand(b, h, -1)
        return torch.cat([torch.zeros_like(lengths[..., :1]), lengths.cumsum(-1)], dim=-1).tolist()

    q_edges, k_edges = edges("q"), edges("k")
    layout = plan.layout.expand(b, h, nq, nk).cpu()
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.zeros(b, h, s, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)
    for bi in range(b):
        for hi in range(h):
            qe, ke = q_edges[bi][hi], k_edges[bi][hi]
            for i, cols in enumerate(layout[bi, hi].tolist()):
                if qe[i + 1] == qe[i]:
                    continue
                keys = [torch.arange(ke[j], ke[j + 1]) for j, kept in enumerate(cols) if kept and ke[j + 1] > ke[j]]
                if not keys:
                    continue
                index = torch.cat(keys).to(q.device)
                part, part_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qh[bi, hi, qe[i] : qe[i + 1]][None, None], kh[bi, hi, index][None, None],
                    vh[bi, hi, index][None, None], scale=scale)[:2]
                out[bi, hi, qe[i] : qe[i + 1]] = part[0, 0].float()
                lse[bi, hi, qe[i] : qe[i + 1]] = part_lse[0, 0].float()
    return out.transpose(1, 2), lse


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
    b, s, h, d = q.shape
    bs = plan.block_size
    n = plan.num_blocks[0]
    padded = n * bs - s
    qh, kh, vh = (torch.nn.functional.pad(x, (0, 0, 0, padded)) for x in permute(plan, *(x.transpose(1, 2) for x in (q, k, v))))
    out, lse = block_sparse_lse(*(x.transpose(1, 2) for x in (qh, kh, vh)), _fold_head_modes(plan), bs, scale=scale, key_stop=s)
    out, lse = finish(plan, out.transpose(1, 2)[:, :, :s], lse[..., :s])
    return out.transpose(1, 2).to(q.dtype), lse


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


def _fast_cpu(plan: AttentionPlan, q: torch.Tensor, backend: str, longest: int) -> bool:
    if q.device.type != "cpu" or plan.q_bounds is not None or plan.k_bounds is not None or plan.order is not None:
        return False
    if _key_order(plan) is not None or plan.quant != "none":
        return False
    return backend == "gather" or (backend == "auto" and longest >= AUTO_MIN_SEQ)


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
        backend: the kernel backend (see `kernels.run`); "auto" and "gather" on the CPU run fixed-block plans
            without an order through `block_sparse_lse`.
    Returns:
        out float32 (B, Sq, H, D) and lse float32 (B, H, Sq), a query that keeps no key of the shard getting 0
        and -inf; or None when no kept block meets both ranges (nothing was computed).
    """
    from . import run  # the package imports this module

    b, sq, h, d = q.shape
    sk = k.shape[1]
    if k.shape[2] != h:
        k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k, v))
    if _fast_cpu(plan, q, backend, max(sq, sk)):
        return _fixed_shard(plan, q, k, v, q_start, k_start, scale)
    found = shard_plan(plan, q_start, sq, k_start, sk)
    if found is None:
        return None
    sub, q_perm, k_perm = found
    length = sub.seq_len
    qp = torch.nn.functional.pad(_reorder_tokens(q, q_perm), (0, 0, 0, 0, 0, length - sq))
    kp, vp = (torch.nn.functional.pad(_reorder_tokens(x, k_perm), (0, 0, 0, 0, 0, length - sk)) for x in (k, v))
    if q.device.type == "cpu" and (backend == "gather" or (backend == "auto" and length >= AUTO_MIN_SEQ)):
        out, lse = varblock_lse(qp, kp, vp, sub, scale=scale)  # no CPU backend of kernels.run returns the LSE fast
    else:
        out, lse = run(qp, kp, vp, sub, backend=backend, scale=scale, return_lse=True)
    out, lse = out[:, :sq].float(), lse[..., :sq].float()
    if q_perm is not None:
        inverse = torch.argsort(q_perm, dim=-1)
        out = _reorder_tokens(out, inverse)
        lse = lse.gather(-1, inverse.to(lse.device).expand(b, h, sq))
    # A query without kept keys here is a 0/0 softmax (NaN in the reference): it contributes nothing.
    return out.masked_fill(torch.isneginf(lse).transpose(1, 2)[..., None], 0.0), lse


def _fixed_shard(plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int,
                 scale: float | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`shard_attention` of a fixed-block plan without an order, by `block_sparse_lse` on the global block grid."""
    bs = plan.block_size
    b, sq, h, d = q.shape
    sk = k.shape[1]
    q_block, k_block = q_start // bs, k_start // bs
    q_pad, k_pad = q_start - q_block * bs, k_start - k_block * bs  # tokens of the first block before the shard
    nq, nk = math.ceil((q_pad + sq) / bs), math.ceil((k_pad + sk) / bs)
    layout = _fold_head_modes(plan)[..., q_block : q_block + nq, k_block : k_block + nk]
    if not bool(layout.any()):
        return None

    def on_grid(x: torch.Tensor, front: int, blocks: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, 0, front, blocks * bs - front - x.shape[1]))

    out, lse = block_sparse_lse(on_grid(q, q_pad, nq), on_grid(k, k_pad, nk), on_grid(v, k_pad, nk), layout, bs,
                                scale=scale, key_start=k_pad, key_stop=k_pad + sk)
    return out[:, q_pad : q_pad + sq], lse[..., q_pad : q_pad + sq]


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
        if acc is None:
            acc, acc_lse = out, lse
            continue
        merged = torch.logaddexp(acc_lse, lse)
        none = torch.isneginf(merged)  # -inf - -inf is NaN: such queries keep 0
        old = torch.where(none, 0.0, (acc_lse - merged).exp()).transpose(1, 2)[..., None]
        new = torch.where(none, 0.0, (lse - merged).exp()).transpose(1, 2)[..., None]
        acc, acc_lse = acc * old + out * new, merged
    if acc is None:
        raise ConfigError("merge needs at least one partial attention")
    return acc, acc_lse
