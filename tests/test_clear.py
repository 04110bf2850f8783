"""`clear`: the plan covers CLEAR's circle exactly, in whole blocks, and nothing more."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import sparse_dit.patterns.clear  # noqa: F401  (registers the method)
from sparse_dit import ConfigError, sparse_attention
from sparse_dit.patterns import PlanContext
from sparse_dit.patterns.clear import ClearConfig, ClearPlanner, clear_token_density, raster_boxes
from sparse_dit.state import SiteState


def _plan(grid, text_len=0, position="none", **options):
    ctx = PlanContext(grid=grid, text_len=text_len, text_position=position)
    config = ClearConfig(**options)
    return ClearPlanner(config).plan(None, None, ctx, SiteState()), ctx, config


def _token_mask(ctx: PlanContext, radius_squared: int, frames: int) -> torch.Tensor:
    """bool (S, S) by definition: text rows and columns, and video pairs inside the circle and the extent."""
    f, h, w = ctx.grid
    coords = torch.tensor(list(itertools.product(range(f), range(h), range(w))))
    d = coords[:, None, :] - coords[None, :, :]
    inside = (d[..., 0].abs() <= frames) & (d[..., 1] ** 2 + d[..., 2] ** 2 <= radius_squared)
    text = ctx.text_token_mask()
    mask = text[:, None] | text[None, :]
    start, n = ctx.video_start, ctx.num_video_tokens
    mask[start : start + n, start : start + n] = inside
    return mask


def _blocks(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool (n, n): blocks of the token mask holding at least one True pair."""
    pad = (-mask.shape[0]) % block_size
    mask = F.pad(mask, (0, pad, 0, pad))
    n = mask.shape[0] // block_size
    return mask.view(n, block_size, n, block_size).any(3).any(1)


CASES = [  # grid, block, radius, temporal extent, text
    ((1, 11, 13), 16, 3, 0, (0, "none")),
    ((1, 9, 7), 5, 0, 0, (3, "prefix")),
    ((3, 5, 7), 16, 2, 1, (11, "suffix")),
    ((4, 6, 6), 7, 0.5, 0.25, (5, "prefix")),
    ((2, 9, 4), 3, 4, -1, (0, "none")),
    ((5, 7, 3), 8, 1, 2, (9, "suffix")),
    ((3, 10, 10), 64, 0.3, 1.0, (0, "none")),
    ((6, 4, 5), 11, 100, 3, (4, "prefix")),
]


@pytest.mark.parametrize("grid, block, radius, extent, text", CASES)
def test_plan_is_exactly_the_blocks_that_touch_the_circle(grid, block, radius, extent, text):
    plan, ctx, config = _plan(grid, *text, radius=radius, temporal_extent=extent, block_size=block)
    tokens = _token_mask(ctx, config.radius_squared(grid), config.frames(grid))
    layout = plan.layout[0, 0]
    covered = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)[: ctx.seq_len, : ctx.seq_len]
    assert not (tokens & ~covered).any(), "a pair inside the circle lies in a block the plan skips"
    # Every kept block holds an inside pair (the diagonal holds (i, i), so keeping it adds nothing needless).
    assert torch.equal(layout, _blocks(tokens, block))
    assert plan.density >= clear_token_density(config, ctx) - 1e-12


@pytest.mark.parametrize("grid, block, radius, extent, text", CASES)
def test_token_density_counts_the_circle(grid, block, radius, extent, text):
    _, ctx, config = _plan(grid, *text, radius=radius, temporal_extent=extent, block_size=block)
    tokens = _token_mask(ctx, config.radius_squared(grid), config.frames(grid))
    assert clear_token_density(config, ctx) == pytest.approx(tokens.double().mean().item(), abs=1e-12)


def test_relative_sizes_follow_the_stated_rule():
    config = ClearConfig(radius=0.25, temporal_extent=0.125)
    assert config.radius_squared((16, 16, 32)) == 64  # r = 0.25 * max(H, W) = 8 tokens
    assert config.radius_squared((16, 16, 16)) == 16
    assert config.frames((16, 16, 16)) == 2 and config.frames((20, 8, 8)) == 2  # floor(0.125 * F)
    assert ClearConfig(temporal_extent=-1).frames((7, 4, 4)) == 7
    assert ClearConfig(radius=3).radius_squared((1, 64, 64)) == 9  # an int is tokens, whatever the grid


def test_density_falls_as_the_window_shrinks():
    grid = (8, 24, 24)
    by_radius = [_plan(grid, radius=r, temporal_extent=-1, block_size=16)[0].density for r in (24, 12, 6, 3, 1)]
    assert all(a > b for a, b in zip(by_radius, by_radius[1:])), by_radius
    by_extent = [_plan(grid, radius=4, temporal_extent=t, block_size=16)[0].density for t in (7, 4, 2, 1, 0)]
    assert all(a > b for a, b in zip(by_extent, by_extent[1:])), by_extent
    assert by_radius[-1] < 0.2


@pytest.mark.parametrize("options", [
    {"radius": -1}, {"radius": -0.5}, {"radius": 1.5}, {"radius": 0.0}, {"radius": True}, {"radius": "8"},
    {"temporal_extent": -2}, {"temporal_extent": 1.01}, {"temporal_extent": 0.0}, {"temporal_extent": None},
])
def test_invalid_configs_raise(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        ClearConfig(**options)


def test_huge_radius_is_dense_attention():
    q, k, v = (torch.randn(2, 3 * 5 * 7 + 6, 2, 8) for _ in range(3))
    out = sparse_attention(q, k, v, method="clear", grid=(3, 5, 7), text_len=6, text_position="prefix",
                           radius=10**6, temporal_extent=-1, block_size=16, min_seq_len=0, backend="reference")
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_small_radius_changes_the_output_as_its_mask_says():
    """Through the functional core on the reference backend: the output is masked attention over the plan."""
    q, k, v = (torch.randn(1, 2 * 8 * 8, 2, 8) for _ in range(3))
    options = dict(radius=2, temporal_extent=0, block_size=8, min_seq_len=0, backend="reference")
    out = sparse_attention(q, k, v, method="clear", grid=(2, 8, 8), **options)
    plan, _, _ = _plan((2, 8, 8), **options)
    mask = plan.layout[0, 0].repeat_interleave(8, 0).repeat_interleave(8, 1)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    assert plan.density < 0.5


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 4), (3, 1, 5)])
def test_raster_boxes_tile_every_range(shape):
    size = 1
    for n in shape:
        size *= n
    coords = list(itertools.product(*map(range, shape)))
    for start in range(size):
        for stop in range(start, size + 1):
            boxes = raster_boxes(start, stop, shape)
            assert len(boxes) <= 2 * len(shape) - 1
            cells = [c for lo, hi in boxes for c in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi)))]
            assert sorted(cells) == coords[start:stop]


def test_plan_is_cached_per_token_layout():
    planner = ClearPlanner(ClearConfig())
    a = PlanContext(grid=(2, 4, 4), text_len=3, text_position="prefix", layer=0, step=1)
    b = PlanContext(grid=(2, 4, 4), text_len=3, text_position="prefix", layer=2, step=7)
    assert planner.cache_key(a) == planner.cache_key(b)
    assert planner.cache_key(a) != planner.cache_key(PlanContext(grid=(2, 4, 8)))
