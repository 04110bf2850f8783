"""Small Triton kernels the planners need on GPU: block mean-pooling, exact block attention mass from a
cached LSE, and one k-means assignment step. Planners call them through `sparse_dit.ops`, which holds the
torch version of each (every device) and runs these for the CUDA tensors they take; tests/test_ops.py checks
the two agree.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import ShapeError
from .block_sparse import LOG2E, accepts, heads_view, is_interpreted

_LOG2E = tl.constexpr(LOG2E)  # a jit function reads only constexpr globals
MASS_BLOCKS = (64, 128)  # one query block is one tile
POOL_CHUNK = 64  # rows summed per step of the pooling loop
KMEANS_BLOCK = 64  # points per program and centroids per step of the assignment loop


@triton.jit
def _block_mean_pool(X, Out, stride_xb, stride_xh, stride_xs, seq_len, heads, n_blocks, block_size,
                     CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Grid (n_blocks, B * H). X: (B, H, S, D) view with a unit last stride; Out: (B, H, n_blocks, D) fp32."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = X + (bh // heads).to(tl.int64) * stride_xb + (bh % heads).to(tl.int64) * stride_xh
    offs_d = tl.arange(0, HEAD_DIM)
    start = blk * block_size
    total = tl.zeros([HEAD_DIM], tl.float32)
    for chunk in range(0, block_size, CHUNK):
        offs = start + chunk + tl.arange(0, CHUNK)
        ok = (offs < seq_len) & (offs < start + block_size)
        x = tl.load(base + offs[:, None] * stride_xs + offs_d[None, :], mask=ok[:, None], other=0.0)
        total += tl.sum(x.to(tl.float32), 0)
    count = tl.minimum(seq_len - start, block_size)  # the ragged last block averages its real rows only
    tl.store(Out + (bh * n_blocks + blk).to(tl.int64) * HEAD_DIM + offs_d, total / count)


@triton.jit
def _block_attention_mass(Q, K, Lse, Out, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                          seq_len, heads, n_blocks, scale_log2,
                          BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (n_blocks, B * H): one query block against every key block.

    Q, K: (B, H, S, D) views with a unit last stride; Lse: (B, H, S) fp32; Out: (B, H, n, n) fp32.
    """
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = i * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    rows_ok = offs_m < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=rows_ok[:, None], other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * seq_len + offs_m, mask=rows_ok, other=float("inf"))
    # A row with LSE -inf attended nothing (a skipped head): it carries no mass, not inf.
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    out_row = Out + (bh.to(tl.int64) * n_blocks + i) * n_blocks
    for j in range(0, n_blocks):
        offs_n = j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        cols_ok = offs_n < seq_len
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=cols_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
        p = tl.where(cols_ok[None, :], p, 0.0)
        tl.store(out_row + j, tl.sum(tl.sum(p, 1), 0))


@triton.jit
def _kmeans_assign(X, C, Out, stride_xb, stride_xn, stride_cb, stride_cc, n_points, n_centroids,
                   BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (cdiv(N, BLOCK), B * H). X: (BH, N, D), C: (BH, C, D) with unit last strides; Out: int32 (BH, N)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    points_ok = offs_n < n_points
    x = tl.load(X + bh * stride_xb + offs_n[:, None] * stride_xn + offs_d[None, :], mask=points_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    best = tl.full([BLOCK], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n_centroids, BLOCK):
        offs_c = start + tl.arange(0, BLOCK)
        c_ok = offs_c < n_centroids
        c = tl.load(C + bh * stride_cb + offs_c[:, None] * stride_cc + offs_d[None, :], mask=c_ok[:, None], other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        c_norm = tl.sum(c.to(tl.float32) * c.to(tl.float32), 1)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 is the same for every centroid of a point.
        dist = c_norm[None, :] - 2.0 * tl.dot(x, tl.trans(c))
        dist = tl.where(c_ok[None, :], dist, float("inf"))
        chunk_best = tl.min(dist, 1)
        chunk_idx = tl.argmin(dist, 1).to(tl.int32) + start
        better = chunk_best < best  # strict: ties keep the lower index, as torch.argmin does
        best = tl.where(better, chunk_best, best)
        best_idx = tl.where(better, chunk_idx, best_idx)
    tl.store(Out + bh * n_points + offs_n, best_idx, mask=points_ok)


def mass_num_warps(block_size: int) -> int:
    """Warps of `_block_attention_mass`: 8 for a 128-row query block, as the attention kernel's 128-row tiles."""
    return 8 if block_size == 128 else 4


def _check(x: torch.Tensor, block_size: int | None = None) -> None:
    if not accepts(x.shape[-1], x.dtype):
        raise ShapeError(
            f"the Triton helpers do not take head dim {x.shape[-1]} in {x.dtype} here (see block_sparse.accepts); "
            "use the torch path for it"
        )
    if block_size is not None and block_size not in MASS_BLOCKS:
        raise ShapeError(f"block_attention_mass takes block sizes {MASS_BLOCKS}, got {block_size}")


def _upcast(x: torch.Tensor) -> bool:
    """The interpreter computes bf16 wrongly: the kernels then convert every load to fp32."""
    return is_interpreted() and x.dtype == torch.bfloat16


def block_mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every fixed block of tokens.

    Args:
        x: (B, S, H, D), head dim and dtype as `block_sparse.accepts`.
        block_size: tokens per block; the last block may be shorter and is averaged over its real length.
    Returns:
        float32 (B, H, ceil(S / block_size), D).
    """
    bsz, seq, heads, dim = x.shape
    _check(x)
    xh = heads_view(x)
    n = triton.cdiv(seq, block_size)
    out = torch.empty(bsz, heads, n, dim, dtype=torch.float32, device=x.device)
    _block_mean_pool[(n, bsz * heads)](xh, out, *xh.stride()[:3], seq, heads, n, block_size, CHUNK=POOL_CHUNK,
                                       HEAD_DIM=dim)
    return out


def block_attention_mass(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Exact attention mass of every (query block, key block) pair given the rows' LSE.

    mass[b, h, i, j] = sum over rows r in block i and columns c in block j of exp(q_r . k_c * scale - lse_r).
    With the LSE of dense attention each row of blocks sums to the block's row count.

    Args:
        q, k: (B, S, H, D), head dim and dtype as `block_sparse.accepts`.
        lse: float32 (B, H, S), natural-log LSE of the scaled scores (as `kernels.run(..., return_lse=True)`).
        block_size: one of MASS_BLOCKS; the last block may be short.
        scale: softmax scale, default D ** -0.5.
    Returns:
        float32 (B, H, n, n) with n = ceil(S / block_size).
    """
    bsz, seq, heads, dim = q.shape
    _check(q, block_size)
    scale = dim**-0.5 if scale is None else scale
    qh, kh = heads_view(q), heads_view(k)
    n = triton.cdiv(seq, block_size)
    out = torch.empty(bsz, heads, n, n, dtype=torch.float32, device=q.device)
    _block_attention_mass[(n, bsz * heads)](
        qh, kh, lse.float().contiguous(), out, *qh.stride()[:3], *kh.stride()[:3], seq, heads, n, scale * LOG2E,
        BLOCK_SIZE=block_size, HEAD_DIM=dim, UPCAST=_upcast(q), num_warps=mass_num_warps(block_size),
    )
    return out


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) of every point.

    Args:
        x: (BH, N, D) points, head dim and dtype as `block_sparse.accepts`.
        centroids: (BH, C, D), same dtype.
    Returns:
        int32 (BH, N); ties go to the lowest index.
    """
    bh, n, dim = x.shape
    _check(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    centroids = centroids if centroids.stride(-1) == 1 else centroids.contiguous()
    out = torch.empty(bh, n, dtype=torch.int32, device=x.device)
    _kmeans_assign[(triton.cdiv(n, KMEANS_BLOCK), bh)](
        x, centroids, out, x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1), n,
        centroids.shape[1], BLOCK=KMEANS_BLOCK, HEAD_DIM=dim, UPCAST=_upcast(x),
    )
    return out
