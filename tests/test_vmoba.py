"""`vmoba`: the layer-cycled chunk partition and the chunk selection rules, against brute force."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dit import ConfigError, SparseAttention, kernels
from sparse_dit.patterns import PlanContext, build_planner, resolve_config
from sparse_dit.patterns.vmoba import PAPER_OPTIONS, VmobaConfig, layer_kind, vmoba_partition, vmoba_scores
from sparse_dit.state import SiteState

from conftest import TOL

SHARE_TOL = 1e-6


def _ctx(grid, text_len=0, position="none", batch=2, heads=2, **where):
    return PlanContext(grid=grid, text_len=text_len, text_position=position if text_len else "none", batch=batch,
                       heads=heads, **where)


# -- brute force: explicit loops over tokens, blocks, rows and chunks


def brute_partition(grid, chunk, text_len, position, block_size):
    """(order, chunk of each video position, snapped chunk of each video block, block lengths) by sorting tokens."""
    f, h, w = grid
    cf, ch, cw = chunk
    n, s = f * h * w, f * h * w + text_len
    start = text_len if position == "prefix" else 0
    nh, nw = -(-h // ch), -(-w // cw)
    tokens = []
    for t in range(n):
        fi, hi, wi = t // (h * w), (t // w) % h, t % w
        tokens.append((((fi // cf) * nh + hi // ch) * nw + wi // cw, fi, hi, wi, start + t))
    tokens.sort()  # chunk by chunk, f-major inside each
    text = list(range(text_len)) if position == "prefix" else list(range(n, s))
    order = [tok[4] for tok in tokens] + text
    position_chunk = [tok[0] for tok in tokens]
    nv = n // block_size if text_len else -(-n // block_size)
    lengths = [min(block_size, n - i * block_size) for i in range(nv)]
    geo = [position_chunk[i * block_size + (lengths[i] - 1) // 2] for i in range(nv)]
    snapped = sorted(set(geo))
    return order, position_chunk, [snapped.index(g) for g in geo], lengths


def brute_scores(q, k, order, block_chunk, lengths, block_size):
    """Mean query of every video block . mean key of every snapped chunk, in float64: (B, H, nv, C) nested lists."""
    b, _, h, _ = q.shape
    share = h // k.shape[2]
    num_chunks = max(block_chunk) + 1
    out = [[[[0.0] * num_chunks for _ in lengths] for _ in range(h)] for _ in range(b)]
    for bi in range(b):
        for hi in range(h):
            keys = [torch.zeros(q.shape[-1], dtype=torch.float64) for _ in range(num_chunks)]
            counts = [0] * num_chunks
            for i, length in enumerate(lengths):
                for p in range(i * block_size, i * block_size + length):
                    keys[block_chunk[i]] += k[bi, order[p], hi // share].double()
                    counts[block_chunk[i]] += 1
            for i, length in enumerate(lengths):
                rows = [order[p] for p in range(i * block_size, i * block_size + length)]
                q_bar = q[bi, rows, hi].double().mean(0)
                for c in range(num_chunks):
                    out[bi][hi][i][c] = float(q_bar @ (keys[c] / counts[c]))
    return out


def _normalise(values):
    lo, hi = min(values), max(values)
    return [(x - lo) / (hi - lo) if hi > lo else 1.0 for x in values]


def brute_select(scores, block_chunk, lengths, config, num_chunks):
    """The kept chunks of every (batch row, head, video block) by the rules of the module docstring."""
    kept = {}
    for bi, per_head in enumerate(scores):
        for hi, rows in enumerate(per_head):
            if config.selection == "topk":
                k = config.topk_count(config.cycle[0], num_chunks)
                for i, row in enumerate(rows):
                    others = sorted((c for c in range(num_chunks) if c != block_chunk[i]), key=lambda c: (-row[c], c))
                    kept[bi, hi, i] = {block_chunk[i], *others[: k - 1]}
            elif config.threshold_scope == "query":
                for i, row in enumerate(rows):
                    norm, own = _normalise(row), block_chunk[i]
                    total, acc, chosen = sum(norm), norm[own], {own}
                    for c in sorted((c for c in range(num_chunks) if c != own), key=lambda c: (-norm[c], c)):
                        if config.threshold < 1 and acc / total >= config.threshold - SHARE_TOL:
                            break
                        chosen.add(c)
                        acc += norm[c]
                    kept[bi, hi, i] = chosen
            else:
                flat = _normalise([x for row in rows for x in row])
                norm = [flat[i * num_chunks : (i + 1) * num_chunks] for i in range(len(rows))]
                weight = [[norm[i][c] * lengths[i] for c in range(num_chunks)] for i in range(len(rows))]
                total = sum(map(sum, weight))
                acc = sum(weight[i][block_chunk[i]] for i in range(len(rows)))
                chosen = {i: {block_chunk[i]} for i in range(len(rows))}
                pairs = [(i, c) for i in range(len(rows)) for c in range(num_chunks) if c != block_chunk[i]]
                for i, c in sorted(pairs, key=lambda p: (-norm[p[0]][p[1]], p[0], p[1])):
                    if config.threshold < 1 and acc >= (config.threshold - SHARE_TOL) * total:
                        break
                    chosen[i].add(c)
                    acc += weight[i][c]
                for i in chosen:
                    kept[bi, hi, i] = chosen[i]
    return kept


def token_mask(plan, ctx):
    """The plan's computed (query, key) pairs in the original token order: bool (B, H, S, S)."""
    s, bs = ctx.seq_len, plan.block_size
    block = torch.arange(s) // bs
    permuted = plan.layout[:, :, block][:, :, :, block]
    if plan.order is None:
        return permuted
    inverse = torch.argsort(plan.order.view(-1))  # original token -> its position in the plan's order
    return permuted[:, :, inverse][:, :, :, inverse]


# -- partitions


@settings(max_examples=40, deadline=None)
@given(grid=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 7)),
       chunk=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5)), kind=st.sampled_from(["1d", "2d", "3d"]),
       text_len=st.integers(0, 9), position=st.sampled_from(["prefix", "suffix"]), block=st.sampled_from([1, 3, 4, 8]))
def test_partition_covers_every_token_once_and_matches_brute_force(grid, chunk, kind, text_len, position, block):
    ctx = _ctx(grid, text_len, position)
    sizes = {"1d": dict(chunk_1d=chunk[0]), "2d": dict(chunk_2d=chunk[1:]), "3d": dict(chunk_3d=chunk)}[kind]
    shape = VmobaConfig(**sizes).chunk_shape(kind, grid)
    part = vmoba_partition(ctx, shape, block)
    order = torch.arange(ctx.seq_len) if part.order is None else part.order
    assert sorted(order.tolist()) == list(range(ctx.seq_len))  # a permutation: every token exactly once
    expected_order, position_chunk, block_chunk, lengths = brute_partition(grid, shape, text_len, position, block)
    assert order.tolist() == expected_order
    assert part.token_chunk.tolist() == position_chunk
    assert part.block_chunk.tolist() == block_chunk and part.block_len.tolist() == lengths
    # Every chunk is one contiguous run of the order, and holds exactly the tokens of its box.
    assert part.num_chunks == math.prod(-(-n // c) for n, c in zip(grid, shape))
    runs = torch.unique_consecutive(part.token_chunk, return_counts=True)
    assert runs[0].tolist() == list(range(part.num_chunks))
    per_axis = [[min(c, n - i * c) for i in range(-(-n // c))] for n, c in zip(grid, shape)]
    assert runs[1].tolist() == [a * b * c for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]
    assert int(part.chunk_tokens.sum()) == sum(lengths)


def test_paper_options_are_the_papers_wan_480p_partition():
    config = VmobaConfig(**PAPER_OPTIONS)
    grid = (21, 30, 52)  # Wan 2.1 480p, Table 4 of the paper: 7, 24 and 72 chunks
    assert config.chunk_shape("1d", grid) == (3, 30, 52)
    assert config.chunk_shape("2d", grid) == (21, 5, 13)
    assert config.chunk_shape("3d", grid) == (7, 5, 13)
    counts = [vmoba_partition(_ctx(grid), config.chunk_shape(kind, grid), 64).num_chunks for kind in ("1d", "2d", "3d")]
    assert counts == [7, 24, 72]
    assert [config.topk_count(kind, c) for kind, c in zip(("1d", "2d", "3d"), counts)] == [2, 6, 18]
    # The same config on the demo grid: 2 frames, 3 x 4 tiles, 5 x 3 x 4 cubes (the last of an axis short).
    assert [config.chunk_shape(kind, (16, 16, 16)) for kind in ("1d", "2d", "3d")] == [(2, 16, 16), (16, 3, 4), (5, 3, 4)]


def test_defaults_are_one_block_cubes_in_every_layer():
    config = VmobaConfig()
    assert config.cycle == ("3d",) and config.threshold == 0.25 and config.selection == "threshold"
    assert [layer_kind(config, _ctx((4, 4, 4), layer=i)) for i in range(3)] == ["3d"] * 3
    # Tokens, not fractions: a cube is one 64-token block on the demo grid and on Wan 2.1 480p alike.
    assert config.chunk_shape("3d", (32, 16, 16)) == config.chunk_shape("3d", (21, 30, 52)) == (4, 4, 4)


def test_chunk_kind_cycles_by_layer_and_reads_the_site_name():
    config = VmobaConfig(**PAPER_OPTIONS)
    assert [layer_kind(config, _ctx((4, 4, 4), layer=i)) for i in range(7)] == ["1d", "2d", "3d"] * 2 + ["1d"]
    assert layer_kind(config, _ctx((4, 4, 4), site="transformer_2.blocks.5.attn1")) == "3d"  # not the 2 or the 1
    assert layer_kind(config, _ctx((4, 4, 4))) == "1d"
    assert layer_kind(VmobaConfig(cycle=("2d",)), _ctx((4, 4, 4), layer=4)) == "2d"
    # The planner uses the kind of the call's layer: 1-D chunks with no text need no reordering, 2-D ones do.
    q = torch.randn(1, 64, 1, 8)
    planner = build_planner(resolve_config("vmoba", block_size=8, **PAPER_OPTIONS))
    assert planner.plan(q, q, _ctx((4, 4, 4), batch=1, heads=1, layer=3), SiteState()).order is None
    assert planner.plan(q, q, _ctx((4, 4, 4), batch=1, heads=1, layer=4), SiteState()).order is not None


# -- selection


SELECTIONS = [
    {"selection": "threshold", "threshold_scope": "query"},
    {"selection": "threshold", "threshold_scope": "head"},
    {"selection": "topk"},
]


@settings(max_examples=30, deadline=None)
@given(grid=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6)), kind=st.sampled_from(["1d", "2d", "3d"]),
       chunk=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), text_len=st.integers(0, 6),
       position=st.sampled_from(["prefix", "suffix"]), block=st.sampled_from([2, 4, 5]), mode=st.sampled_from(range(3)),
       threshold=st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0]), topk=st.integers(1, 6), kv_share=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_selection_matches_brute_force(grid, kind, chunk, text_len, position, block, mode, threshold, topk, kv_share, seed):
    ctx = _ctx(grid, text_len, position, batch=2, heads=2, layer=0)
    config = VmobaConfig(block_size=block, cycle=(kind,), chunk_1d=chunk[0], chunk_2d=chunk[1:], chunk_3d=chunk,
                         threshold=threshold, topk=topk, **SELECTIONS[mode])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, ctx.seq_len, 2, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, ctx.seq_len, 2 // kv_share, 8, generator=gen, dtype=torch.float64)
    plan = build_planner(config).plan(q, k, ctx, SiteState())
    order, _, block_chunk, lengths = brute_partition(grid, config.chunk_shape(kind, grid), text_len, position, block)
    n = -(-ctx.seq_len // block)
    expected = torch.ones(2, 2, n, n, dtype=torch.bool)
    if lengths:
        scores = brute_scores(q, k, order, block_chunk, lengths, block)
        kept = brute_select(scores, block_chunk, lengths, config, max(block_chunk) + 1)
        for (bi, hi, i), chunks in kept.items():
            expected[bi, hi, i, : len(lengths)] = torch.tensor([c in chunks for c in block_chunk])
    assert (plan.order.view(-1).tolist() if plan.order is not None else list(range(ctx.seq_len))) == order
    assert torch.equal(plan.layout, expected)


def test_scores_are_the_mean_gate_of_the_block_and_share_grouped_key_heads():
    ctx = _ctx((2, 4, 4), layer=1)
    part = vmoba_partition(ctx, VmobaConfig().chunk_shape("2d", ctx.grid), 4)
    q, k = torch.randn(1, 32, 4, 8, dtype=torch.float64), torch.randn(1, 32, 2, 8, dtype=torch.float64)
    grouped = vmoba_scores(q, k, part, 4)
    torch.testing.assert_close(grouped, vmoba_scores(q, k.repeat_interleave(2, dim=2), part, 4))
    # VMoBA gates each query: the block's score is the mean of its queries' gate scores.
    order = part.video_index
    gates = torch.einsum("bshd,bhcd->bhsc", q[:, order], torch.stack([
        k[:, order][:, (part.block_chunk.repeat_interleave(part.block_len) == c)].mean(1) for c in range(part.num_snapped)
    ], dim=2).repeat_interleave(2, dim=1))
    torch.testing.assert_close(grouped, gates.view(1, 4, -1, 4, part.num_snapped).mean(3))


# -- dense limits, density targets, awkward shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{"threshold": 1.0}, {"threshold": 1.0, "threshold_scope": "head"},
                                     {"selection": "topk", "topk": 1.0}, {"density": 1.0}])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_threshold_one_is_dense_attention(dtype, options, layer):
    ctx = _ctx((3, 5, 7), text_len=5, position="prefix", layer=layer)  # 110 tokens: not a multiple of the block
    q, k, v = (torch.randn(2, ctx.seq_len, 2, 16).to(dtype) for _ in range(3))
    config = resolve_config("vmoba", block_size=16, chunk_2d=(2, 3), chunk_3d=(2, 2, 3), **options)
    plan = build_planner(config).plan(q, k, ctx, SiteState())
    assert plan.density == pytest.approx(1.0)
    expected = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    for backend in ("reference", "gather"):
        out = kernels.run(q, k, v, plan, backend=backend)
        torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("options", SELECTIONS)
@pytest.mark.parametrize("target", [0.15, 0.3, 0.6])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_density_mode_reaches_the_target(options, target, layer):
    ctx = _ctx((8, 8, 8), layer=layer)
    config = resolve_config("vmoba", block_size=16, density=target, **options)
    q, k = torch.randn(2, ctx.seq_len, 2, 16), torch.randn(2, ctx.seq_len, 2, 16)
    planner = build_planner(config)
    plan = planner.plan(q, k, ctx, SiteState())
    part = planner.partition(ctx, SiteState())
    # At least the target, and over it by less than the largest (query block, chunk) pair that can be added.
    step = float(part.block_len.max() * part.chunk_tokens.max()) / ctx.seq_len**2
    densities = plan.head_densities()
    assert (densities >= target - 1e-12).all() and (densities < target + step).all()


@pytest.mark.parametrize("position", ["prefix", "suffix"])
@pytest.mark.parametrize("options", [*SELECTIONS, {"density": 0.3}])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_awkward_shapes_keep_text_and_run_on_every_backend(position, options, layer):
    ctx = _ctx((3, 6, 5), text_len=7, position=position, batch=2, heads=3, layer=layer)  # S = 97
    q, k, v = (torch.randn(2, ctx.seq_len, 3, 16) for _ in range(3))
    config = resolve_config("vmoba", block_size=8, chunk_2d=(2, 2), chunk_3d=(2, 3, 2), **options)
    plan = build_planner(config).plan(q, k, ctx, SiteState())
    plan.check_rows()
    assert plan.layout.shape == (2, 3, 13, 13) and plan.density < 1.0
    mask = token_mask(plan, ctx)
    text = ctx.text_token_mask()
    assert mask[:, :, text].all() and mask[:, :, :, text].all()  # text rows and columns in the original order
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask).transpose(1, 2)
    for backend in ("reference", "gather"):
        torch.testing.assert_close(kernels.run(q, k, v, plan, backend=backend), expected, atol=2e-5, rtol=2e-5)


def test_plans_follow_the_replan_schedule_per_site():
    attention = SparseAttention("vmoba", min_seq_len=0, dense_steps=0, block_size=16, replan_every=2)
    q, k, v = (torch.randn(1, 256, 2, 16) for _ in range(3))
    plans = []
    for step in range(4):
        q = q + 0.5 * torch.randn_like(q)
        attention(q, k, v, grid=(4, 8, 8), layer=1, step=step, num_steps=4)
        plans.append(attention.state(_ctx((4, 8, 8), batch=1, heads=2, layer=1, site="layer1")).plan)
    assert plans[0] is plans[1] and plans[2] is plans[3] and plans[1] is not plans[2]
    assert plans[0].density < 1.0


def test_text_only_blocks_and_single_chunks_plan_dense():
    # Fewer video tokens than a block: no video block, everything is a text row or column.
    ctx = _ctx((1, 2, 3), text_len=4, position="prefix", batch=1, heads=1)
    q = torch.randn(1, ctx.seq_len, 1, 8)
    assert build_planner(resolve_config("vmoba", block_size=8)).plan(q, q, ctx, SiteState()).density == 1.0
    # One frame: a 1-D layer has a single chunk, its own.
    ctx = _ctx((1, 8, 8), batch=1, heads=1, layer=0)
    q = torch.randn(1, 64, 1, 8)
    assert build_planner(resolve_config("vmoba", block_size=8, cycle=("1d",))).plan(q, q, ctx, SiteState()).density == 1.0


@pytest.mark.parametrize("options", [
    {"threshold": 0.0}, {"threshold": 1.5}, {"threshold": True}, {"selection": "top_p"}, {"threshold_scope": "row"},
    {"topk": 0}, {"topk": (1, 2)}, {"topk": 1.5}, {"density": 0.0}, {"density": "x"}, {"cycle": ()}, {"cycle": ("4d",)},
    {"chunk_1d": 0}, {"chunk_2d": (1, 2, 3)}, {"chunk_3d": (1, 0.0, 2)}, {"chunk_2d": (2, True)},
])
def test_bad_options_raise(options):
    with pytest.raises(ConfigError):
        resolve_config("vmoba", **options)


def test_config_normalises_scalars():
    config = resolve_config("vmoba", topk=3, cycle="3d", chunk_1d=2, chunk_2d=[4, 0.5])
    assert config.topk == (3, 3, 3) and config.cycle == ("3d",) and config.chunk_2d == (4, 0.5)
    assert dataclasses.replace(config, topk=0.5).topk == (0.5, 0.5, 0.5)
