"""`clear`: CLEAR's circular local attention (arXiv 2412.16112), over the (F, H, W) token grid.

Every video (or image) query attends every text key and the video keys inside a circle of radius r around it on
the (H, W) plane, within a temporal extent t of frames:

    (h_q - h_k)^2 + (w_q - w_k)^2 <= r^2   and   |f_q - f_k| <= t.

Text queries attend everything. CLEAR's released mask is strict (`< r`); for an integer r that is the set
`<= r'` for any r' in [sqrt(r^2 - 1), r), e.g. radius 15.97 (as a token count, see `ClearConfig`) for its r = 16.

The plan computes whole blocks of `block_size` tokens in raster order, as `window` does. A block pair is kept
exactly when at least one (query, key) pair in it lies inside the circle: each block's video tokens are a
contiguous raster range, which is the union of at most five axis-aligned boxes of the grid, and two boxes hold
an inside pair iff their per-axis gaps (g_f, g_h, g_w) satisfy g_f <= t and g_h^2 + g_w^2 <= r^2 (the set of
integer differences between two integer intervals is again an integer interval, and the distance is smallest
at each axis's smallest difference). So the per-token set is covered with no missing pair and no block is kept
that holds no inside pair; the plan's `density` is the computed fraction, `clear_token_density` the exact one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Hashable

import torch

from ..config import SparseAttentionConfig, is_fraction, is_int
from ..errors import ConfigError
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method

MAX_BOXES = 5  # boxes per raster range on a 3-D grid: partial row, partial frame, whole frames, frame, row
_QUERY_CHUNK = 64  # query blocks per step of the box test, so memory stays O(chunk * n) on long sequences


@dataclass(frozen=True)
class ClearConfig(SparseAttentionConfig):
    """Config of the `clear` method.

    Attributes:
        radius: the circle over (H, W). An int >= 0 is a radius in tokens; a float in (0, 1] is a fraction of the
            grid's longer spatial side, r = radius * max(H, W) tokens (not rounded), so one config serves several
            resolutions. The default 0.25 is CLEAR's r = 16 on FLUX's 64 x 64 tokens at 1024 px.
        temporal_extent: frames a query sees on each side, |f_q - f_k| <= t. An int >= 0 is a count of frames
            (0: its own frame only, as an image model); a float in (0, 1] is a fraction of the frames,
            t = floor(temporal_extent * F); -1 is every frame. The default 0.125 (2 frames each way on the demo's 16)
            with the default radius computes 18% of the map on the demo's 16 x 16 x 16 tokens and 24% on twice as
            many (16 x 16 x 32), in 64-token blocks.
    """

    method: ClassVar[str] = "clear"
    radius: int | float = 0.25
    temporal_extent: int | float = 0.125

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_extent("radius", self.radius, allow_all=False)
        _check_extent("temporal_extent", self.temporal_extent, allow_all=True)

    def radius_squared(self, grid: tuple[int, int, int]) -> int:
        """The largest integer squared distance inside the circle on `grid`: floor(r^2) tokens^2."""
        _, h, w = grid
        r = float(self.radius) if is_int(self.radius) else self.radius * max(h, w)
        # 1e-9: a relative radius whose r^2 is an integer up to rounding (0.5 * 8 = 4 -> 16) keeps that distance.
        return math.floor(r * r + 1e-9)

    def frames(self, grid: tuple[int, int, int]) -> int:
        """The temporal extent t in frames on `grid`."""
        f = grid[0]
        if self.temporal_extent == -1:
            return f
        if is_int(self.temporal_extent):
            return self.temporal_extent
        return math.floor(self.temporal_extent * f + 1e-9)


def _check_extent(name: str, value: object, allow_all: bool) -> None:
    """Raise `ConfigError` unless `value` is an int >= 0 (tokens), a float in (0, 1] (relative) or, if
    `allow_all`, -1."""
    if is_int(value):
        ok = value >= 0 or (allow_all and value == -1)
    else:
        ok = is_fraction(value)
    if not ok:
        extra = ", or -1 for every frame" if allow_all else ""
        raise ConfigError(f"{name}={value!r} is out of range: expected an int >= 0 (tokens) or a float in (0, 1] "
                          f"(a fraction of the grid){extra}")


def raster_boxes(start: int, stop: int, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The raster range [start, stop) of a grid of `shape` (row-major) as disjoint boxes, (lo, hi) inclusive.

    A range cut from a 3-D grid is at most 5 boxes: the rest of its first row, the rest of that frame's rows,
    whole frames, the leading rows of its last frame, the start of its last row.
    """
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop - 1,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [((first, *lo), (first, *hi)) for lo, hi in raster_boxes(start - first * inner, stop - first * inner, shape[1:])]
    boxes = []
    whole_lo, whole_hi = first, last
    if start % inner:  # a partial leading slice
        boxes += [((first, *lo), (first, *hi)) for lo, hi in raster_boxes(start % inner, inner, shape[1:])]
        whole_lo = first + 1
    if stop % inner:  # a partial trailing slice
        boxes += [((last, *lo), (last, *hi)) for lo, hi in raster_boxes(0, stop - last * inner, shape[1:])]
        whole_hi = last - 1
    if whole_lo <= whole_hi:
        boxes.append(((whole_lo, *[0] * (len(shape) - 1)), (whole_hi, *[n - 1 for n in shape[1:]])))
    return boxes


def block_video_boxes(ctx: PlanContext, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The video tokens of every block as boxes of the grid.

    Returns:
        lo, hi: long (n, MAX_BOXES, 3), inclusive (f, h, w) corners; valid: bool (n, MAX_BOXES), False for unused
        slots (a block of text only has none).
    """
    n = -(-ctx.seq_len // block_size)
    empty = ((0, 0, 0), (0, 0, 0))
    boxes, valid = [], []
    start, count = ctx.video_start, ctx.num_video_tokens
    for block in range(n):
        # The block's token range, clipped to the video span and made relative to its first token.
        a = min(max(block * block_size - start, 0), count)
        b = min(max((block + 1) * block_size - start, 0), count)
        mine = raster_boxes(a, b, ctx.grid)
        boxes += mine + [empty] * (MAX_BOXES - len(mine))
        valid += [True] * len(mine) + [False] * (MAX_BOXES - len(mine))
    corners = torch.tensor(boxes, dtype=torch.long, device=ctx.device).view(n, MAX_BOXES, 2, 3)
    return corners[:, :, 0], corners[:, :, 1], torch.tensor(valid, device=ctx.device).view(n, MAX_BOXES)


def circle_block_layout(ctx: PlanContext, block_size: int, radius_squared: int, frames: int) -> torch.Tensor:
    """bool (n, n): query block i and key block j hold at least one video pair inside the circle.

    Exact: two boxes hold such a pair iff their per-axis gaps g satisfy g_f <= frames and
    g_h^2 + g_w^2 <= radius_squared.
    """
    lo, hi, valid = block_video_boxes(ctx, block_size)
    n = lo.shape[0]
    k_lo, k_hi, k_valid = lo.view(1, 1, n * MAX_BOXES, 3), hi.view(1, 1, n * MAX_BOXES, 3), valid.view(1, 1, -1)
    rows = []
    for begin in range(0, n, _QUERY_CHUNK):
        q_lo, q_hi, q_valid = (x[begin : begin + _QUERY_CHUNK, :, None] for x in (lo, hi, valid))
        gap = torch.clamp(torch.maximum(k_lo - q_hi, q_lo - k_hi), min=0)  # (chunk, MAX_BOXES, n * MAX_BOXES, 3)
        inside = (gap[..., 0] <= frames) & (gap[..., 1] ** 2 + gap[..., 2] ** 2 <= radius_squared)
        inside = inside & q_valid & k_valid
        rows.append(inside.view(inside.shape[0], MAX_BOXES, n, MAX_BOXES).any(dim=3).any(dim=1))
    return torch.cat(rows)


def clear_token_density(config: ClearConfig, ctx: PlanContext) -> float:
    """The exact per-token density of CLEAR's attention set on `ctx` (text rows and columns included): the
    fraction a kernel with an element mask would compute, next to the plan's block `density`.

    Counted per offset: (F - |df|)(H - |dh|)(W - |dw|) video pairs lie at offset (df, dh, dw).
    """
    f, h, w = ctx.grid
    r2, t = config.radius_squared(ctx.grid), min(config.frames(ctx.grid), f - 1)
    df = torch.arange(-t, t + 1, dtype=torch.float64)
    dh = torch.arange(-(h - 1), h, dtype=torch.float64)
    dw = torch.arange(-(w - 1), w, dtype=torch.float64)
    inside = (dh[:, None] ** 2 + dw[None, :] ** 2) <= r2
    plane = ((h - dh.abs())[:, None] * (w - dw.abs())[None, :] * inside).sum()
    video_pairs = float((f - df.abs()).sum() * plane)
    s, text = ctx.seq_len, ctx.text_len
    return (video_pairs + s * s - (s - text) ** 2) / (s * s)


@register_method
class ClearPlanner(Planner):
    """CLEAR's circle (plus all text) as whole blocks; the same plan for every layer, head and step."""

    name = "clear"
    config_cls = ClearConfig
    description = "CLEAR: circular local window over (H, W) with a temporal extent, plus all text"

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        bs = self.config.block_size
        layout = circle_block_layout(ctx, bs, self.config.radius_squared(ctx.grid), self.config.frames(ctx.grid))
        layout = keep_text_and_diagonal(layout[None, None], ctx, bs)
        return AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs)

    def cache_key(self, ctx: PlanContext) -> Hashable:
        return ctx.layout_key


__all__ = ["ClearConfig", "ClearPlanner", "block_video_boxes", "circle_block_layout", "clear_token_density", "raster_boxes"]
