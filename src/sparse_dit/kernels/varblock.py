"""The CPU fast path for variable-block plans (SVG2's clusters): one gathered SDPA call per query cluster.

A variable-block plan's query clusters differ in size (empty, single-token, thousands of tokens) and each keeps
its own set of key clusters, so the fixed-block grouping of `kernels.gather` (query blocks of one size, grouped by
kept count) does not apply. Instead, per (batch row, head) and query cluster, the token positions of its kept key
clusters are concatenated into one index, the keys and values gathered into a per-thread workspace, and the
cluster's queries run through the CPU flash SDPA kernel against them. The SDPA kernel tiles the queries itself,
so one call serves a cluster of any size; where a cluster's keys and values would not stay in cache they
are split and merged by log-sum-exp (`gather.merge_lse`), as `gather.attend_blocks` does. With `return_lse` the
same calls also return each query's log-sum-exp (ring attention's shards, `kernels.lse`).

The plan's token orders are never applied to the tensors: they are composed into the gather indices instead
(the keys of cluster j are `key_order[k_bounds[j]:k_bounds[j + 1]]` in the original order, and a cluster's
output rows are written straight back to its queries' original positions `order[q_bounds[i]:q_bounds[i + 1]]`),
which saves a permutation of q, k, v and of the output. Attention over a set of keys does not depend on their
order, so a query cluster that keeps every key, and a dense head, read the keys in place without a gather.
The index of every cluster is built once per plan
(`schedule`, kept in `plan.cache`); the loop over clusters then costs a few tensor calls each, small next to
the cluster's work for clusters of more than a few dozen tokens (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan
from . import gather

# A query side (or key side) of one work item: a slice of contiguous rows of the flattened (B*H*S, D) tensor, or
# a long/int32 index of rows to gather.
Rows = slice | torch.Tensor


@dataclass(frozen=True)
class Schedule:
    """The work of one variable-block plan at one (B, H, device), as rows of the flattened (B*H*S, D) tensors.

    Attributes:
        items: (query rows, key rows) per query cluster that computes: every non-empty query cluster of a sparse
            head that keeps at least one key, and one item per dense head (all its queries and keys).
        zero: query rows whose output is zero: skipped heads, and clusters that keep no key (as the reference,
            whose fully masked rows output zeros).
        pairs: the number of (query, key) token pairs the items compute.
        most_queries, most_keys: the largest number of rows an item gathers (for its workspace).
    """

    items: list[tuple[Rows, Rows]]
    zero: list[Rows]
    pairs: int
    most_queries: int
    most_keys: int


def bounds(plan: AttentionPlan, axis: str) -> torch.Tensor:
    """Block boundaries along `axis`, variable or fixed: long (B', H', n + 1) or (1, 1, n + 1), from 0 to S."""
    given = plan.q_bounds if axis == "q" else plan.k_bounds
    if given is not None:
        return given.long()
    lengths = plan.block_lengths(axis)
    return torch.nn.functional.pad(lengths.cumsum(-1), (1, 0))


def schedule(plan: AttentionPlan, batch: int, heads: int, device: torch.device) -> Schedule:
    """The plan's work items at (batch, heads) on `device`; built once and kept in `plan.cache`."""
    key = ("varblock_schedule", batch, heads, str(device))
    if key not in plan.cache:
        plan.cache[key] = _build(plan, batch, heads, device)
    return plan.cache[key]


def _build(plan: AttentionPlan, b: int, h: int, device: torch.device) -> Schedule:
    s = plan.seq_len
    nq, nk = plan.num_blocks
    qb = bounds(plan, "q").to(device).expand(b, h, nq + 1).reshape(b * h, nq + 1)
    kb = bounds(plan, "k").to(device).expand(b, h, nk + 1).reshape(b * h, nk + 1)
    qlen, klen = qb.diff(dim=-1), kb.diff(dim=-1)
    mode = (torch.full((b * h,), HEAD_SPARSE, dtype=torch.int8, device=device) if plan.head_mode is None
            else plan.head_mode.to(device).expand(b, h).reshape(-1))
    sparse = mode == HEAD_SPARSE
    # Kept (head, query cluster, key cluster) triples of sparse heads; empty key clusters add nothing.
    kept = plan.layout.to(device).expand(b, h, nq, nk).reshape(b * h, nq, nk) & (klen[:, None, :] > 0) & sparse[:, None, None]
    keys_per_cluster = (kept * klen[:, None, :]).sum(dim=-1)  # (B*H, nq): L, the key count of each query cluster
    head, _, kcl = kept.nonzero(as_tuple=True)  # row-major: by head, then query cluster, then key cluster
    lengths = klen[head, kcl]
    # int32 halves the index (it holds about density * S * clusters entries per head) and the work of building it.
    dtype = torch.int32 if b * h * s < 2**31 else torch.long
    # Row of every gathered key in the flattened (B*H*S) tensors, in the plan's key order: each kept cluster's run
    # start..start + length, the runs concatenated per query cluster.
    # As a cumulative sum of steps: 1 inside a run, the jump to the run's first row at its start (3-5x faster
    # than repeat_interleave over the millions of entries).
    total = int(lengths.sum())
    first = head * s + kb[head, kcl]
    jumps = first.clone()
    jumps[1:] -= first[:-1] + lengths[:-1] - 1
    steps = torch.ones(total, dtype=dtype, device=device)
    steps[lengths.cumsum(0)[:-1]] = jumps[1:].to(dtype)
    if total:
        steps[0] = jumps[0]
    key_rows = steps.cumsum(0, dtype=dtype)
    head_base = torch.arange(b * h, device=device)[:, None] * s
    key_order = _flat_order(plan.key_order, b, h, s, device)
    if key_order is not None:  # compose the order: the gathered keys come straight from the unpermuted tensors
        key_rows = torch.index_select((key_order + head_base).to(dtype).view(-1), 0, key_rows)
    order = _flat_order(plan.order, b, h, s, device)
    query_rows = None if order is None else (order + head_base).reshape(-1)

    ends = keys_per_cluster.reshape(-1).cumsum(0)
    ends_list, lens_list = ends.tolist(), keys_per_cluster.reshape(-1).tolist()
    qb_list, qlen_list, mode_list = qb.tolist(), qlen.tolist(), mode.tolist()
    items: list[tuple[Rows, Rows]] = []
    zero: list[Rows] = []
    pairs = 0
    for bh in range(b * h):
        head_rows = slice(bh * s, (bh + 1) * s)
        if mode_list[bh] == HEAD_SKIP:
            zero.append(head_rows)
            continue
        if mode_list[bh] == HEAD_DENSE:  # dense attention is the same in any token order: no permutation at all
            items.append((head_rows, head_rows))
            pairs += s * s
            continue
        for i in range(nq):
            n = qlen_list[bh][i]
            if n == 0:
                continue
            lo = bh * s + qb_list[bh][i]
            rows: Rows = slice(lo, lo + n) if query_rows is None else query_rows[lo : lo + n]
            flat = bh * nq + i
            count = lens_list[flat]
            if count == 0:
                zero.append(rows)
            elif count == s:  # every key, in some order: read them in place
                items.append((rows, head_rows))
            else:
                end = ends_list[flat]
                items.append((rows, key_rows[end - count : end]))
            pairs += n * count
    most_queries = max((len(rows) for rows, _ in items if not isinstance(rows, slice)), default=0)
    most_keys = max((len(rows) for _, rows in items if not isinstance(rows, slice)), default=0)
    return Schedule(items, zero, pairs, most_queries, most_keys)


def _flat_order(order: torch.Tensor | None, b: int, h: int, s: int, device: torch.device) -> torch.Tensor | None:
    """A (B', H', S) token order as long (B*H, S), or None."""
    return None if order is None else order.to(device).long().expand(b, h, s).reshape(b * h, s)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
            with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q (1, 1, n, D) over k, v (1, 1, L, D), L > 0, the keys split where they would not stay in
    cache (`gather.KV_BYTES`) and the parts merged by their log-sum-exp. Returns out (1, 1, n, D), float32
    where split, and with `with_lse` the float32 LSE (1, 1, n, 1), else None."""
    bounds = gather.split_bounds(k.shape[2], 2 * k.shape[3] * k.element_size())
    if len(bounds) == 2 and not with_lse:
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    acc = lse = None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part, part_lse = gather.flash_lse(q, k[:, :, lo:hi], v[:, :, lo:hi], None, scale)
        acc, lse = (part, part_lse) if acc is None else gather.merge_lse(acc, lse, part, part_lse)
    return acc, lse


def varblock_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float | None,
                       return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of a variable-block plan by per-cluster gathered SDPA. q, k, v: (B, S, H, D); returns
    (B, S, H, D) in q's dtype, and with `return_lse` also the log-sum-exp of the scaled scores, float32 (B, H, S):
    -inf (output 0) for a query that attends no key.

    Also exact for fixed-block plans, which `kernels.gather` runs faster.
    """
    b, s, h, d = q.shape
    flat = []
    for i, x in enumerate((q, k, v)):  # (B*H*S, D) rows, in the original token order
        buffer = gather._workspace(f"rows{i}", (b, h, s, d), x.dtype, x.device)
        buffer.copy_(x.transpose(1, 2))
        flat.append(buffer.view(b * h * s, d))
    qf, kf, vf = flat
    work = schedule(plan, b, h, q.device)
    out = gather._workspace("out", (b * h * s, d), q.dtype, q.device)
    lse = gather._workspace("lse", (b * h * s,), torch.float32, q.device) if return_lse else None
    for rows in work.zero:
        if isinstance(rows, slice):
            out[rows] = 0
        else:
            out.index_fill_(0, rows, 0)
        if lse is not None:
            if isinstance(rows, slice):
                lse[rows] = float("-inf")
            else:
                lse.index_fill_(0, rows, float("-inf"))
    # One buffer each, taken once: per item a slice of it (a cluster's loop costs tens of microseconds in all).
    queries = gather._workspace("queries", (work.most_queries, d), q.dtype, q.device)
    keys = gather._workspace("keys", (work.most_keys, d), k.dtype, k.device)
    values = gather._workspace("values", (work.most_keys, d), v.dtype, v.device)
    for q_rows, k_rows in work.items:
        if isinstance(q_rows, slice):
            qg = qf[q_rows]
        else:
            qg = torch.index_select(qf, 0, q_rows, out=queries[: len(q_rows)])
        if isinstance(k_rows, slice):
            kg, vg = kf[k_rows], vf[k_rows]
        else:
            kg = torch.index_select(kf, 0, k_rows, out=keys[: len(k_rows)])
            vg = torch.index_select(vf, 0, k_rows, out=values[: len(k_rows)])
        result, result_lse = _attend(qg[None, None], kg[None, None], vg[None, None], scale, lse is not None)
        result = result[0, 0]
        if isinstance(q_rows, slice):
            out[q_rows] = result
            if lse is not None:
                lse[q_rows] = result_lse[0, 0, :, 0]
        else:
            out.index_copy_(0, q_rows, result if result.dtype == out.dtype else result.to(out.dtype))
            if lse is not None:
                lse.index_copy_(0, q_rows, result_lse[0, 0, :, 0])
    # The only fresh tensors: everything above lives in the workspace, which the next call overwrites.
    out = q.new_empty(b, s, h, d).copy_(out.view(b, h, s, d).transpose(1, 2))
    return (out, lse.view(b, h, s).clone()) if return_lse else out
