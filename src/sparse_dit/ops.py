"""Tensor ops the planners share, on every device: block mean-pooling, k-means steps, block attention mass
from a cached LSE, and cumulative (top-p) selection.

Each op is torch. `block_mean_pool`, `kmeans_assign` and `block_attention_mass` run the Triton kernel of
`kernels.triton.helpers` instead for CUDA tensors that kernel takes (triton installed, a head dim and dtype it
`accepts`); `impl="torch"` or `impl="triton"` forces one (under TRITON_INTERPRET=1 "triton" runs on CPU tensors,
which is how the tests compare the two). Importing this module never imports triton, so methods in
`patterns/` use it freely.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .errors import ShapeError
from .kernels.capabilities import triton_installed

Impl = Literal["auto", "torch", "triton"]

# Most query rows per chunk of `block_attention_mass`.
CHUNK_ROWS = 1024
# Most score elements per chunk of `block_attention_mass` (4 MB in fp32): the chunk's scores pass through a
# matmul, a subtraction, an exp and two block sums, and at 8k keys a chunk of 1024 rows (64 MB) from DRAM made
# the mass cost 2.0x a dense SDPA call on one thread, one that stays in cache 1.2x.
CHUNK_ELEMENTS = 1 << 20
# Most elements of one chunk of the (points x centroids) distances in `kmeans_assign`: 64 MB in fp32.
KMEANS_CHUNK = 1 << 24
# Round-off may leave a row's cumulative share a hair under p although every entry is counted.
SHARE_TOL = 1e-6


def _triton_helpers(impl: Impl, x: torch.Tensor, *, fits: bool = True):
    """The Triton helpers module if this call should run there, else None."""
    if impl == "torch" or (impl == "auto" and (not x.is_cuda or not fits or not triton_installed())):
        return None
    from .kernels.triton import accepts, helpers, is_interpreted

    if impl == "auto" and (is_interpreted() or not accepts(x.shape[-1], x.dtype)):
        return None
    return helpers


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half inputs, float64 kept: what the torch paths accumulate in."""
    return torch.promote_types(x.dtype, torch.float32)


def block_mean_pool(x: torch.Tensor, block_size: int, *, impl: Impl = "auto") -> torch.Tensor:
    """Mean of every fixed block of tokens.

    Args:
        x: (B, S, H, D).
        block_size: tokens per block; the last block may be shorter and is averaged over its real tokens.
        impl: "auto" (Triton for CUDA tensors it takes, else torch), "torch" or "triton".
    Returns:
        (B, H, n, D) with n = ceil(S / block_size), float32 (float64 for float64 x on the torch path).
    """
    helpers = _triton_helpers(impl, x)
    if helpers is not None:
        return helpers.block_mean_pool(x, block_size)
    b, s, h, d = x.shape
    n = -(-s // block_size)
    xh = F.pad(x.transpose(1, 2).to(_compute_dtype(x)), (0, 0, 0, n * block_size - s))  # zero rows add nothing
    counts = (torch.arange(1, n + 1, device=x.device) * block_size).clamp(max=s) - torch.arange(n, device=x.device) * block_size
    return xh.view(b, h, n, block_size, d).sum(dim=3) / counts.to(xh.dtype)[:, None]


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, impl: Impl = "auto") -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) of every point.

    Args:
        x: (BH, N, D) points.
        centroids: (BH, C, D).
        impl: "auto" (Triton for CUDA tensors it takes, else torch), "torch" or "triton".
    Returns:
        int32 (BH, N); ties go to the lowest index.
    """
    helpers = _triton_helpers(impl, x, fits=centroids.dtype == x.dtype)
    if helpers is not None:
        return helpers.kmeans_assign(x, centroids)
    bh, n, _ = x.shape
    dtype = torch.promote_types(_compute_dtype(x), centroids.dtype)
    c = centroids.to(dtype)
    c_norm = (c * c).sum(dim=-1)[:, None, :]  # (BH, 1, C)
    out = torch.empty(bh, n, dtype=torch.int32, device=x.device)
    rows = max(1, KMEANS_CHUNK // max(1, bh * c.shape[1]))
    for start in range(0, n, rows):
        xc = x[:, start : start + rows].to(dtype)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 is the same for every centroid of a point.
        dist = torch.baddbmm(c_norm, xc, c.transpose(1, 2), alpha=-2.0)
        out[:, start : start + rows] = dist.argmin(dim=-1)
    return out


def kmeans_update(x: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """One k-means update: every centroid becomes the mean of the points assigned to it.

    Args:
        x: (BH, N, D) points.
        assign: integer (BH, N), each point's centroid in [0, C) (as `kmeans_assign` returns).
        centroids: (BH, C, D), the centroids `assign` was computed against; a centroid with no point keeps
            its old value (no empty cluster collapses to the origin).
    Returns:
        (BH, C, D) in centroids' dtype.
    """
    bh, _, d = x.shape
    dtype = torch.promote_types(_compute_dtype(x), centroids.dtype)
    index = assign.long()
    sums = torch.zeros(bh, centroids.shape[1], d, dtype=dtype, device=x.device)
    sums.scatter_add_(1, index[..., None].expand(-1, -1, d), x.to(dtype))
    counts = torch.zeros(bh, centroids.shape[1], dtype=dtype, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=dtype))
    means = sums / counts.clamp_min(1.0)[..., None]
    return torch.where(counts[..., None] > 0, means, centroids.to(dtype)).to(centroids.dtype)


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    block_size: int,
    scale: float | None = None,
    *,
    impl: Impl = "auto",
    chunk_rows: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention mass of every (query block, key block) pair given the rows' LSE.

    mass[b, h, i, j] = sum over rows r in block i and keys c in block j of exp(q_r . k_c * scale - lse_r).
    With the LSE of dense attention each row of blocks sums to the block's row count (divide by it for shares,
    as `patterns.block_mass.block_mass` does).

    Args:
        q, k: (B, S, H, D); k may have fewer heads (grouped-query attention), each serving H / H_k heads.
        lse: float32 (B, H, S), natural-log LSE of the scaled scores (as `kernels.run(..., return_lse=True)`
            returns it; -inf rows, skipped heads, carry no mass); None: dense attention's, computed on the way
            from the same chunks of scores (torch only), which costs far less than a separate LSE pass.
        block_size: tokens per block; the last block may be short. The Triton kernel takes 64 and 128.
        scale: softmax scale, default D ** -0.5.
        impl: "auto" (Triton for CUDA tensors it takes, with an LSE and block 64 or 128, else torch), "torch"
            or "triton".
        chunk_rows: query rows per step of the torch path (memory: B * H * chunk_rows * S floats), default
            as many as CHUNK_ELEMENTS scores hold, at most CHUNK_ROWS; rounded down to whole blocks (one at least).
        return_lse: with `lse` None, also return the LSE computed on the way, float32 (B, H, S).
    Returns:
        float32 (B, H, n, n) with n = ceil(S / block_size); with `return_lse`, (mass, lse).
    """
    b, s, h, d = q.shape
    if k.shape[2] != h:
        k = k.repeat_interleave(h // k.shape[2], dim=2)
    scale = d**-0.5 if scale is None else scale
    if impl == "triton" and lse is None:
        raise ShapeError("the Triton block_attention_mass reads a cached LSE; pass lse, or impl='torch'")
    if return_lse and lse is not None:
        raise ShapeError("return_lse returns the LSE computed on the way: pass lse=None with it")
    from_lse = lse is not None and block_size in (64, 128) and k.dtype == q.dtype
    helpers = _triton_helpers(impl, q, fits=from_lse)
    if helpers is not None:
        return helpers.block_attention_mass(q, k, lse, block_size, scale)
    n = -(-s // block_size)
    # The scale goes into q once, so each chunk of scores is written once by its matmul and then updated in place.
    qh, kt = q.transpose(1, 2).float() * scale, k.transpose(1, 2).float().transpose(-1, -2)
    out = torch.empty(b, h, n, n, dtype=torch.float32, device=q.device)
    found = torch.empty(b, h, s, dtype=torch.float32, device=q.device) if return_lse else None
    if chunk_rows is None:
        chunk_rows = min(CHUNK_ROWS, CHUNK_ELEMENTS // max(1, b * h * s))
    rows = max(1, chunk_rows // block_size) * block_size
    for start in range(0, s, rows):
        stop = min(s, start + rows)
        scores = qh[:, :, start:stop] @ kt  # (B, H, r, S)
        if lse is None:
            per_key_block, row_lse = softmax_block_sums(scores, block_size, n)
            if found is not None:
                found[:, :, start:stop] = row_lse
        else:  # a row that attended nothing has LSE -inf: +inf makes its mass 0 instead of inf
            row_lse = lse[:, :, start:stop].float()
            row_lse = row_lse.masked_fill(row_lse == float("-inf"), float("inf"))
            probs = scores.sub_(row_lse[..., None]).exp_()  # in place: the chunk's scores are its largest tensor
            per_key_block = block_sums(probs, block_size, n)
        first, last = start // block_size, -(-stop // block_size)
        padded = F.pad(per_key_block, (0, 0, 0, (last - first) * block_size - (stop - start)))
        out[:, :, first:last] = padded.view(b, h, last - first, block_size, n).sum(3)
    return (out, found) if return_lse else out


def softmax_block_sums(scores: torch.Tensor, block_size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax of each row of `scores` (..., S), summed over consecutive blocks of `block_size`: (..., n), with
    each row's log-sum-exp (...). Overwrites `scores` with exp(scores - row max).

    exp(x - max) is summed per block, then divided by the row's sum: the division touches the (..., n) block sums,
    not the (..., S) scores, and the row's LSE is max + log(sum) at no extra pass."""
    peak = scores.amax(dim=-1, keepdim=True)
    exps = scores.sub_(peak).exp_()
    total = exps.sum(dim=-1, keepdim=True)
    return block_sums(exps, block_size, n).div_(total), (peak + total.log())[..., 0]


def block_sums(x: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """x (..., S) summed over consecutive blocks of `block_size` into (..., n), the last block possibly short.

    Whole blocks are summed through a view and the short tail apart, rather than padding x: a pad would copy
    the chunk of scores, the largest tensor of a mass computation."""
    s = x.shape[-1]
    whole = s // block_size
    out = x.new_empty(*x.shape[:-1], n)
    out[..., :whole] = x[..., : whole * block_size].unflatten(-1, (whole, block_size)).sum(-1)
    if whole < n:
        out[..., whole] = x[..., whole * block_size :].sum(-1)
    return out


def top_p_select(scores: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Per row, the fewest entries, highest first, whose cumulative share of the row's total reaches p.

    An entry is kept when the entries ranked above it hold less than p of the row; the top entry is always
    kept (so is one of a row of zeros). Ties are ranked by index.

    Args:
        scores: (..., n), non-negative (block mass, similarities after softmax); rows need not sum to 1.
        p: the share to reach, in (0, 1]: a float, or a tensor broadcasting against scores' (..., 1), e.g.
            (B, H, 1, 1) for a share per head.
    Returns:
        bool (..., n).
    """
    values, index = scores.sort(dim=-1, descending=True, stable=True)
    values = values.to(_compute_dtype(values))
    cumulative = values.cumsum(dim=-1)
    before = cumulative - values  # share of the entries ranked above each one
    keep_sorted = before < (p - SHARE_TOL) * cumulative[..., -1:]
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, index, keep_sorted)


__all__ = ["block_attention_mass", "block_mean_pool", "block_sums", "kmeans_assign", "kmeans_update", "softmax_block_sums", "top_p_select"]
