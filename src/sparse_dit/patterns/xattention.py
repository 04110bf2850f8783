"""`xattention`: XAttention (arXiv 2503.16428), key blocks scored by strided antidiagonal sums of Q·K.

XAttention estimates each block's share of attention from the antidiagonals of its Q·K tile: cut the S x S score
map into stride x stride tiles and sum, in each tile, the `stride` entries of its antidiagonal (row offset r,
column offset stride - 1 - r). Every row and every column of a tile crosses its antidiagonal once, so the sum sees
every query and every key, which is why it catches both vertical and slash patterns that a diagonal or a pooled
estimate would miss. Vectorised, the antidiagonal sums are one small matmul (the paper's reshape trick):

    A[a, c] = sum_j q[a * stride + (stride - 1 - j)] . k[c * stride + j]
            = (q rows of group a, reversed, concatenated) . (k rows of group c, concatenated)

a (S / stride) x (S / stride) product over stride * D features, S^2 D / stride multiply-adds: 1 / (2 * stride) of
dense attention's 2 S^2 D (1/16 at the paper's stride 8). As in the reference implementation the sums are scaled
like attention logits averaged over the antidiagonal (scale / stride), softmax-normalised along each row of
groups, and summed per (query block, key block): each query block's scores then sum to its number of groups,
and are ranked as shares of that.

Per query block, key blocks are kept in descending score until their cumulative share reaches `threshold`
(default 0.9, the paper's first video setting), or a fixed share of them (`density`), plus the text blocks and its
diagonal (`keep_text_and_diagonal`). It plans every other sparse step by default (`replan_every=2`): the scores
move little from one step to the next. Its planning time is in `AttentionStats.plan_seconds` (the eval report's
"plan %"); `SiteState.extra` counts the plans in `"selections"` and the multiply-adds of scoring and of the dense
attention it replaces in `"selection_flops"` and `"dense_flops"`.

**Stride 4 by default, not the paper's 8.** On the demo model at 32 frames (8192 tokens, 20 steps, 3 prompts,
`sparse-dit eval` against dense) stride 8 ranks blocks too far from their exact mass to pay:
- stride 8, threshold 0.95: density 0.267, 35.5 dB PSNR against random blocks' 32.2 at that density (+3.2 dB),
  1.47x end to end; at threshold 0.92 it is faster (0.222, 1.57x) but only 1.8 dB above random;
- stride 4, threshold 0.9: 0.214, 35.0 dB against 30.9 (+4.1 dB; `oracle` 40.4), 1.54x end to end, planning
  10.8% of the sparse attention time (medians of 3 runs after a warm-up; docs/benchmarks.md).
Keeping each query block's top 20% of key blocks, the stride-4 scores hold 0.911, 0.724, 0.876 and 0.905 of
the exact attention mass at four sites of that run, stride 8's 0.883, 0.664, 0.842 and 0.876, the ideal choice
0.923, 0.734, 0.885 and 0.916. Stride 4 costs twice the multiply-adds (1/8 of dense attention's) and four times
the softmax. The paper's stride is one option away: `stride=8, threshold=0.95`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import SparseAttentionConfig
from ..errors import ConfigError, ShapeError
from ..ops import softmax_block_sums
from ..plan import AttentionPlan
from ..state import SiteState
from .adaspa import ThresholdOrDensity, check_budget, check_scale, count_selection, select_by_count, select_by_threshold
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method

# Most elements of one chunk of antidiagonal scores in `antidiagonal_block_scores`: 1 M floats, 4 MB, so a chunk's
# product, softmax and sums stay in cache; 32 M took 2.6x as long at stride 4 and 8192 tokens on 2 cores.
SCORE_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class XAttentionConfig(SparseAttentionConfig, ThresholdOrDensity):
    """Config of the `xattention` method.

    Attributes:
        threshold: each query block keeps the fewest key blocks, in descending antidiagonal score, whose cumulative
            share of its scores reaches this value; 1.0 keeps every block. None with `density` None means
            `default_threshold`, 0.9 (the paper's video settings are 0.9 and 0.95).
        density: instead, each query block keeps max(1, round(density * n)) of its n key blocks, its diagonal block
            among them. Pass either `threshold` or `density`, not both.
        stride: antidiagonal stride in tokens, default 4 (the paper's 8 ranked blocks worse on the demo model,
            module docstring); `block_size` must be a multiple of it. 1 scores every entry of Q·K (exact block
            sums of the softmax, at the cost of dense attention).
        scale: the softmax scale of the model's attention, default D ** -0.5.
        replan_every: as for every dynamic method; default 2 here (plan at every other sparse step), which
            halves the scoring time at no measured cost in quality.
    """

    method: ClassVar[str] = "xattention"
    default_threshold: ClassVar[float] = 0.9
    replan_every: int = 2
    threshold: float | None = None
    density: float | None = None
    stride: int = 4
    scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget("xattention", self.threshold, self.density)
        check_scale("xattention", self.scale)
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ConfigError(f"xattention: stride={self.stride!r} must be an int >= 1 (default 4; the paper uses 8)")
        if self.block_size % self.stride:
            raise ConfigError(f"xattention: block_size={self.block_size} must be a multiple of stride={self.stride}, so "
                              "every block holds whole antidiagonal groups; pick e.g. stride=8 with block_size=64")


def _grouped(x: torch.Tensor, stride: int, reverse: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, G, stride * D) in `dtype`, G = ceil(S / stride): each group's rows concatenated
    (in reverse order within the group when `reverse`); the sequence is zero-padded to whole groups."""
    b, s, h, d = x.shape
    g = -(-s // stride)
    xh = F.pad(x.transpose(1, 2).to(dtype), (0, 0, 0, g * stride - s)).view(b, h, g, stride, d)
    if reverse:
        xh = xh.flip(3)
    return xh.reshape(b, h, g, stride * d)


def antidiagonal_sums(q: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """Sum of the antidiagonal of every stride x stride tile of Q·K (unscaled).

    A[b, h, a, c] = sum over j in [0, stride) of q[b, a * stride + stride - 1 - j, h] . k[b, c * stride + j, h],
    positions past S counting as zero vectors.

    Args:
        q, k: (B, S, H, D); k may have fewer heads (grouped-query attention).
        stride: tile size in tokens.
    Returns:
        float32 (B, H, G, G), G = ceil(S / stride).
    """
    h = q.shape[2]
    if k.shape[2] != h:
        k = k.repeat_interleave(h // k.shape[2], dim=2)
    return _grouped(q, stride, reverse=True) @ _grouped(k, stride, reverse=False).transpose(-1, -2)


def product_dtype(device: torch.device) -> torch.dtype:
    """The dtype the planner multiplies the grouped q and k in: bfloat16 on a CPU with native bf16 dot products
    (AVX512-BF16 or AMX, through oneDNN), where the product runs 2.3x as fast as in float32 and its share of a plan
    drops from 70% to 50% (stride 8, 8192 tokens); float32 elsewhere. The softmax and the sums stay float32."""
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int,
                              scale: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """XAttention's score of every (query block, key block): the softmax of the scaled antidiagonal sums along each
    row of groups, summed over the block pair.

    score[b, h, i, j] = sum over query groups a in block i, key groups c in block j of
    softmax_c(A[b, h, a, :] * scale / stride)[c], with A from `antidiagonal_sums`; each row of blocks sums to the
    number of query groups in block i. Computed a chunk of query blocks at a time (the scores of one chunk
    stay under SCORE_CHUNK_ELEMENTS floats).

    Args:
        q, k: (B, S, H, D); k may have fewer heads.
        block_size: tokens per block, a multiple of `stride`; the last block may be short.
        stride: antidiagonal tile size in tokens.
        scale: softmax scale, default D ** -0.5.
        dtype: dtype of the grouped q . k product (`product_dtype`); the softmax and the sums are float32.
    Returns:
        float32 (B, H, n, n), n = ceil(S / block_size).
    """
    if block_size % stride:
        raise ShapeError(f"block_size={block_size} must be a multiple of stride={stride}")
    b, s, h, d = q.shape
    if k.shape[2] != h:
        k = k.repeat_interleave(h // k.shape[2], dim=2)
    scale = (d**-0.5 if scale is None else scale) / stride
    n, per_block = -(-s // block_size), block_size // stride
    g = -(-s // stride)
    # The scale goes into q once (a power of two at D = 64 and stride 4 or 8, exact in bfloat16). Each chunk's
    # product and its float32 copy reuse two buffers, updated in place: a fresh multi-MB tensor per chunk costs
    # its page faults, and a softmax from bfloat16 took 2x as long as the in-place exp of
    # `softmax_block_sums`.
    qg = _grouped(q, stride, True, dtype).mul_(scale)
    kg = _grouped(k, stride, False, dtype).transpose(-1, -2)
    out = torch.empty(b, h, n, n, dtype=torch.float32, device=q.device)
    blocks = max(1, SCORE_CHUNK_ELEMENTS // max(1, b * h * g * per_block))  # query blocks per chunk
    size = b * h * min(g, blocks * per_block) * g
    product = torch.empty(size, dtype=dtype, device=q.device)
    logits = product if dtype == torch.float32 else torch.empty(size, dtype=torch.float32, device=q.device)
    for first in range(0, n, blocks):
        last = min(n, first + blocks)
        rows = qg[:, :, first * per_block : last * per_block]  # the last chunk may hold fewer groups
        shape = (b, h, rows.shape[2], g)
        x = torch.matmul(rows, kg, out=product[: math.prod(shape)].view(shape))
        if x.dtype != torch.float32:
            x = logits[: math.prod(shape)].view(shape).copy_(x)
        per_key = softmax_block_sums(x, per_block, n)[0]  # (B, H, r, n): each row of groups' softmax per key block
        if rows.shape[2] != (last - first) * per_block:  # zero rows past S add nothing to the sums
            per_key = F.pad(per_key, (0, 0, 0, (last - first) * per_block - rows.shape[2]))
        out[:, :, first:last] = per_key.view(b, h, last - first, per_block, n).sum(3)
    return out


@register_method
class XAttentionPlanner(Planner):
    """Scores key blocks by strided antidiagonal sums of Q·K at every plan, keeps them to a cumulative threshold."""

    name = "xattention"
    config_cls = XAttentionConfig
    description = "XAttention: key blocks scored by strided antidiagonal sums of Q·K, kept to a cumulative threshold"

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        config = self.config
        bs = config.block_size
        scores = antidiagonal_block_scores(q, k, bs, config.stride, config.scale, product_dtype(q.device))
        threshold = config.effective_threshold
        if threshold is not None:
            selected = select_by_threshold(scores, threshold)
        else:
            n = scores.shape[-1]
            selected = select_by_count(scores, torch.tensor([[max(1, min(n, round(config.density * n)))]]))
        layout = keep_text_and_diagonal(selected, ctx, bs)
        plan = AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs)
        count_selection(state)
        b, s, h, d = q.shape
        g = -(-s // config.stride)
        state.extra["selection_flops"] = state.extra.get("selection_flops", 0) + b * h * g * g * config.stride * d
        state.extra["dense_flops"] = state.extra.get("dense_flops", 0) + 2 * b * h * s * s * d
        return plan


__all__ = ["XAttentionConfig", "XAttentionPlanner", "antidiagonal_block_scores", "antidiagonal_sums", "product_dtype"]
