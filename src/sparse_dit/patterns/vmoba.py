"""`vmoba`: VMoBA, Video Mixture of Block Attention (arXiv 2506.23858; KwaiVGI/VMoBA, FastVideo's `VMOBA_ATTN`).

Per layer, the video tokens are cut into key chunks whose shape cycles with the layer index
(`cycle`; the paper's layer-recurrent partition is 1-D, 2-D, 3-D, the default here 3-D only, see below):

- "1d": groups of whole frames (`chunk_1d` frames x H x W);
- "2d": spatial tiles over all frames (F x `chunk_2d` = (h, w));
- "3d": cubes (`chunk_3d` = (f, h, w)).

Every chunk's key is the mean of its keys. A query block scores each chunk by q_bar . k_bar (its mean query
against the chunk's mean key, which is the mean of VMoBA's per-query gate scores over the block), keeps its
own chunk, and adds chunks in one of three ways:

- `selection="threshold"`, `threshold_scope="query"` (the reference code's default `query_head`, and the
  anchor's Wan config): the scores of the row are min-max normalised to [0, 1]; its own chunk counts first,
  then the others in descending score, and a chunk is added while the chunks already kept hold less than
  `threshold` of the row's normalised total (so the chunk that crosses the threshold is kept).
- `selection="threshold"`, `threshold_scope="head"` (the paper's global selection, `head_global`): the same
  over all (query block, chunk) pairs of a head at once, min-max normalised over the head, each pair weighted by
  its query tokens, every query block's own chunk counted first.
- `selection="topk"` (MoBA's local top-k, which the paper's training-free runs used): each query block keeps
  its own chunk and the `topk - 1` highest-scoring others.

A `threshold` of 1 keeps every chunk (the lowest chunk of a min-max normalised row weighs 0, so "until the
share reaches 1" would otherwise stop one chunk short of dense); a row whose chunks all score the same counts
every chunk as 1. With `density` set, the same rankings are kept up to a budget instead: per head, the
(query block, chunk) pairs are taken in the order of the selection rule (query threshold: by the share kept
before them, i.e. a per-head threshold; head threshold: by normalised score; top-k: by rank in the row, then
score, i.e. a fractional k) until the plan computes at least `density` of the attention map.

Chunk sizes: a float f in (0, 1] is max(1, round(f * L)) tokens of an axis of L tokens (relative to the grid),
an int is tokens (clipped to the axis). The last chunk of an axis that the size does not divide is short.
`PAPER_OPTIONS` is the paper's setting: layers cycling 1-D, 2-D, 3-D over its Wan 2.1 480p partition (Table 4,
grid 21 x 30 x 52): 1-D 3 frames (7 chunks), 2-D 5 x 13 (24 chunks), 3-D 7 x 5 x 13 (72 chunks), as
fractions 1/7; (1/6, 1/4); (1/3, 1/6, 1/4) (the defaults of `chunk_1d` and `chunk_2d`), with the anchor's
`threshold` 0.25 and query scope (FastVideo `wan_1.3B_77_480_832.json`: `moba_threshold 0.25`, the default
`threshold_type`). The default `topk` is the paper's training-free 480p setting, 2 | 6 | 18 of 7 | 24 | 72
chunks, as fractions of the chunk count (2/7, 1/4, 1/4), k counting the query's own chunk. The anchor's own
chunks are finer (2 frames; 3 x 4; 4 x 6 x 4 tokens, top-k 3 | 20 | 15): `chunk_1d=2, chunk_2d=(3, 4),
chunk_3d=(4, 6, 4), topk=(3, 20, 15)` gives them in tokens. The anchor keeps the first 12 of 50 steps dense and
the paper 25%; `dense_steps` keeps the package default (0.2) so methods compare under one policy.

Why the default chunks are not the paper's: 3-D chunks of 4 x 4 x 4 tokens (one 64-token block each) in every
layer, at the anchor's threshold 0.25. The paper's gate scores a chunk by its mean key alone, and 1-D chunks
(whole frames) and 2-D ones (tubes through every frame) average keys over regions that a query block of this
model's attention treats unevenly. On the demo model at 32 frames (8192 tokens, 20 steps, 3 prompts,
`sparse-dit eval` against dense) the paper's setting keeps 0.225 of the map at 29.1 dB PSNR, 2.6 dB below random
blocks at the same density (31.7), and its top-k variant 0.274 at 31.1 dB, 2.0 below random (33.1). Per
attention call (relative error of the output against dense, one prompt, steps 4-19) the 1-D and 2-D layers'
diffuse heads come out 2-6 dB worse than random blocks at their density, the 3-D layers' 4-10 dB better. On the
cubes, threshold 0.25 (the default) keeps 0.154 of the map at 34.3 dB against random's 30.0 (+4.4 dB), 1.89x
faster than dense end to end; 0.3 keeps 0.188 at 35.8 against 31.0 (+4.8 dB, 1.67x); 0.4 keeps 0.260 at 38.6
against 32.8 (+5.8 dB, 1.44x, short of 1.5x); selection is 4-7% of the sparse attention time. Threshold
against top-k on the same cubes: `selection="topk", topk=0.25` keeps 0.250 at 38.0 dB against random's 32.6
(+5.4 dB), so at matched density the threshold rule is ahead by 0.4 dB over random at 0.01 more density, a tie
within three prompts' noise; on the paper's cycle top-k was the less bad (-2.0 against -2.6 dB), at 0.05 more
density. The cube's sizes are ints, not fractions, so a cube stays
one block at every resolution (more chunks on larger grids: the score matrix is blocks x blocks).

Blocks, and why fixed ones. VMoBA's chunks are not contiguous in raster order (a 2-D tile over all frames is
F x h strips). The plan therefore reorders the video tokens chunk by chunk (chunks in raster order of the chunk
grid, tokens f-major inside each, as `process_moba_input` does) with its text tokens after them, through the
plan's `order`, and cuts that order into fixed blocks of `block_size`. Each video block belongs to the chunk of
its middle token, so a chunk is a run of whole blocks ("snapped" chunks); its mean key is taken over the tokens
of those blocks. Where a chunk's token count is a multiple of the block size (the demo grid's 1-D chunks: 2 x
16 x 16 = 8 blocks) this is exact; elsewhere a chunk boundary moves by less than half a block, and chunks
smaller than half a block can merge into a neighbour. Fixed blocks run on the CPU gather path
(`kernels.gather`), which batches query blocks with the same kept count into few SDPA calls. The alternatives
cost more: variable blocks (the chunks as key blocks, query blocks of `block_size` inside them) select exact
chunks but the variable-block CPU path makes one SDPA call per (batch row, head, query block); and mapping
chunk choices back to raster-order blocks computes every block a chosen chunk touches, several times the
chunk's own area for 2-D and 3-D chunks (a 2-D chunk is F x h strips of w tokens in raster order). A 1-D
partition with no text before the video is the raster order itself, and its plan has no `order`.

Text tokens (joint attention) keep the rules of `keep_text_and_diagonal`: blocks holding a text token (and, in
the reordered sequence, the block shared by the last video tokens and the first text tokens) are dense rows and
columns, so every video query attends all text and text queries attend everything; those blocks belong to no
chunk. Selection (two index_selects and a block mean of q and k, a (blocks x chunks) score matrix, one sort per
row or head) is O(S * H * D + n * C * (D + log C)), vectorised with no loop over blocks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

import torch
import torch.nn.functional as F

from ..config import SparseAttentionConfig, is_fraction, is_int
from ..errors import ConfigError
from ..ops import SHARE_TOL, block_mean_pool
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method
from .tiling import tile_positions

Kind = Literal["1d", "2d", "3d"]
KINDS: tuple[str, ...] = ("1d", "2d", "3d")
Size = Union[int, float]

_SITE_LAYER = re.compile(r"\.(\d+)\.")  # "transformer.blocks.12.attn1" -> 12, the module list index


def _check_sizes(name: str, value: Any, length: int) -> tuple:
    values = (value,) if length == 1 and not isinstance(value, (tuple, list)) else value
    ok = isinstance(values, (tuple, list)) and len(values) == length and all(
        (is_int(v) and v >= 1) or is_fraction(v) for v in values)
    if not ok:
        what = "an int >= 1 (tokens) or a float in (0, 1] (a fraction of the axis)"
        expected = what if length == 1 else f"{length} values, each {what}"
        raise ConfigError(f"vmoba {name}={value!r} is invalid: expected {expected}")
    return tuple(values)


def axis_extent(size: Size, length: int) -> int:
    """Tokens per chunk along an axis of `length` tokens: an int is clipped to the axis, a fraction f gives
    max(1, round(f * length)) (halves round up)."""
    if is_int(size):
        return min(size, length)
    return min(length, max(1, math.floor(size * length + 0.5)))


# The paper's layer-recurrent partition at its Wan 2.1 480p chunk counts and the anchor's threshold:
# `enable_sparse_attention("vmoba", **PAPER_OPTIONS)`. The defaults differ (module docstring).
PAPER_OPTIONS: dict[str, Any] = {"cycle": ("1d", "2d", "3d"), "chunk_1d": 1 / 7, "chunk_2d": (1 / 6, 1 / 4),
                                 "chunk_3d": (1 / 3, 1 / 6, 1 / 4), "threshold": 0.25}


@dataclass(frozen=True)
class VmobaConfig(SparseAttentionConfig):
    """Config of the `vmoba` method (see the module docstring for the rules).

    Attributes:
        selection: "threshold" (cumulative normalised similarity) or "topk" (a fixed count per query block).
        threshold: the cumulative share of normalised similarity to reach, in (0, 1]; 1 keeps every chunk.
            Default 0.25, the anchor's, with the default cubes (0.154 of the demo's map at 8192 tokens; module
            docstring).
        threshold_scope: "query" (per query block and head) or "head" (over all query blocks of a head, the
            paper's global selection).
        topk: chunks kept per query block with `selection="topk"`, its own chunk included: an int count or a
            float fraction of the layer's chunk count (rounded, at least 1); one value, or one per kind
            ("1d", "2d", "3d").
        density: if set, the fraction of the attention map to compute per head; the selection rule then only
            ranks the chunks (threshold and topk are unused).
        cycle: the chunk kind of each layer, layer l taking cycle[l % len(cycle)]; default ("3d",), the
            paper's ("1d", "2d", "3d") in `PAPER_OPTIONS`.
        chunk_1d: frames per 1-D chunk.
        chunk_2d: (h, w) of a 2-D chunk (all frames).
        chunk_3d: (f, h, w) of a 3-D chunk; default (4, 4, 4) tokens, one 64-token block.
            Sizes: an int is tokens, a float in (0, 1] a fraction of the axis, max(1, round(f * L)).
    """

    method: ClassVar[str] = "vmoba"
    selection: Literal["threshold", "topk"] = "threshold"
    threshold: float = 0.25
    threshold_scope: Literal["query", "head"] = "query"
    topk: Size | tuple = (2 / 7, 0.25, 0.25)
    density: float | None = None
    cycle: tuple = ("3d",)
    chunk_1d: Size = 1 / 7
    chunk_2d: tuple = (1 / 6, 1 / 4)
    chunk_3d: tuple = (4, 4, 4)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in ("threshold", "topk"):
            raise ConfigError(f"vmoba selection={self.selection!r} must be 'threshold' or 'topk'")
        if self.threshold_scope not in ("query", "head"):
            raise ConfigError(f"vmoba threshold_scope={self.threshold_scope!r} must be 'query' (per query block) or "
                              "'head' (over all query blocks of a head)")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ConfigError(f"vmoba threshold={t!r} is out of range: expected a cumulative share in (0, 1]")
        d = self.density
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0):
            raise ConfigError(f"vmoba density={d!r} is out of range: expected None or a fraction in (0, 1]")
        topk = self.topk if isinstance(self.topk, (tuple, list)) else (self.topk,) * len(KINDS)
        object.__setattr__(self, "topk", _check_sizes("topk", topk, len(KINDS)))
        cycle = (self.cycle,) if isinstance(self.cycle, str) else self.cycle
        if not isinstance(cycle, (tuple, list)) or not cycle or any(c not in KINDS for c in cycle):
            raise ConfigError(f"vmoba cycle={self.cycle!r} must be a non-empty sequence of {', '.join(map(repr, KINDS))} "
                              "(layer l takes cycle[l % len(cycle)])")
        object.__setattr__(self, "cycle", tuple(cycle))
        object.__setattr__(self, "chunk_1d", _check_sizes("chunk_1d", self.chunk_1d, 1)[0])
        object.__setattr__(self, "chunk_2d", _check_sizes("chunk_2d", self.chunk_2d, 2))
        object.__setattr__(self, "chunk_3d", _check_sizes("chunk_3d", self.chunk_3d, 3))

    def chunk_shape(self, kind: Kind, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (f, h, w) tokens of one chunk of `kind` on `grid` (edge chunks may be shorter)."""
        f, h, w = grid
        if kind == "1d":
            return axis_extent(self.chunk_1d, f), h, w
        if kind == "2d":
            return f, axis_extent(self.chunk_2d[0], h), axis_extent(self.chunk_2d[1], w)
        return tuple(axis_extent(s, n) for s, n in zip(self.chunk_3d, grid))  # type: ignore[return-value]

    def topk_count(self, kind: Kind, num_chunks: int) -> int:
        """Chunks kept per query block (its own included) for `kind` when the layer has `num_chunks` chunks."""
        k = self.topk[KINDS.index(kind)]
        k = k if is_int(k) else math.floor(k * num_chunks + 0.5)
        return max(1, min(num_chunks, k))


def layer_index(ctx: PlanContext) -> int:
    """The call's layer: `ctx.layer`, else the module-list index in its site name ("...blocks.7.attn1"), else 0."""
    if ctx.layer is not None:
        return ctx.layer
    match = _SITE_LAYER.search(ctx.site or "")
    return int(match.group(1)) if match else 0


def layer_kind(config: VmobaConfig, ctx: PlanContext) -> Kind:
    """The chunk kind ("1d", "2d" or "3d") of the call's layer."""
    return config.cycle[layer_index(ctx) % len(config.cycle)]


@dataclass(frozen=True)
class Partition:
    """One layer's chunks on one token layout, in the plan's order (video chunk by chunk, then text).

    Attributes:
        chunk: (f, h, w) tokens of a chunk.
        order: long (S,), the original index of the token at each position of the plan's order; None where
            that is the identity.
        token_chunk: long (N,), the (geometric) chunk of the video token at each of the first N positions;
            chunks are numbered in raster order of the chunk grid, so it never decreases.
        num_chunks: the number of geometric chunks.
        block_chunk: long (nv,), the snapped chunk (0..C-1) of every video block, C <= num_chunks.
        block_len: long (nv,), the tokens of every video block.
        chunk_tokens: long (C,), the tokens of every snapped chunk.
        video_index: long (T,), the original indices of the tokens of the video blocks, in the plan's order.
    """

    chunk: tuple[int, int, int]
    order: torch.Tensor | None
    token_chunk: torch.Tensor
    num_chunks: int
    block_chunk: torch.Tensor
    block_len: torch.Tensor
    chunk_tokens: torch.Tensor
    video_index: torch.Tensor

    @property
    def num_video_blocks(self) -> int:
        return self.block_chunk.numel()

    @property
    def num_snapped(self) -> int:
        return self.chunk_tokens.numel()


def vmoba_partition(ctx: PlanContext, chunk: tuple[int, int, int], block_size: int) -> Partition:
    """The chunks of shape `chunk` on `ctx`'s token layout, reordered and snapped to blocks of `block_size`.

    Video blocks are the blocks of the reordered sequence holding video tokens only: the first N // block_size
    blocks when there is text (the block shared with the first text tokens is a text block), all of them when
    there is none (the last one may be short).
    """
    f, h, w = ctx.grid
    n_tok, s, dev = ctx.num_video_tokens, ctx.seq_len, ctx.device
    position = tile_positions(ctx.grid, chunk, device=dev)  # raster index -> position in chunk-major order
    raster = torch.arange(n_tok, device=dev)
    nh, nw = -(-h // chunk[1]), -(-w // chunk[2])
    raster_chunk = ((raster // (h * w) // chunk[0]) * nh + (raster // w % h) // chunk[1]) * nw + (raster % w) // chunk[2]
    token_chunk = torch.empty_like(raster).index_put_((position,), raster_chunk)
    order = torch.empty(s, dtype=torch.long, device=dev)
    order[position] = raster + ctx.video_start
    text = torch.nonzero(ctx.text_token_mask()).view(-1)
    order[n_tok:] = text
    identity = bool(torch.equal(order, torch.arange(s, device=dev)))
    nv = n_tok // block_size if ctx.text_len else -(-n_tok // block_size)
    starts = torch.arange(nv, device=dev) * block_size
    block_len = torch.clamp(n_tok - starts, max=block_size)
    block_geo = token_chunk[starts + (block_len - 1) // 2]
    _, block_chunk = torch.unique_consecutive(block_geo, return_inverse=True)
    snapped = int(block_chunk[-1]) + 1 if nv else 0
    chunk_tokens = torch.zeros(snapped, dtype=torch.long, device=dev).index_add_(0, block_chunk, block_len)
    num_chunks = -(-f // chunk[0]) * nh * nw
    return Partition(chunk, None if identity else order, token_chunk, num_chunks, block_chunk, block_len,
                     chunk_tokens, order[: int(block_len.sum())])


# -- selection rules, on scores (B, H, R, C) of R query blocks against C chunks; `own` is bool (R, C), one True per row


def _minmax(scores: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Scores min-max normalised to [0, 1] over `dims`; a set that scores all alike is all 1."""
    lo, hi = scores.amin(dim=dims, keepdim=True), scores.amax(dim=dims, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (scores - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.ones_like(scores))


def query_shares(norm: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per row, the share of the row's normalised total held by the row's own chunk and the chunks ranked above
    each chunk (descending score, ties by index): what is kept before it. float (B, H, R, C); own chunks 0."""
    total = norm.sum(dim=-1, keepdim=True)
    own_weight = (norm * own).sum(dim=-1, keepdim=True)
    values, index = norm.masked_fill(own, -1.0).sort(dim=-1, descending=True, stable=True)  # own chunk last
    values = values.clamp(min=0.0)
    before = (own_weight + values.cumsum(dim=-1) - values) / total
    return torch.zeros_like(before).scatter_(-1, index, before).masked_fill(own, 0.0)


def select_threshold_query(scores: torch.Tensor, own: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per query block: its own chunk, then others by descending score while the kept share is below
    `threshold` (1 keeps every chunk). bool (B, H, R, C)."""
    if threshold >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    return (query_shares(_minmax(scores, (-1,)), own) < threshold - SHARE_TOL) | own


def _head_order(norm: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Flat (R * C) indices of every head's pairs by descending score (ties by index), own chunks last."""
    return norm.masked_fill(own, -1.0).flatten(-2).sort(dim=-1, descending=True, stable=True)[1]


def select_threshold_head(scores: torch.Tensor, own: torch.Tensor, threshold: float, row_len: torch.Tensor) -> torch.Tensor:
    """Per head, over all (query block, chunk) pairs (the paper's global rule): every block's own chunk, then
    pairs by descending normalised score while the kept share of the head's total (pairs weighted by the
    block's query tokens, `row_len` (R,)) is below `threshold`. bool (B, H, R, C)."""
    if threshold >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    norm = _minmax(scores, (-2, -1))
    weight = norm * row_len.to(norm.dtype)[:, None]
    total = weight.sum(dim=(-2, -1))[..., None]
    own_weight = (weight * own).sum(dim=(-2, -1))[..., None]
    index = _head_order(norm, own)
    sorted_weight = weight.masked_fill(own, 0.0).flatten(-2).gather(-1, index)
    before = own_weight + sorted_weight.cumsum(dim=-1) - sorted_weight
    keep = before < (threshold - SHARE_TOL) * total
    return torch.zeros_like(keep).scatter_(-1, index, keep).view_as(scores) | own


def select_topk(scores: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """Per query block: its own chunk and the k - 1 highest-scoring others (ties by index). bool (B, H, R, C)."""
    index = scores.masked_fill(own, float("inf")).argsort(dim=-1, descending=True, stable=True)[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def _priority(config: VmobaConfig, scores: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The order in which density mode adds (query block, chunk) pairs, lowest first: float (B, H, R, C)."""
    if config.selection == "topk":
        norm = _minmax(scores, (-1,))
        rank = scores.masked_fill(own, float("inf")).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return rank.to(norm.dtype) + (1.0 - norm) / 2  # by rank in the row, then by score: a fractional k
    if config.threshold_scope == "head":
        return -_minmax(scores, (-2, -1))
    return query_shares(_minmax(scores, (-1,)), own)  # a per-head threshold


def select_density(priority: torch.Tensor, own: torch.Tensor, area: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Every row's own chunk, then per head the pairs of lowest priority (ties by row, then chunk) until their
    area (tokens, (R, C)) reaches `budget` (tokens, (B, H); <= 0 adds none). bool (B, H, R, C)."""
    b, h, r, c = priority.shape
    index = priority.masked_fill(own, float("inf")).flatten(-2).sort(dim=-1, stable=True)[1]
    sorted_area = area.masked_fill(own, 0).to(torch.float64).flatten().expand(b, h, -1).gather(-1, index)
    keep = sorted_area.cumsum(dim=-1) - sorted_area < budget.to(torch.float64)[..., None]
    return torch.zeros_like(keep).scatter_(-1, index, keep).view(b, h, r, c) | own


def vmoba_scores(q: torch.Tensor, k: torch.Tensor, part: Partition, block_size: int) -> torch.Tensor:
    """q_bar . k_bar of every video block against every snapped chunk: float (B, H, nv, C), float64 for float64
    inputs. q: (B, S, H, D), k: (B, S, H_k, D) (grouped-query heads share their key head's chunks)."""
    bs_len = part.block_len
    q_bar = block_mean_pool(q.index_select(1, part.video_index), block_size)  # (B, H, nv, D)
    k_block = block_mean_pool(k.index_select(1, part.video_index), block_size)  # (B, Hk, nv, D)
    weighted = k_block * bs_len.to(k_block.dtype)[:, None]
    k_sum = torch.zeros(*k_block.shape[:2], part.num_snapped, k_block.shape[-1], dtype=k_block.dtype, device=k_block.device)
    k_bar = k_sum.index_add_(2, part.block_chunk, weighted) / part.chunk_tokens.to(k_block.dtype)[:, None]
    if k_bar.shape[1] != q_bar.shape[1]:
        k_bar = k_bar.repeat_interleave(q_bar.shape[1] // k_bar.shape[1], dim=1)
    return q_bar @ k_bar.transpose(-1, -2)


@register_method
class VmobaPlanner(Planner):
    """VMoBA's layer-cycled chunks and similarity-gated selection, per batch row and head, re-planned on the
    shared schedule (`replan_every`, `replan_steps`)."""

    name = "vmoba"
    config_cls = VmobaConfig
    description = "VMoBA: 1-D/2-D/3-D key chunks cycled by layer, mean-pooled keys, cumulative-similarity or top-k chunks"

    def partition(self, ctx: PlanContext, state: SiteState) -> Partition:
        """This call's partition, kept in the site's state while the token layout holds."""
        chunk = self.config.chunk_shape(layer_kind(self.config, ctx), ctx.grid)
        key = (*ctx.layout_key, chunk, self.config.block_size)
        cached = state.extra.get("vmoba_partition")
        if cached is None or cached[0] != key:
            cached = state.extra["vmoba_partition"] = (key, vmoba_partition(ctx, chunk, self.config.block_size))
        return cached[1]

    def select(self, scores: torch.Tensor, part: Partition, ctx: PlanContext, kind: Kind) -> torch.Tensor:
        """The chunks each video block keeps: bool (B, H, nv, C) from scores (B, H, nv, C)."""
        cfg = self.config
        own = F.one_hot(part.block_chunk, part.num_snapped).bool()
        if cfg.density is not None:
            s = ctx.seq_len
            video_tokens = int(part.block_len.sum())
            # Always computed: every text (or shared) row in full, and every video row's text columns and own chunk.
            base = (s - video_tokens) * s + (part.block_len * (s - video_tokens + part.chunk_tokens[part.block_chunk])).sum()
            budget = torch.full(scores.shape[:2], cfg.density * s * s - float(base), dtype=torch.float64, device=scores.device)
            area = part.block_len[:, None] * part.chunk_tokens[None, :]
            return select_density(_priority(cfg, scores, own), own, area, budget)
        if cfg.selection == "topk":
            return select_topk(scores, own, cfg.topk_count(kind, part.num_snapped))
        if cfg.threshold_scope == "head":
            return select_threshold_head(scores, own, cfg.threshold, part.block_len)
        return select_threshold_query(scores, own, cfg.threshold)

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        bs = self.config.block_size
        kind = layer_kind(self.config, ctx)
        part = self.partition(ctx, state)
        n = -(-ctx.seq_len // bs)
        nv = part.num_video_blocks
        order = None if part.order is None else part.order.view(1, 1, -1)
        layout = torch.ones(q.shape[0], q.shape[2], n, n, dtype=torch.bool, device=ctx.device)
        if nv:
            chosen = self.select(vmoba_scores(q, k, part, bs), part, ctx, kind)
            layout[:, :, :nv, :nv] = chosen.gather(-1, part.block_chunk.expand(*chosen.shape[:3], nv))
        # In the plan's order the text follows the video: the suffix rules of keep_text_and_diagonal apply.
        text_ctx = dataclasses.replace(ctx, text_position="suffix") if ctx.text_len else ctx
        layout = keep_text_and_diagonal(layout, text_ctx, bs)
        return AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs, order=order)


__all__ = [
    "KINDS",
    "PAPER_OPTIONS",
    "Partition",
    "VmobaPlanner",
    "VmobaConfig",
    "axis_extent",
    "layer_index",
    "layer_kind",
    "query_shares",
    "select_density",
    "select_threshold_head",
    "select_threshold_query",
    "select_topk",
    "vmoba_partition",
    "vmoba_scores",
]
