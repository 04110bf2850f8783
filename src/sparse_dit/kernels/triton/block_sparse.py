"""Block-sparse FlashAttention-2 forward in Triton: fixed blocks, variable blocks, int8 Q·K.

One program computes one tile of query rows of one (batch row, head) against the key blocks its query
block keeps (the plan's CSR row), with an online softmax in fp32 and `tl.dot` for both products.

- Fixed blocks of 64 or 128 tokens: tile t is query block t and one flat loop walks the kept key blocks
  in BLOCK_N chunks, so the compiler can pipeline the loads.
- Variable blocks (SVG2 clusters, or fixed blocks of another size): a precomputed work list cuts each query
  block into tiles of at most BLOCK_M rows; each kept key block [start, end) is walked in BLOCK_N chunks
  with masks. Blocks are never padded to a fixed size.
- int8 (and int4) Q·K: Q and K arrive as int8 with one scale per block; Q·K is an int8 dot with int32
  accumulation, dequantised by scale_q * scale_k; P·V stays in the input dtype.

Written with plain pointer arithmetic (block pointers are removed in triton 3.9). Under TRITON_INTERPRET=1
the same code runs on CPU tensors; the interpreter computes bf16 arithmetic wrongly, so the launcher sets
UPCAST there and every bf16 load is converted to fp32 at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from ...plan import AttentionPlan
from ..capabilities import TRITON_GPU_DTYPES as GPU_DTYPES
from ..capabilities import TRITON_GPU_HEAD_DIMS as GPU_HEAD_DIMS
from ..capabilities import TRITON_INTERPRETER_DTYPES as INTERPRETER_DTYPES
from ..capabilities import TRITON_INTERPRETER_HEAD_DIMS as INTERPRETER_HEAD_DIMS
from ..layout import finish, permute
from ..quant import quantize_blocks
from .csr import block_bounds, plan_csr, query_tiles

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # a jit function reads only constexpr globals
BLOCK_N = 64  # key rows per chunk in both variants
FIXED_BLOCKS = (64, 128)  # block sizes of the fixed-block variant; other sizes run as variable blocks
# The head dims and dtypes the kernels take (GPU_*, INTERPRETER_*) are rows of `capabilities.TABLE`.


@triton.jit
def _attend_chunk(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start, end, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update of one query tile with keys [start, min(start + BLOCK_N, end)).

    Scores are kept in the log2 domain (qk_scale includes log2(e)) so the exponentials are exp2.
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_n < end
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    if QUANT:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * qk_scale
    else:
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    # A row's first chunk always holds a valid key (a kept block starts inside the sequence), so m_new is
    # finite from then on and exp2(m_i - m_new) never computes -inf - -inf; later all-masked chunks add 0.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, Lse, QScale, KScale, RowPtr, Cols, Tiles, KBounds,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    seq_len, heads, plan_batch, plan_heads, n_qblocks, n_kblocks, n_tiles, scale_log2,
    BLOCK_SIZE: tl.constexpr, VARIABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (query tiles, B * H). Q, K, V, Out: (B, H, S, D) views with a unit last stride; Lse: (B, H, S).

    QScale (B * H, nq) and KScale (B * H, nk) are read only with QUANT; Tiles (plan rows, n_tiles, 3) and
    KBounds (plan rows, nk + 1) only with VARIABLE.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    p = (b % plan_batch) * plan_heads + h % plan_heads

    if VARIABLE:
        tile = Tiles + (p * n_tiles + pid_m) * 3
        qblock = tl.load(tile)
        q_start = tl.load(tile + 1)
        q_end = tl.where(qblock >= 0, tl.load(tile + 2), q_start)  # unused tiles compute and store nothing
        qblock = tl.maximum(qblock, 0)
    else:
        qblock = pid_m  # BLOCK_M == BLOCK_SIZE: one tile per query block
        q_start = pid_m * BLOCK_M
        q_end = tl.minimum(q_start + BLOCK_M, seq_len)
    row = p * n_qblocks + qblock
    lo = tl.load(RowPtr + row)
    hi = tl.where(q_end > q_start, tl.load(RowPtr + row + 1), lo)

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_ok = offs_m < q_end
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=rows_ok[:, None], other=0)
    if UPCAST and not QUANT:
        q = q.to(tl.float32)
    qk_scale = scale_log2
    if QUANT:
        qk_scale = scale_log2 * tl.load(QScale + bh * n_qblocks + qblock)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if VARIABLE:
        for idx in range(lo, hi):
            kblock = tl.load(Cols + idx)
            k_start = tl.load(KBounds + p * (n_kblocks + 1) + kblock)
            k_end = tl.load(KBounds + p * (n_kblocks + 1) + kblock + 1)
            chunk_scale = qk_scale
            if QUANT:
                chunk_scale = qk_scale * tl.load(KScale + bh * n_kblocks + kblock)
            for start in range(k_start, k_end, BLOCK_N):
                acc, m_i, l_i = _attend_chunk(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start,
                                              k_end, chunk_scale, BLOCK_N, HEAD_DIM, QUANT, UPCAST)
    else:
        # One flat loop over (kept block, chunk) pairs: a single loop is what triton software-pipelines.
        CHUNKS: tl.constexpr = BLOCK_SIZE // BLOCK_N
        for t in range(lo * CHUNKS, hi * CHUNKS):
            kblock = tl.load(Cols + t // CHUNKS)
            chunk_scale = qk_scale
            if QUANT:
                chunk_scale = qk_scale * tl.load(KScale + bh * n_kblocks + kblock)
            start = kblock * BLOCK_SIZE + (t % CHUNKS) * BLOCK_N
            acc, m_i, l_i = _attend_chunk(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start,
                                          seq_len, chunk_scale, BLOCK_N, HEAD_DIM, QUANT, UPCAST)

    # A row with no key block (a skipped head) gets zeros and an LSE of -inf instead of 0 / 0.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=rows_ok[:, None])
    tl.store(Lse + bh.to(tl.int64) * seq_len + offs_m, lse, mask=rows_ok)


@dataclass(frozen=True)
class LaunchConfig:
    """How `_block_sparse_fwd` is launched for one plan and input: its constexprs and launch options."""

    variable: bool
    block_m: int
    head_dim: int
    quant: bool
    upcast: bool
    block_size: int  # BLOCK_SIZE; variable plans pass BLOCK_N, unused there, so they share one compile
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict:
        """The kernel's constexpr arguments."""
        return dict(BLOCK_SIZE=self.block_size, VARIABLE=self.variable, BLOCK_M=self.block_m, BLOCK_N=BLOCK_N,
                    HEAD_DIM=self.head_dim, QUANT=self.quant, UPCAST=self.upcast)


def launch_config(plan: AttentionPlan, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The kernel variant and launch shape for this plan; tests/test_triton_aot.py compiles every value
    this returns on GPU for sm_80 and sm_90 and checks spills and shared memory."""
    fixed = plan.q_bounds is None and plan.k_bounds is None and plan.block_size in FIXED_BLOCKS
    block_m = plan.block_size if fixed else 64
    return LaunchConfig(
        variable=not fixed, block_m=block_m, head_dim=head_dim, quant=plan.quant != "none",
        upcast=is_interpreted() and dtype == torch.bfloat16, block_size=plan.block_size if fixed else BLOCK_N,
        num_warps=8 if block_m == 128 else 4, num_stages=3,
    )


def is_interpreted() -> bool:
    """Whether the kernels were built for the CPU interpreter (TRITON_INTERPRET=1 when this module loaded)."""
    return not isinstance(_block_sparse_fwd, triton.runtime.JITFunction)


def accepts(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this head dim and dtype here (on GPU: what the AOT test checks)."""
    if is_interpreted():
        return head_dim in INTERPRETER_HEAD_DIMS and dtype in INTERPRETER_DTYPES
    return head_dim in GPU_HEAD_DIMS and dtype in GPU_DTYPES


def heads_view(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, S, D) view whose last dimension is contiguous, as the kernels index it."""
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def launcher(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float | None = None,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Everything `block_sparse_attention` does before the kernel, done now; returns the launch alone.

    The callable launches the kernel and returns its output (B, H, S, D) and LSE (B, H, S) as the kernel writes
    them, in the plan's token order, before `finish`. Calling it again overwrites the same buffers: what
    `sparse-dit bench` times as the bare kernel.
    """
    bsz, seq, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    cfg = launch_config(plan, dim, q.dtype)
    qh, kh, vh = permute(plan, *(heads_view(x) for x in (q, k, v)))
    q_scale = k_scale = None
    if plan.quant != "none":
        (qh, q_scale), (kh, k_scale) = quantize_blocks(qh, plan, "q"), quantize_blocks(kh, plan, "k")
    csr = plan_csr(plan, q.device)
    nq, nk = plan.num_blocks
    if cfg.variable:
        tiles, k_bounds = query_tiles(plan, q.device, cfg.block_m), block_bounds(plan, "k", q.device)
        n_tiles = tiles.shape[1]
    else:
        tiles = k_bounds = csr.row_ptr  # never read without VARIABLE
        n_tiles = triton.cdiv(seq, cfg.block_m)
    out = torch.empty(bsz, seq, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device)
    kernel = _block_sparse_fwd[(n_tiles, bsz * heads)]
    args = (qh, kh, vh, out, lse, lse if q_scale is None else q_scale, lse if k_scale is None else k_scale,
            csr.row_ptr, csr.cols, tiles, k_bounds,
            *qh.stride()[:3], *kh.stride()[:3], *vh.stride()[:3], *out.stride()[:3],
            seq, heads, csr.plan_batch, csr.plan_heads, nq, nk, n_tiles, scale * LOG2E)
    options = dict(**cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def launch() -> tuple[torch.Tensor, torch.Tensor]:
        kernel(*args, **options)
        return out, lse

    return launch


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention as the plan prescribes, with the block-sparse Triton kernel.

    Args:
        q, k, v: (B, S, H, D) with `accepts(D, dtype)`: fp16 or bf16 and D in {64, 128} on CUDA; under
            TRITON_INTERPRET=1 CPU tensors, also fp32 and D in {16, 32}.
        plan: fixed or variable blocks, any token order, head modes and quant mode, broadcastable to (B, H).
        scale: softmax scale, default D ** -0.5.
    Returns:
        (B, S, H, D) in q's dtype, and with `return_lse` the natural-log LSE of the scaled scores,
        float32 (B, H, S) (-inf for skipped heads).
    """
    out, lse = launcher(q, k, v, plan, scale=scale)()
    out, lse = finish(plan, out, lse if return_lse else None)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
