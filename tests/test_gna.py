"""`gna`: NATTEN's neighbourhood against a brute force written from its definition, the tiled plan's coverage,
the config rules, and the method end to end on the reference and gather backends."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_dit.patterns.gna  # noqa: F401  (registers the method)
from sparse_dit import ConfigError, sparse_attention
from sparse_dit.kernels.layout import finish, permute
from sparse_dit.kernels.reference import token_mask
from sparse_dit.patterns import PlanContext, build_planner
from sparse_dit.patterns.gna import GnaConfig, gna_padding, gna_plan, gna_token_mask, neighbour_masks, video_pairs
from sparse_dit.patterns.tiling import kron_layout, tile_positions, token_block_layout
from sparse_dit.state import SiteState


# --- brute force, from NATTEN's definition, one query and one axis at a time --------------------------------

def window_1d(i, length, kernel, stride, dilation, causal):
    """Key coordinates of query `i` on one axis, written as the definition reads (not as gna.py computes it)."""
    group = i % dilation
    members = list(range(group, length, dilation))  # the query's dilation group, in order
    x, n = members.index(i), len(members)
    if causal:
        leader = min((x // stride) * stride + stride - 1, n - 1)  # last query of the stride group
        lo, hi = max(leader - (kernel - 1), 0), min(x + 1, n)
    else:
        leader = min((x // stride) * stride + stride // 2, n - 1)  # centre of the stride group
        lo = min(max(leader - kernel // 2, 0), n - kernel)  # shifted into the axis, never clipped
        hi = lo + kernel
    return {members[j] for j in range(lo, hi)}


def brute_mask(grid, kernel, stride, dilation, causal, text_len=0, text_position="none"):
    """bool (S, S) in the original order: the product of the per-axis windows, text dense both ways."""
    n = grid[0] * grid[1] * grid[2]
    s = n + text_len
    start = text_len if text_position == "prefix" else 0
    mask = torch.ones(s, s, dtype=torch.bool)
    coords = list(itertools.product(*(range(g) for g in grid)))
    index = {c: start + r for r, c in enumerate(coords)}
    for r, c in enumerate(coords):
        row = torch.zeros(s, dtype=torch.bool)
        row[[t for t in range(s) if not start <= t < start + n]] = True  # every text key
        windows = [window_1d(c[a], grid[a], kernel[a], stride[a], dilation[a], causal[a]) for a in range(3)]
        row[[index[key] for key in itertools.product(*windows)]] = True
        mask[start + r] = row
    return mask


@st.composite
def gna_cases(draw, max_axis=7):
    """A grid, a valid per-axis (kernel, stride, dilation, causal) in tokens, a text span and a block size."""
    grid = tuple(draw(st.integers(1, max_axis)) for _ in range(3))
    kernel, stride, dilation, causal = [], [], [], []
    for length in grid:
        d = draw(st.integers(1, max(1, length // 2)))
        k = draw(st.integers(1, length // d))
        kernel.append(k), dilation.append(d), stride.append(draw(st.integers(1, k))), causal.append(draw(st.booleans()))
    text_len = draw(st.sampled_from([0, 0, 3, 9]))
    position = draw(st.sampled_from(["prefix", "suffix"])) if text_len else "none"
    block = draw(st.sampled_from([1, 4, 8, 16]))
    return grid, tuple(kernel), tuple(stride), tuple(dilation), tuple(causal), text_len, position, block


def config_of(kernel, stride, dilation, causal, **kw):
    return GnaConfig(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal, min_seq_len=0, **kw)


# --- the neighbourhood ---------------------------------------------------------------------------------------

def test_hand_checked_windows():
    mask = neighbour_masks((1, 1, 5), config_of(3, 1, 1, False).resolved((1, 1, 5)))[2]
    assert [set(torch.nonzero(r).view(-1).tolist()) for r in mask] == [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {2, 3, 4}]
    blocked = neighbour_masks((1, 1, 8), config_of(4, -1, 1, False).resolved((1, 1, 8)))[2]
    assert torch.equal(blocked, torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool())
    dilated = neighbour_masks((1, 1, 10), config_of(3, 1, 3, False).resolved((1, 1, 10)))[2]
    assert set(torch.nonzero(dilated[9]).view(-1).tolist()) == {3, 6, 9}  # shifted inside group 0: 0 3 6 9
    causal = neighbour_masks((6, 1, 1), config_of((3, 1, 1), (2, 1, 1), 1, True).resolved((6, 1, 1)))[0]
    assert set(torch.nonzero(causal[2]).view(-1).tolist()) == {1, 2}  # leader 3, window [1, 4) cut at the query


@settings(max_examples=40, deadline=None)
@given(case=gna_cases())
def test_token_mask_matches_brute_force(case):
    grid, kernel, stride, dilation, causal, text_len, position, _ = case
    ctx = PlanContext(grid=grid, text_len=text_len, text_position=position)
    spec = config_of(kernel, stride, dilation, causal).resolved(grid)
    assert torch.equal(gna_token_mask(ctx, spec), brute_mask(grid, kernel, stride, dilation, causal, text_len, position))


def test_every_query_keeps_a_full_window():
    grid = (5, 7, 9)
    spec = config_of((3, 4, 4), (2, 3, 1), (1, 1, 2), False).resolved(grid)
    mask = gna_token_mask(PlanContext(grid=grid), spec)
    assert bool((mask.sum(-1) == 3 * 4 * 4).all())  # shifted at the borders, never clipped


# --- the plan ------------------------------------------------------------------------------------------------

def plan_mask_original_order(plan):
    """The plan's computed token pairs in the original order: bool (S, S)."""
    mask = token_mask(plan, 1, 1)[0, 0]
    if plan.order is None:
        return mask
    perm = plan.order.view(-1)
    out = torch.zeros_like(mask)
    out[perm[:, None], perm[None, :]] = mask
    return out


def blockify(mask, block):
    """bool (nb, nb): blocks of a (S, S) mask with any True pair."""
    s = mask.shape[0]
    nb = -(-s // block)
    pad = nb * block - s
    return F.pad(mask, (0, pad, 0, pad)).view(nb, block, nb, block).any(3).any(1)


@settings(max_examples=40, deadline=None)
@given(case=gna_cases(), order=st.sampled_from(["tiled", "raster"]))
def test_plan_covers_exactly_the_neighbourhood_blocks(case, order):
    grid, kernel, stride, dilation, causal, text_len, position, block = case
    ctx = PlanContext(grid=grid, text_len=text_len, text_position=position)
    spec = config_of(kernel, stride, dilation, causal).resolved(grid)
    plan = gna_plan(ctx, spec, block, order)
    exact = brute_mask(grid, kernel, stride, dilation, causal, text_len, position)
    computed = plan_mask_original_order(plan)
    assert not bool((exact & ~computed).any()), "a neighbour pair lies outside every computed block"
    # And no block more than needed: the layout is the exact mask read in the plan's order, block by block.
    perm = plan.order.view(-1) if plan.order is not None else torch.arange(ctx.seq_len)
    expected = blockify(exact[perm][:, perm], block) | torch.eye(plan.num_blocks[0], dtype=torch.bool)
    assert torch.equal(plan.layout[0, 0], expected)
    plan.check_rows()
    if order == "tiled":  # the tiled order is chosen among tile shapes and raster: never more work than raster
        raster = gna_plan(ctx, spec, block, "raster")
        assert video_pairs(plan, ctx) <= video_pairs(raster, ctx)


def test_kronecker_fast_path_equals_the_general_layout():
    grid, tile = (8, 8, 12), (2, 4, 4)
    spec = config_of((3, 5, 7), (1, 2, 3), (2, 1, 1), (True, False, False)).resolved(grid)
    masks = neighbour_masks(grid, spec)
    general = token_block_layout(masks, tile_positions(grid, tile) // 32, 8 * 8 * 12 // 32)
    assert torch.equal(kron_layout(masks, tile), general)


def test_density_falls_as_the_window_shrinks():
    ctx = PlanContext(grid=(8, 16, 16), text_len=20, text_position="prefix")
    densities = [build_planner(GnaConfig(kernel_size=k, block_size=32)).plan(None, None, ctx, SiteState()).density
                 for k in (-1, 0.75, 0.5, 0.25, 0.125)]
    assert densities[0] == 1.0
    assert all(a > b for a, b in zip(densities, densities[1:])), densities


def test_tiled_order_is_perfectly_block_sparse_where_tiles_divide_window_and_stride():
    blocked = gna_padding((16, 16, 16), kernel_size=8, stride=8, block_size=64)
    aligned = gna_padding((16, 16, 16), kernel_size=12, stride=4, block_size=64)
    for report in (blocked, aligned):
        assert report["tiled"]["padding"] == 0.0 and report["tiled"]["computed"] == report["exact"]
        assert report["raster"]["padding"] >= 0.25  # raster blocks are 64-token rows: whole W rows computed
    default = gna_padding((16, 16, 16), block_size=64)
    assert default["tiled"]["computed"] < default["raster"]["computed"]
    assert default["exact"] == 0.125 and default["kernel_size"] == (8, 8, 8)


# --- the tiled order -----------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(grid=st.tuples(*(st.integers(1, 9),) * 3), tile=st.tuples(*(st.integers(1, 5),) * 3))
def test_tile_positions_are_a_permutation(grid, tile):
    positions = tile_positions(grid, tile)
    assert torch.equal(positions.sort().values, torch.arange(grid[0] * grid[1] * grid[2]))


@pytest.mark.parametrize("text_len,position", [(0, "none"), (5, "prefix"), (7, "suffix")])
def test_tiled_order_round_trips(text_len, position):
    ctx = PlanContext(grid=(4, 6, 10), text_len=text_len, text_position=position)
    plan = gna_plan(ctx, GnaConfig(kernel_size=3).resolved(ctx.grid), 8)
    assert plan.order is not None
    x = torch.randn(2, 3, ctx.seq_len, 5)  # (B, H, S, D)
    (permuted,) = permute(plan, x)
    assert not torch.equal(permuted, x)
    restored, _ = finish(plan, permuted, None)
    assert torch.equal(restored, x)
    # Video tokens first in tile order, text after them in their own order.
    text = torch.nonzero(ctx.text_token_mask()).view(-1)
    assert torch.equal(plan.order.view(-1)[ctx.num_video_tokens :], text)


# --- config rules --------------------------------------------------------------------------------------------

def test_invalid_configs_raise_clear_errors():
    with pytest.raises(ConfigError, match="stride 5 is larger than kernel_size 3"):
        GnaConfig(kernel_size=3, stride=5)
    with pytest.raises(ConfigError, match="stride 4 is larger than kernel_size 3 on axis H"):
        GnaConfig(kernel_size=(3, 3, 3), layers=[{"stride": (1, 4, 1)}])
    for bad in ({"kernel_size": 0}, {"kernel_size": -2}, {"kernel_size": 1.5}, {"dilation": 0.5}, {"stride": 0},
                {"kernel_size": (1, 2, 3, 4)}, {"is_causal": "yes"}, {"layers": [{"window": 3}]}, {"layers": []},
                {"order": "hilbert"}, {"layer_rule": "wrap"}, {"tile": (4, 4, 2)}):
        with pytest.raises(ConfigError):
            GnaConfig(**bad)
    with pytest.raises(ConfigError, match="kernel_size 9 is larger than the grid's H axis"):
        GnaConfig(kernel_size=(1, 9, 3)).resolved((4, 8, 8))
    with pytest.raises(ConfigError, match=r"dilation 3 does not fit the grid's W axis: kernel_size \* dilation = 3 \* 3 = 9 > 8"):
        GnaConfig(kernel_size=3, dilation=(1, 1, 3)).resolved((4, 8, 8))
    with pytest.raises(ConfigError, match="larger than the grid's F axis"):  # raised at plan time, through the API
        q = torch.randn(1, 4 * 8 * 8, 1, 8)
        sparse_attention(q, q, q, "gna", grid=(4, 8, 8), kernel_size=5, min_seq_len=0)


def test_relative_sizes_resolve_per_grid():
    config = GnaConfig(kernel_size=(0.5, -1, 0.25), stride=(1, 0.5, -1))
    assert config.resolved((8, 16, 32)) == config.resolved((8, 16, 32))
    small, large = config.resolved((4, 8, 8)), config.resolved((8, 16, 32))
    assert small.kernel_size == (2, 8, 2) and small.stride == (1, 4, 2)
    assert large.kernel_size == (4, 16, 8) and large.stride == (1, 8, 8)
    # A scalar leaves single-token axes alone: 1-D on a sequence, 2-D on an image.
    assert GnaConfig(kernel_size=7, stride=2).resolved((1, 1, 40)).kernel_size == (1, 1, 7)
    assert GnaConfig(kernel_size=7, dilation=2).resolved((1, 20, 20)).dilation == (1, 2, 2)
    assert GnaConfig(kernel_size=-1, dilation=3).resolved((1, 1, 10)).kernel_size == (1, 1, 3)


def test_per_layer_configs_and_rules():
    layers = [{"kernel_size": (1, 1, -1)}, {"kernel_size": (1, -1, -1)}, None]
    config = GnaConfig(kernel_size=(3, 5, 5), layers=layers)
    grid = (6, 8, 8)
    assert [config.resolved(grid, i).kernel_size for i in range(4)] == [(1, 1, 8), (1, 8, 8), (3, 5, 5), (1, 1, 8)]
    assert config.resolved(grid, 7).kernel_size == (1, 8, 8) and config.resolved(grid).kernel_size == (3, 5, 5)
    assert GnaConfig(kernel_size=3, layers=layers, layer_rule="last").resolved(grid, 9).kernel_size == (3, 3, 3)
    assert GnaConfig(kernel_size=3, layers=layers[:1], layer_rule="base").resolved(grid, 4).kernel_size == (3, 3, 3)
    rule = GnaConfig(kernel_size=3, layers=lambda layer: {"dilation": 2} if layer % 2 else None)
    assert rule.resolved(grid, 1).dilation == (2, 2, 2) and rule.resolved(grid, 2).dilation == (1, 1, 1)
    # Layers that resolve alike share a plan; others do not.
    planner = build_planner(config)
    keys = [planner.cache_key(PlanContext(grid=grid, layer=i)) for i in range(4)]
    assert keys[0] == keys[3] and len({keys[0], keys[1], keys[2]}) == 3
    assert GnaConfig(**{k: v for k, v in config.to_dict().items() if k != "method"}).resolved(grid, 1) == config.resolved(grid, 1)


# --- end to end ----------------------------------------------------------------------------------------------

def sdpa(q, k, v):
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("text_len,position", [(0, "prefix"), (13, "prefix"), (13, "suffix")])
def test_sparse_attention_runs_on_reference_and_gather(text_len, position):
    grid = (4, 8, 8)
    q, k, v = (torch.randn(2, 256 + text_len, 2, 16) for _ in range(3))
    opts = dict(grid=grid, text_len=text_len, text_position=position, kernel_size=(3, 5, 5), stride=(1, 2, 1),
                block_size=16, min_seq_len=0)
    ref = sparse_attention(q, k, v, "gna", backend="reference", **opts)
    fast = sparse_attention(q, k, v, "gna", backend="gather", **opts)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(ref, sdpa(q, k, v), atol=1e-3)  # it is sparse
    # A video query's output only reads its computed blocks: changing a far-away value leaves it alone.
    ctx = PlanContext(grid=grid, text_len=text_len, text_position=position)
    plan = build_planner(GnaConfig(kernel_size=(3, 5, 5), stride=(1, 2, 1), block_size=16)).plan(q, k, ctx, SiteState())
    computed = plan_mask_original_order(plan)
    query = ctx.video_start  # token (0, 0, 0)
    far = int(torch.nonzero(~computed[query])[-1])
    v2 = v.clone()
    v2[:, far] += 10
    out2 = sparse_attention(q, k, v2, "gna", backend="reference", **opts)
    torch.testing.assert_close(out2[:, query], ref[:, query])


@pytest.mark.parametrize("backend", ["reference", "gather"])
def test_whole_grid_kernel_is_dense_attention(backend):
    q, k, v = (torch.randn(1, 3 * 5 * 7 + 6, 2, 8) for _ in range(3))
    out = sparse_attention(q, k, v, "gna", grid=(3, 5, 7), text_len=6, text_position="suffix", kernel_size=-1,
                           block_size=16, min_seq_len=0, backend=backend)
    torch.testing.assert_close(out, sdpa(q, k, v), atol=2e-5, rtol=2e-5)
