"""The plan as the Triton kernels read it: a CSR index of kept key blocks, block boundaries, query tiles.

Everything here is built once per plan and device and kept in `plan.cache`. Tensors are stored for the
plan's own leading shape (P_B, P_H), the broadcast of every per-head field, not for (B, H): a kernel
program for batch row b and head h reads plan row p = (b % P_B) * P_H + h % P_H, so a static plan shared
by all heads is indexed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...plan import HEAD_DENSE, HEAD_SKIP, AttentionPlan


@dataclass(frozen=True)
class PlanCSR:
    """Kept key blocks per (plan row, query block).

    Attributes:
        row_ptr: int32 (P_B * P_H * nq + 1); row r = p * nq + i keeps cols[row_ptr[r]:row_ptr[r + 1]].
        cols: int32 (nnz,), kept key-block indices, ascending within a row so K and V are read forward.
        plan_batch, plan_heads: (P_B, P_H), the plan's leading shape.
    """

    row_ptr: torch.Tensor
    cols: torch.Tensor
    plan_batch: int
    plan_heads: int


def plan_shape(plan: AttentionPlan) -> tuple[int, int]:
    """(P_B, P_H): the broadcast leading shape of the plan's layout, head modes and boundaries."""
    shapes = [plan.layout.shape[:2]]
    shapes += [x.shape[:2] for x in (plan.q_bounds, plan.k_bounds) if x is not None]
    if plan.head_mode is not None:
        shapes.append(plan.head_mode.shape)
    return tuple(torch.broadcast_shapes(*shapes))


def plan_csr(plan: AttentionPlan, device: torch.device) -> PlanCSR:
    """The CSR index of the plan's kept blocks on `device`, cached in `plan.cache`.

    Dense heads keep every key block; skipped heads keep none (the kernel then writes zeros).
    """
    key = ("triton_csr", str(device))
    if key not in plan.cache:
        pb, ph = plan_shape(plan)
        nq, nk = plan.num_blocks
        layout = plan.layout.to(device).expand(pb, ph, nq, nk)
        if plan.head_mode is not None:
            mode = plan.head_mode.to(device).expand(pb, ph)[..., None, None]
            layout = (layout | (mode == HEAD_DENSE)) & (mode != HEAD_SKIP)
        rows = layout.reshape(-1, nk)
        row_ptr = torch.zeros(rows.shape[0] + 1, dtype=torch.int32, device=device)
        row_ptr[1:] = rows.sum(dim=1).cumsum(0)
        # nonzero() lists (row, col) pairs in row-major order: exactly the CSR column array.
        cols = rows.nonzero()[:, 1].to(torch.int32)
        plan.cache[key] = PlanCSR(row_ptr, cols, pb, ph)
    return plan.cache[key]


def block_bounds(plan: AttentionPlan, axis: str, device: torch.device) -> torch.Tensor:
    """Block boundaries along `axis` ("q" or "k") for every plan row: int32 (P_B * P_H, n + 1), cached.

    Fixed blocks get their boundaries spelled out, so the variable-block kernel runs any plan.
    """
    key = ("triton_bounds", axis, str(device))
    if key not in plan.cache:
        pb, ph = plan_shape(plan)
        bounds = plan.q_bounds if axis == "q" else plan.k_bounds
        if bounds is None:
            bounds = torch.arange(0, plan.seq_len + plan.block_size, plan.block_size, device=device)
            bounds = bounds.clamp(max=plan.seq_len)[: plan.num_blocks[0 if axis == "q" else 1] + 1]
        bounds = bounds.to(device).expand(pb, ph, -1)
        plan.cache[key] = bounds.reshape(pb * ph, -1).to(torch.int32).contiguous()
    return plan.cache[key]


def query_tiles(plan: AttentionPlan, device: torch.device, block_m: int) -> torch.Tensor:
    """The work list of the variable-block kernel: int32 (P_B * P_H, T, 3) of (query block, start, end).

    Each variable query block is cut into tiles of at most `block_m` rows, one kernel program each, so a
    large cluster is spread over many programs instead of serialising one. T = ceil(S / block_m) + nq
    bounds the tile count of every plan row without a device sync; unused entries have query block -1.
    """
    key = ("triton_tiles", block_m, str(device))
    if key not in plan.cache:
        bounds = block_bounds(plan, "q", device).long()
        nq = bounds.shape[1] - 1
        tiles_per_block = (bounds.diff(dim=1) + block_m - 1) // block_m
        ends = tiles_per_block.cumsum(dim=1)
        t = torch.arange(-(-plan.seq_len // block_m) + nq, device=device).expand(bounds.shape[0], -1)
        block = torch.searchsorted(ends, t.contiguous(), right=True).clamp(max=nq - 1)
        first_tile = (ends - tiles_per_block).gather(1, block)
        start = bounds.gather(1, block) + (t - first_tile) * block_m
        end = torch.minimum(start + block_m, bounds.gather(1, block + 1))
        block = torch.where(t < ends[:, -1:], block, -1)
        plan.cache[key] = torch.stack([block, start, end], dim=-1).to(torch.int32).contiguous()
    return plan.cache[key]
