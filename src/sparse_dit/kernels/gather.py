"""The CPU fast path: gather each query block's kept key blocks and run the CPU flash SDPA kernel on them.

Query blocks are grouped by how many key blocks they keep, so every batch of query blocks handed to SDPA
has the same key length and needs no padding mask; batches are small (`CHUNK` query blocks). The SDPA kernel
walks a query block's keys once per 32-row query tile, so a block's keys and values should stay in cache
between tiles: where they would not (`KV_BYTES`), the keys are split into parts run separately and merged
by their log-sum-exp, as FlashDecoding merges its key splits. Block rows, gathered keys and the output live
in a per-thread workspace reused between calls, because fresh multi-MB buffers cost their first-touch page
faults on every call. On 2 CPU cores this is 1.2-1.7x faster than compiled FlexAttention over the same plan
(docs/benchmarks.md) and needs no compilation. The grouping is built once per plan and kept in `plan.cache`.

With `return_lse` the same kernel calls also return each query's log-sum-exp (ring attention's shards,
`kernels.lse`); without it an unsplit chunk goes through the SDPA entry point and computes no LSE at all.
`merge_lse` is the one LSE merge of the CPU paths.

Inputs that need a gradient (fine-tuning onto a static pattern, `sparse-dit distill`) take
`gather_attention_autograd` instead: the same groups, gathered with autograd's out-of-place ops and no
workspace, so that SDPA's own backward runs on the kept blocks only. Its cost falls with the density where the
reference's masked dense attention costs the full map forward and backward.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import HEAD_DENSE, AttentionPlan
from .layout import finish, permute

# Query blocks per SDPA call. Small, so a chunk's gathered keys and values are still in cache when SDPA reads
# them: on the demo model's own plans at 8192 tokens (xattention, gna, vmoba) 4 runs the kernel 5-10% faster
# than 16, and 2 no faster than 4 (its calls cost more Python).
CHUNK = 4
# Most K + V bytes per query block in one SDPA call; more are split and merged by LSE. 2 MB (64 key blocks of
# 64 x 64 fp32) ran svg2's variable-block plans 6-9% faster than 1 MB and the fixed-block ones no slower.
KV_BYTES = 2 << 20


@dataclass(frozen=True)
class _Group:
    rows: torch.Tensor  # long (R,): flat query-block rows (b * H + h) * n + i
    cols: torch.Tensor  # long (R, kept): flat key-block rows of the same (b, h)
    valid: torch.Tensor | None  # bool (R, 1, 1, kept * block): False at padding keys past S; None if no padding


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


def attend_blocks(
    qb: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    groups: list[_Group],
    scale: float | None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel proper. qb, kb, vb: (B*H*n, block, D) block rows; returns the output block rows (into `out` if
    given). With `lse`, a float32 (B*H*n, block) buffer, also writes each query's log-sum-exp there (-inf, with
    output 0, where its block keeps no key block)."""
    out = torch.empty_like(qb) if out is None else out
    bs, d = qb.shape[1:]
    for group in groups:
        kept = group.cols.shape[1]
        if kept == 0:  # query blocks that attend to nothing output zeros, as the reference does
            out[group.rows] = 0
            if lse is not None:
                lse[group.rows] = float("-inf")
            continue
        bounds = split_bounds(kept, bs * 2 * d * kb.element_size())
        parts = len(bounds) - 1
        for start in range(0, len(group.rows), CHUNK):
            rows = group.rows[start : start + CHUNK]
            q = torch.index_select(qb, 0, rows, out=_workspace("queries", (len(rows), bs, d), qb.dtype, qb.device))[:, None]
            if parts == 1 and lse is None:  # the headline path: the SDPA entry point, no LSE taken
                kg, vg, mask = _keys(kb, vb, group, start, 0, kept, bs)
                out[rows] = F.scaled_dot_product_attention(q, kg, vg, attn_mask=mask, scale=scale)[:, 0]
                continue
            acc = acc_lse = None
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                part, part_lse = flash_lse(q, *_keys(kb, vb, group, start, lo, hi, bs), scale)
                acc, acc_lse = (part, part_lse) if acc is None else merge_lse(acc, acc_lse, part, part_lse)
            out[rows] = acc[:, 0].to(out.dtype)
            if lse is not None:
                lse[rows] = acc_lse[:, 0, :, 0]
    return out


def flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
              scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU flash SDPA kernel with its log-sum-exp. q (R, 1, n, D), k, v (R, 1, L, D) with L > 0, valid an
    optional bool key mask broadcastable to (R, 1, n, L). Returns out (R, 1, n, D) in q's dtype and lse float32
    (R, 1, n, 1), shaped to broadcast against out (what `merge_lse` takes)."""
    mask = None
    if valid is not None:  # the raw kernel takes an additive mask
        mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)[:2]
    return out, lse.float()[..., None]


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint key sets from the attention over each: the one log-sum-exp merge of every
    CPU path (key splits here and in `kernels.varblock`, ring attention's shards in `kernels.lse.merge`).

    Args:
        out_a, out_b: partial outputs, any dtype, of one shape (..., D).
        lse_a, lse_b: their float32 log-sum-exps, broadcastable against the outputs (a trailing dim of 1).
            A query that attends no key of a part has lse -inf there, its output ignored.
    Returns:
        (out float32, lse float32); a query that attends no key of either part gets 0 and -inf.
    """
    merged = torch.logaddexp(lse_a, lse_b)
    # -inf - -inf is NaN: where neither part has a key, subtract 0 instead, so both weights are exp(-inf) = 0.
    shift = merged.masked_fill(torch.isneginf(merged), 0.0)
    out = out_a.float() * (lse_a - shift).exp_() + out_b.float() * (lse_b - shift).exp_()
    return out, merged


def split_bounds(kept: int, block_bytes: int) -> list[int]:
    """Boundaries (parts + 1 ints, 0 to `kept`) of the key splits of a query block keeping `kept` key blocks of
    `block_bytes` K + V bytes each: as few splits as keep each within `KV_BYTES`, whole blocks each.

    A split never splits a block, so there are at most `kept` splits and each holds at least one block: an empty
    split would hand the CPU flash kernel zero keys, which it divides by (SIGFPE, not an exception). A single
    block over the budget runs as one split of its own, slower but exact.
    """
    parts = min(kept, max(1, math.ceil(kept * block_bytes / KV_BYTES)))
    return [kept * i // parts for i in range(parts + 1)]


def _keys(kb: torch.Tensor, vb: torch.Tensor, group: _Group, start: int, lo: int, hi: int, bs: int):
    """Kept key blocks lo..hi of a chunk's query blocks, gathered: K, V (R, 1, keys, D) and a padding mask or None."""
    cols = group.cols[start : start + CHUNK, lo:hi]
    r, d = cols.shape[0], kb.shape[-1]
    shape = (r * (hi - lo), bs, d)
    kg = torch.index_select(kb, 0, cols.flatten(), out=_workspace("keys", shape, kb.dtype, kb.device))
    vg = torch.index_select(vb, 0, cols.flatten(), out=_workspace("values", shape, vb.dtype, vb.device))
    mask = None if group.valid is None else group.valid[start : start + CHUNK, ..., lo * bs : hi * bs]
    return kg.view(r, 1, (hi - lo) * bs, d), vg.view(r, 1, (hi - lo) * bs, d), mask


def block_rows(plan: AttentionPlan, *tensors: torch.Tensor, reuse: bool = False) -> list[torch.Tensor]:
    """(B, S, H, D) tensors in the plan's order, padded to whole blocks, as (B*H*n, block, D) block rows.

    With `reuse`, the rows are written into this thread's workspace, overwritten by the next call.
    """
    b, s, h, d = tensors[0].shape
    n = plan.num_blocks[0]
    shape = (b, h, n * plan.block_size, d)
    buffers = [_workspace(f"rows{i}", shape, x.dtype, x.device) if reuse else x.new_empty(shape) for i, x in enumerate(tensors)]
    for x, padded in zip(permute(plan, *(x.transpose(1, 2) for x in tensors)), buffers):
        # One strided copy into a preallocated buffer: F.pad on the transposed view costs 5x as much.
        padded[:, :, :s].copy_(x)
        padded[:, :, s:].zero_()
    return [x.view(b * h * n, plan.block_size, d) for x in buffers]


# Query blocks per SDPA call of the autograd path: bigger than CHUNK, since each call also records its autograd
# nodes and saves its gathered keys for the backward; 16 x 64 key blocks of 64 x 64 fp32 is 16 MB of K per call.
AUTOGRAD_CHUNK = 16


def gather_attention_autograd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *,
                              scale: float | None) -> torch.Tensor:
    """`gather_attention` for inputs that require a gradient, fixed-block plans: (B, S, H, D) in, (B, S, H, D)
    out, differentiable in q, k and v. Each query block's kept key blocks are gathered by `index_select` (whose
    backward scatters the key gradients back) and run through SDPA, whose CPU flash kernel has a backward."""
    b, s, h, d = q.shape
    bs, n = plan.block_size, plan.num_blocks[0]
    qb, kb, vb = (F.pad(x, (0, 0, 0, n * bs - s)).reshape(b * h * n, bs, x.shape[-1])
                  for x in permute(plan, *(x.transpose(1, 2) for x in (q, k, v))))
    outs, rows = [], []
    for group in groups(plan, b, h, q.device):
        kept = group.cols.shape[1]
        if kept == 0:  # attends nothing: stays 0, as in the reference
            continue
        for start in range(0, len(group.rows), AUTOGRAD_CHUNK):
            part, cols = group.rows[start : start + AUTOGRAD_CHUNK], group.cols[start : start + AUTOGRAD_CHUNK].flatten()
            kg, vg = (x.index_select(0, cols).view(len(part), 1, kept * bs, d) for x in (kb, vb))
            mask = None if group.valid is None else group.valid[start : start + AUTOGRAD_CHUNK]
            outs.append(F.scaled_dot_product_attention(qb.index_select(0, part)[:, None], kg, vg, attn_mask=mask,
                                                       scale=scale)[:, 0])
            rows.append(part)
    out = qb.new_zeros(qb.shape)
    if outs:
        out = out.index_copy(0, torch.cat(rows), torch.cat(outs))
    out, _ = finish(plan, out.view(b, h, n * bs, d)[:, :, :s], None)
    return out.transpose(1, 2)


_local = threading.local()


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of `shape` kept in this thread between calls, grown when too small; overwritten by the next use.

    Fresh multi-MB tensors come from new pages on every call, and their first-touch page faults cost 10-25% of
    a sparse layer on the project's VM. The workspace holds the largest size seen (3 x the block rows of q, k, v
    plus a chunk's gathered keys and values).
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    key = (name, dtype, device)
    if key not in buffers or buffers[key].numel() < numel:
        buffers.pop(key, None)  # let the old buffer go before allocating the new
        with torch.inference_mode(False):  # a normal tensor takes in-place writes inside and outside inference mode
            buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel].view(shape)


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float | None,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention by gathered SDPA. q, k, v: (B, S, H, D); returns (B, S, H, D) in q's dtype, and with
    `return_lse` also the log-sum-exp of the scaled scores, float32 (B, H, S): -inf (output 0) for a query
    that attends no key."""
    b, s, h, d = q.shape
    qb, kb, vb = block_rows(plan, q, k, v, reuse=True)
    lse = _workspace("lse", qb.shape[:2], torch.float32, q.device) if return_lse else None
    out = attend_blocks(qb, kb, vb, groups(plan, b, h, q.device), scale, out=_workspace("out", qb.shape, q.dtype, q.device), lse=lse)
    out, lse = finish(plan, out.view(b, h, -1, d)[:, :, :s], None if lse is None else lse.view(b, h, -1)[:, :, :s])
    # The only fresh tensors: everything above lives in the workspace, which the next call overwrites.
    out = q.new_empty(b, s, h, d).copy_(out.transpose(1, 2))
    return (out, lse.clone()) if return_lse else out
