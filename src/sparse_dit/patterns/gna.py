"""`gna`: Generalized Neighborhood Attention over the (F, H, W) token grid, as NATTEN defines it.

Per axis a query attends the keys of a window of `kernel_size` tokens (in its dilation group) around the
centre of its stride group:

- dilation d: a token at x belongs to group x mod d and sits at x' = x // d in it; queries see only keys of
  their own group, and the group is ceil((L - g) / d) tokens long;
- stride s: queries of one stride group [floor(x'/s) s, ... + s) share one window, centred on the group's
  leader floor(x'/s) s + floor(s/2) (clamped to the axis); s = 1 is sliding-window NA, s = kernel blocked
  (Swin-style) attention;
- the window covers floor(k/2) tokens left of the leader and ceil(k/2) - 1 right of it, and is shifted (not
  clipped) at the borders, so every query keeps exactly `kernel_size` keys per axis;
- causal axes: the leader is the group's last token, the window ends at the query itself and starts
  kernel_size - 1 before the leader (clipped at 0).

A key is a neighbour iff it is one on every axis. Text tokens (joint attention) are dense both ways: every
video query attends all text, as NATTEN's `additional_keys` do, and text queries attend everything.

The plan is static. Video tokens are laid out tile by tile through the plan's `order` (text after them), so
a block is a compact 3-D box and a neighbourhood covers whole blocks where the tile divides window and
stride; `gna_padding` reports what fraction of the computed work lies outside the exact neighbourhood.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Hashable, Literal, Mapping, Union

import torch

from ..config import SparseAttentionConfig, is_fraction, is_int
from ..errors import ConfigError
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, register_method
from .tiling import Grid, kron_layout, rank_tiles, tile_positions, tiles_are_blocks, token_block_layout

AXES = ("F", "H", "W")
Number = Union[int, float]
AxisSpec = Union[Number, tuple]  # a scalar (every axis longer than 1 token) or one value per trailing axis
OPTIONS = ("kernel_size", "stride", "dilation", "is_causal")


def _check_value(name: str, v: Any, fractions: bool, whole: bool) -> None:
    ok = (is_int(v) and (v >= 1 or (whole and v == -1))) or (fractions and is_fraction(v))
    if not ok:
        allowed = "an int >= 1" + (", -1" if whole else "") + (", a fraction in (0, 1]" if fractions else "")
        raise ConfigError(f"gna {name}={v!r} is invalid: each value must be {allowed}")


def normalize_axis_spec(name: str, value: Any) -> AxisSpec:
    """Validate one per-axis option and put it in canonical form: a scalar, or a 3-tuple over (F, H, W).

    Tuples of 1 or 2 values name the trailing axes (W, or H and W, as NATTEN's na1d/na2d); the leading axes
    get the neutral value (kernel 1, stride 1, dilation 1, not causal). A scalar applies to every axis longer
    than one token, so `kernel_size=7` is 1-D attention on a (1, 1, L) grid and 3-D attention on a video.
    """
    fractions, whole = {"kernel_size": (True, True), "stride": (True, True), "dilation": (False, False)}.get(name, (False, False))
    if name == "is_causal":
        if isinstance(value, bool):
            return value
        values = tuple(value) if isinstance(value, (tuple, list)) else ()
        if not 1 <= len(values) <= 3 or not all(isinstance(v, bool) for v in values):
            raise ConfigError(f"gna is_causal={value!r} is invalid: use a bool (causal along F, time) or 1-3 bools per trailing axis")
        return (False,) * (3 - len(values)) + values
    if isinstance(value, (tuple, list)):
        if not 1 <= len(value) <= 3:
            raise ConfigError(f"gna {name}={value!r} needs 1, 2 or 3 values (the trailing axes of (F, H, W)), got {len(value)}")
        for v in value:
            _check_value(name, v, fractions, whole)
        return (1,) * (3 - len(value)) + tuple(value)
    _check_value(name, value, fractions, whole)
    return value


def _per_axis(value: AxisSpec, axis: int) -> Any:
    return value[axis] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class GnaResolved:
    """One layer's neighbourhood in tokens on one grid: three ints per option, causal as three bools."""

    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int]
    dilation: tuple[int, int, int]
    is_causal: tuple[bool, bool, bool]


@dataclass(frozen=True)
class GnaSpec:
    """One layer's neighbourhood as configured, possibly relative to the grid. None inherits the config's value.

    Attributes:
        kernel_size: window per axis in tokens (int >= 1), -1 for the whole axis (its dilation group: L // d),
            or a fraction in (0, 1] of the axis (rounded, at least 1).
        stride: int >= 1, -1 for the kernel (blocked attention), or a fraction in (0, 1] of the kernel.
        dilation: int >= 1.
        is_causal: a bool (causal along F, time, only) or one bool per axis.
    """

    kernel_size: AxisSpec | None = None
    stride: AxisSpec | None = None
    dilation: AxisSpec | None = None
    is_causal: bool | tuple | None = None

    def __post_init__(self) -> None:
        for name in OPTIONS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, normalize_axis_spec(name, value))
        _check_stride_fits(self.kernel_size, self.stride)

    def over(self, base: "GnaSpec") -> "GnaSpec":
        """This spec with its None fields taken from `base`."""
        return GnaSpec(**{n: getattr(self, n) if getattr(self, n) is not None else getattr(base, n) for n in OPTIONS})

    def resolve(self, grid: Grid) -> GnaResolved:
        """Tokens per axis on `grid`. Raises ConfigError when the window, stride or dilation do not fit it."""
        kernel, stride, dilation = [], [], []
        for a, length in enumerate(grid):
            k, s, d = (_per_axis(getattr(self, n), a) for n in ("kernel_size", "stride", "dilation"))
            if length == 1 and not isinstance(self.kernel_size, tuple):
                k = 1  # a scalar kernel leaves single-token axes alone (2-D on images, 1-D on sequences)
            if length == 1 and not isinstance(self.stride, tuple):
                s = 1
            if length == 1 and not isinstance(self.dilation, tuple):
                d = 1
            k = length // d if k == -1 else max(1, math.floor(k * length + 0.5)) if isinstance(k, float) else k
            s = k if s == -1 else max(1, math.floor(s * k + 0.5)) if isinstance(s, float) else s
            _check_fits(AXES[a], length, k, s, d, grid)
            kernel.append(k), stride.append(s), dilation.append(d)
        causal = self.is_causal if isinstance(self.is_causal, tuple) else (bool(self.is_causal), False, False)
        return GnaResolved(tuple(kernel), tuple(stride), tuple(dilation), causal)


def _check_stride_fits(kernel: AxisSpec | None, stride: AxisSpec | None) -> None:
    """Config-time check of what needs no grid: an absolute stride larger than an absolute kernel."""
    if kernel is None or stride is None:
        return
    for a in range(3):
        k, s = _per_axis(kernel, a), _per_axis(stride, a)
        if is_int(k) and is_int(s) and k >= 1 and s > k:
            raise ConfigError(f"gna stride {s} is larger than kernel_size {k} on axis {AXES[a]}: strided queries share "
                              "one window, so the stride must be <= the kernel (stride = kernel is blocked attention)")


def _check_fits(axis: str, length: int, k: int, s: int, d: int, grid: Grid) -> None:
    if k > length:
        raise ConfigError(f"gna kernel_size {k} is larger than the grid's {axis} axis ({length} tokens, grid {grid}): "
                          "use a kernel <= the axis, -1 for the whole axis, or a fraction such as 0.5")
    if k * d > length:
        raise ConfigError(f"gna dilation {d} does not fit the grid's {axis} axis: kernel_size * dilation = {k} * {d} = "
                          f"{k * d} > {length} tokens (grid {grid}); use a smaller kernel or dilation")
    if s > k:
        raise ConfigError(f"gna stride {s} is larger than kernel_size {k} on axis {axis} (grid {grid}): the stride must "
                          "be <= the kernel (stride = kernel is blocked attention)")


def _layer_entry(value: Any) -> GnaSpec | None:
    if value is None or isinstance(value, GnaSpec):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"gna layer config has unknown key(s) {unknown}; valid keys: {', '.join(OPTIONS)}")
        return GnaSpec(**value)
    raise ConfigError(f"gna layers entries must be dicts of {', '.join(OPTIONS)} (or None for the defaults), got {value!r}")


@dataclass(frozen=True)
class GnaConfig(SparseAttentionConfig):
    """Config of the `gna` method (NATTEN's `na1d`/`na2d`/`na3d` over the video token grid).

    Attributes:
        kernel_size: window per axis (see `GnaSpec`): ints in tokens, -1 for the whole axis, or fractions of the
            axis. A scalar applies to every axis longer than one token; 1-3 values name the trailing axes.
        stride: 1 sliding window, up to the kernel strided (queries of a stride group share one window), -1 or
            equal to the kernel blocked; a fraction is relative to the kernel.
        dilation: per-axis dilation (int).
        is_causal: causal along F (time) if True; or one bool per axis.
        layers: per-layer overrides, indexed by `ctx.layer`: a sequence of dicts with any of kernel_size,
            stride, dilation, is_causal (None = the defaults above), or a callable layer -> such a dict.
        layer_rule: layers past the end of the sequence: "cycle" (layer % len) or "last" (the last entry) or
            "base" (the defaults above).
        order: "tiled" (video tokens in 3-D tiles of block_size tokens through the plan's order, text after
            them) or "raster" (no permutation: blocks are runs of the f-major sequence).
        tile: the tile shape (tf, th, tw), product block_size; None picks the one that computes least.
    """

    method: ClassVar[str] = "gna"
    kernel_size: AxisSpec = 0.5
    stride: AxisSpec = 1
    dilation: AxisSpec = 1
    is_causal: bool | tuple = False
    layers: tuple | Callable[[int], Any] | None = None
    layer_rule: Literal["cycle", "last", "base"] = "cycle"
    order: Literal["tiled", "raster"] = "tiled"
    tile: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        base = GnaSpec(self.kernel_size, self.stride, self.dilation, self.is_causal)  # validates
        for name in OPTIONS:
            object.__setattr__(self, name, getattr(base, name))
        if self.layers is not None and not callable(self.layers):
            if not isinstance(self.layers, (tuple, list)) or not self.layers:
                raise ConfigError(f"gna layers={self.layers!r} must be a non-empty list of per-layer dicts, a callable, or None")
            object.__setattr__(self, "layers", tuple(_layer_entry(v) for v in self.layers))
            for entry in self.layers:
                if entry is not None:
                    entry.over(base)  # stride vs kernel across the entry and the defaults
        if self.layer_rule not in ("cycle", "last", "base"):
            raise ConfigError(f"gna layer_rule={self.layer_rule!r} must be 'cycle', 'last' or 'base'")
        if self.order not in ("tiled", "raster"):
            raise ConfigError(f"gna order={self.order!r} must be 'tiled' or 'raster'")
        if self.tile is not None:
            tile = tuple(self.tile) if isinstance(self.tile, (tuple, list)) else ()
            if len(tile) != 3 or not all(is_int(t) and t >= 1 for t in tile) or math.prod(tile) != self.block_size:
                raise ConfigError(f"gna tile={self.tile!r} must be three ints >= 1 whose product is block_size={self.block_size}")
            object.__setattr__(self, "tile", tile)

    @property
    def base_spec(self) -> GnaSpec:
        """The defaults every layer starts from."""
        return GnaSpec(self.kernel_size, self.stride, self.dilation, self.is_causal)

    def layer_spec(self, layer: int | None) -> GnaSpec:
        """The complete spec of layer `layer` (None: outside a model, the defaults)."""
        base = self.base_spec
        if self.layers is None or layer is None:
            return base
        if callable(self.layers):
            return (_layer_entry(self.layers(layer)) or GnaSpec()).over(base)
        n = len(self.layers)
        if layer >= n and self.layer_rule == "base":
            return base
        entry = self.layers[layer % n if self.layer_rule == "cycle" else min(layer, n - 1)]
        return (entry or GnaSpec()).over(base)

    def resolved(self, grid: Grid, layer: int | None = None) -> GnaResolved:
        """Layer `layer`'s neighbourhood in tokens on `grid`."""
        return self.layer_spec(layer).resolve(grid)


def axis_neighbours(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """NATTEN's neighbourhood along one axis: bool (L, L), True where key j is a neighbour of query i."""
    i = torch.arange(length, device=device)
    group, x = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation  # tokens in the query's dilation group
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    if causal:
        leader = torch.minimum((x // stride) * stride + stride - 1, group_len - 1)
        start = torch.clamp(leader - left - right, min=0)
        end = torch.minimum(x + 1, group_len)
    else:
        leader = torch.minimum((x // stride) * stride + stride // 2, group_len - 1)
        # Shift, do not clip, at the far border: a window that would run past the end starts at L_g - k.
        start = torch.clamp(leader - left, min=0) + torch.where(leader + right >= group_len, group_len - right - leader - 1, 0)
        end = start + kernel
    kx = x[None, :]
    return (group[:, None] == group[None, :]) & (kx >= start[:, None]) & (kx < end[:, None])


def neighbour_masks(grid: Grid, spec: GnaResolved, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """The per-axis neighbourhoods (F, H, W): bool (L_a, L_a) each."""
    return [axis_neighbours(n, *params, device=device)
            for n, params in zip(grid, zip(spec.kernel_size, spec.stride, spec.dilation, spec.is_causal))]


def gna_token_mask(ctx: PlanContext, spec: GnaResolved) -> torch.Tensor:
    """The exact neighbourhood as a token mask in the original order: bool (S, S), True = attend.

    O(S^2) memory, for tests and small grids. Text rows and columns are True (text is dense both ways).
    """
    mf, mh, mw = neighbour_masks(ctx.grid, spec, ctx.device)
    n = ctx.num_video_tokens
    video = (mf[:, None, None, :, None, None] & mh[None, :, None, None, :, None] & mw[None, None, :, None, None, :]).reshape(n, n)
    text = ctx.text_token_mask()
    mask = text[:, None] | text[None, :]
    start = ctx.video_start
    mask[start : start + n, start : start + n] = video
    return mask


# Tile shapes tried on grids that no tile divides (blocks then straddle tiles, and only the exact layout tells
# which order computes least).
UNEVEN_CANDIDATES = 3


def _video_layout(ctx: PlanContext, masks: list[torch.Tensor], block_size: int,
                  tile: Grid | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Video x video block layout bool (nb, nb) in tile order (or raster order for tile None), the order
    long (S,) or None, and the positions of the text tokens in that order, long (T,)."""
    grid, dev = ctx.grid, ctx.device
    n, s = ctx.num_video_tokens, ctx.seq_len
    nb = -(-s // block_size)
    video = torch.arange(n, device=dev) + ctx.video_start  # original index of each video token (raster order)
    if tile is None:
        return token_block_layout(masks, video // block_size, nb), None, torch.nonzero(ctx.text_token_mask()).view(-1)
    position = tile_positions(grid, tile, dev)
    perm = torch.empty(s, dtype=torch.long, device=dev)
    perm[position] = video
    perm[n:] = torch.nonzero(ctx.text_token_mask()).view(-1)  # text after the video, in its own order
    if tiles_are_blocks(grid, tile, block_size):  # every video block one tile: a Kronecker product
        layout = torch.zeros(nb, nb, dtype=torch.bool, device=dev)
        layout[: n // block_size, : n // block_size] = kron_layout(masks, tile)
    else:
        layout = token_block_layout(masks, position // block_size, nb)
    if bool((perm == torch.arange(s, device=dev)).all()):
        perm = None  # the tiled order is the raster order (e.g. 1-D): nothing to permute
    return layout, perm, torch.arange(n, s, device=dev)


def _with_text_and_diagonal(layout: torch.Tensor, text_positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """layout (nb, nb) with every block holding a text token a dense row and column, and the diagonal kept."""
    nb = layout.shape[0]
    text_blocks = torch.zeros(nb, dtype=torch.bool, device=layout.device)
    text_blocks[text_positions // block_size] = True
    return layout | text_blocks[:, None] | text_blocks[None, :] | torch.eye(nb, dtype=torch.bool, device=layout.device)


def _video_pairs(layout: torch.Tensor, text_positions: torch.Tensor, seq_len: int, block_size: int) -> int:
    """Video token pairs a video x video block layout (nb, nb) computes."""
    nb = layout.shape[0]
    video = torch.ones(seq_len, dtype=torch.long, device=layout.device)
    video[text_positions] = 0
    per_block = torch.zeros(nb, dtype=torch.long, device=layout.device)
    per_block.index_add_(0, torch.arange(seq_len, device=layout.device) // block_size, video)
    return int(per_block @ layout.long() @ per_block)


def gna_plan(ctx: PlanContext, spec: GnaResolved, block_size: int, order: str = "tiled",
             tile: Grid | None = None) -> AttentionPlan:
    """The plan of one layer's neighbourhood (see `gna_plan_and_tile`)."""
    return gna_plan_and_tile(ctx, spec, block_size, order, tile)[0]


def gna_plan_and_tile(ctx: PlanContext, spec: GnaResolved, block_size: int, order: str = "tiled",
                      tile: Grid | None = None) -> tuple[AttentionPlan, Grid | None]:
    """The plan of one layer's neighbourhood, and the tile shape it uses (None: raster order).

    The plan's layout is bool (1, 1, nb, nb), and in tiled order its order a long (1, 1, S) permutation.

    Blocks are computed whole: a block pair is kept iff some query of the one has a neighbour in the other.
    Blocks holding a text token are dense rows and columns; each block keeps its diagonal. In tiled order
    without a given tile, the best tile that divides the grid (or, on grids none divides, the few best tiles)
    and the raster order are compared by the video work they compute, and the least wins: tiled order never
    computes more than raster.
    """
    masks = neighbour_masks(ctx.grid, spec, ctx.device)
    if order != "tiled":
        candidates: list[Grid | None] = [None]
    elif tile is not None:
        candidates = [tile]
    else:
        ranked = rank_tiles(ctx.grid, masks, block_size)
        even = tiles_are_blocks(ctx.grid, ranked[0], block_size)
        candidates = [*(ranked[:1] if even else ranked[:UNEVEN_CANDIDATES]), None]
    # Compared on the final layouts: the text rows and columns and the diagonal a block pair gets can add video
    # work (a block shared by text and video tokens is computed whole), differently in each order.
    layouts = [(t, _with_text_and_diagonal(layout, text_positions, block_size), perm, text_positions)
               for t in candidates for layout, perm, text_positions in [_video_layout(ctx, masks, block_size, t)]]
    tile, layout, perm, text_positions = min(layouts, key=lambda c: _video_pairs(c[1], c[3], ctx.seq_len, block_size))
    plan = AttentionPlan(seq_len=ctx.seq_len, layout=layout[None, None], block_size=block_size,
                         order=None if perm is None else perm[None, None])
    return plan, tile


@register_method
class GnaPlanner(Planner):
    """NATTEN's generalized neighborhood attention per layer, in tiled blocks; static per (grid, text, layer config)."""

    name = "gna"
    config_cls = GnaConfig
    description = "Generalized Neighborhood Attention (NATTEN): sliding, strided or blocked 3-D windows, dilation, causal time"

    def resolved(self, ctx: PlanContext) -> GnaResolved:
        return self.config.resolved(ctx.grid, ctx.layer)

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        return gna_plan(ctx, self.resolved(ctx), self.config.block_size, self.config.order, self.config.tile)

    def cache_key(self, ctx: PlanContext) -> Hashable:
        # Layers whose configs resolve to the same tokens on this grid share one plan.
        return (*ctx.layout_key, self.resolved(ctx))


def video_pairs(plan: AttentionPlan, ctx: PlanContext) -> int:
    """Video (query, key) token pairs inside the plan's computed blocks (text rows and columns left out)."""
    text = torch.nonzero(ctx.text_token_mask()).view(-1)
    if plan.order is not None:  # where the text tokens sit in the plan's order
        text = torch.argsort(plan.order.view(-1))[text]
    return _video_pairs(plan.layout[0, 0], text, ctx.seq_len, plan.block_size)


def gna_padding(grid: Grid, config: GnaConfig | None = None, block_size: int | None = None, layer: int | None = None,
                text_len: int = 0, text_position: str = "none", **options: Any) -> dict[str, Any]:
    """How much of the work a `gna` plan computes lies outside the exact neighbourhood, tiled and raster order.

    Args:
        grid: (F, H, W) token grid.
        config: a GnaConfig (or None: built from `options`, e.g. kernel_size=(3, 7, 7)).
        block_size: overrides the config's block size.
        layer: which layer's config (per-layer `layers`).
    Returns:
        {"grid", "block_size", "kernel_size", "stride", "dilation", "is_causal" (resolved),
         "exact": fraction of the video x video map in the neighbourhood,
         "tiled" / "raster": {"tile" (tiled only; None where raster order computes least),
                              "computed": fraction of the video x video map computed,
                              "padding": share of the computed video work outside the neighbourhood,
                              "plan_density": the plan's density with text}}
    """
    config = config if config is not None else GnaConfig(**options)
    if block_size is not None:
        config = config.replace(block_size=block_size)
    spec = config.resolved(grid, layer)
    ctx = PlanContext(grid=grid, text_len=text_len, text_position=text_position if text_len else "none")
    n = ctx.num_video_tokens
    exact = math.prod(int(m.sum()) for m in neighbour_masks(grid, spec))
    report: dict[str, Any] = {"grid": tuple(grid), "block_size": config.block_size, **dataclasses.asdict(spec),
                              "exact": exact / n**2}
    for order in ("tiled", "raster"):
        plan, tile = gna_plan_and_tile(ctx, spec, config.block_size, order, config.tile)
        computed = video_pairs(plan, ctx)
        entry = {"computed": computed / n**2, "padding": 1.0 - exact / computed, "plan_density": plan.density}
        report[order] = {"tile": tile, **entry} if order == "tiled" else entry
    return report
