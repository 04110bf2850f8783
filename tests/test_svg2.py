"""`svg2`: k-means against a loop reference, the centroid top-p selection against brute force, the cluster
permutation, the variable-block plan against the brute-force cluster-pair mask, and warm starts per site."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_dit
from sparse_dit import ConfigError, SparseAttention, kernels
from sparse_dit.attention import make_context
from sparse_dit.kernels.layout import finish, permute
from sparse_dit.kernels.reference import token_mask
from sparse_dit.patterns import PlanContext, build_planner, resolve_config
from sparse_dit.patterns import svg2
from sparse_dit.plan import AttentionPlan
from sparse_dit.state import SiteState

from conftest import TOL
from tiny_models import make_pipeline


# --- k-means ---------------------------------------------------------------------------------------------


def loop_kmeans(x, centroids, iterations):
    """Lloyd's k-means with explicit loops in float64: nearest centroid (lowest index on ties), then means;
    an empty cluster keeps its centroid."""
    x, c = x.double(), centroids.double().clone()
    bh, n, _ = x.shape
    labels = torch.zeros(bh, n, dtype=torch.long)
    for _ in range(iterations):
        for r in range(bh):
            for i in range(n):
                dist = [float(((x[r, i] - c[r, j]) ** 2).sum()) for j in range(c.shape[1])]
                labels[r, i] = min(range(len(dist)), key=lambda j: (dist[j], j))
            for j in range(c.shape[1]):
                members = x[r][labels[r] == j]
                if len(members):
                    c[r, j] = members.mean(dim=0)
    return labels, c


def inertia(x, clusters):
    """Sum of squared distances of every point to its cluster's centroid, per row."""
    centre = clusters.centroids.double().gather(1, clusters.labels[..., None].expand(-1, -1, x.shape[-1]))
    return ((x.double() - centre) ** 2).sum(dim=(1, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iterations", [1, 4])
def test_kmeans_matches_a_loop_reference(seed, iterations):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, 4, generator=gen) * 2
    start = svg2.random_centroids(x, 5, torch.Generator().manual_seed(seed))
    found = svg2.kmeans(x, start, iterations)
    labels, centroids = loop_kmeans(x, start, iterations)
    assert torch.equal(found.labels, labels)
    torch.testing.assert_close(found.centroids.double(), centroids, atol=1e-5, rtol=1e-5)
    assert torch.equal(found.sizes, torch.stack([torch.bincount(row, minlength=5) for row in labels]))


def test_random_centroids_are_distinct_points_of_their_row():
    x = torch.randn(4, 30, 3)
    start = svg2.random_centroids(x, 7, torch.Generator().manual_seed(0))
    for r in range(4):
        index = [int((x[r] == c).all(dim=-1).nonzero()) for c in start[r]]
        assert len(set(index)) == 7
    again = svg2.random_centroids(x, 7, torch.Generator().manual_seed(0))
    assert torch.equal(start, again)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 60), c=st.integers(1, 12))
def test_kmeans_inertia_never_increases(seed, n, c):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 3, generator=gen)
    found = svg2.kmeans(x, svg2.random_centroids(x, min(c, n), gen), 1)
    previous = inertia(x, found)
    for _ in range(6):
        found = svg2.kmeans(x, found.centroids, 1)
        now = inertia(x, found)
        assert (now <= previous * (1 + 1e-5) + 1e-6).all()
        previous = now


def test_an_empty_cluster_keeps_its_centroid_and_size_zero():
    x = torch.randn(2, 20, 3)
    start = svg2.random_centroids(x, 4, torch.Generator().manual_seed(0))
    start[:, 3] = 1e3  # nothing is nearest to it
    found = svg2.kmeans(x, start, 3)
    assert (found.sizes[:, 3] == 0).all() and (found.sizes.sum(-1) == 20).all()
    assert torch.equal(found.centroids[:, 3], start[:, 3])


# --- centroid attention and the top-p choice ---------------------------------------------------------------


def test_centroid_probabilities_weight_by_cluster_size():
    qc, kc = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4)
    sizes = torch.tensor([[[3, 0, 1, 7, 2]]])
    probs = svg2.centroid_probabilities(qc, kc, sizes, 0.5)
    weighted = sizes[..., None, :] * torch.exp(qc @ kc.transpose(-1, -2) * 0.5)
    torch.testing.assert_close(probs, weighted / weighted.sum(-1, keepdim=True))
    assert (probs[..., 1] == 0).all()


def loop_query_probabilities(queries, q_labels, k_centroids, k_sizes, scale):
    """Per query cluster, the mean over its queries of the size-weighted softmax over key centroids, in float64."""
    bh, n, _ = queries.shape
    cq = int(q_labels.max()) + 1
    out = torch.zeros(bh, cq, k_centroids.shape[1], dtype=torch.float64)
    for r in range(bh):
        for c in range(cq):
            members = queries[r][q_labels[r] == c].double()
            if len(members):
                weighted = k_sizes[r].double() * torch.exp(members @ k_centroids[r].double().T * scale)
                out[r, c] = (weighted / weighted.sum(-1, keepdim=True)).mean(0)
    return out


@pytest.mark.parametrize("budget", [None, 7])  # one chunk; chunks of a row or less, cut across rows
def test_query_probabilities_average_every_querys_estimate_over_its_cluster(budget):
    gen = torch.Generator().manual_seed(3)
    queries, k_centroids = torch.randn(3, 29, 8, generator=gen), torch.randn(3, 6, 8, generator=gen)
    q_labels = torch.randint(0, 4, (3, 29), generator=gen)
    q_labels[:, :4] = torch.arange(4)  # every query cluster holds a query ...
    q_labels[2][q_labels[2] == 1] = 0  # ... except cluster 1 of the last row: a row of zeros
    q_sizes = torch.stack([torch.bincount(row, minlength=4) for row in q_labels])
    k_sizes = torch.tensor([[3, 0, 1, 7, 2, 5]] * 3)
    probs = svg2.query_probabilities(queries, q_labels, q_sizes, k_centroids, k_sizes, 0.4, budget=budget)
    expected = loop_query_probabilities(queries, q_labels, k_centroids, k_sizes, 0.4)
    torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=1e-5)
    assert (probs[..., 1] == 0).all() and (probs[2, 1] == 0).all()
    nonempty = q_sizes > 0
    torch.testing.assert_close(probs.sum(-1)[nonempty], torch.ones(int(nonempty.sum())))


def test_query_probabilities_are_the_exact_mass_when_keys_sit_on_their_centroids():
    # Every key equal to its cluster's centroid: each query's estimate is its exact attention mass per key cluster,
    # so the average is the cluster's exact mean mass, which the centroid estimate misses for a spread cluster.
    gen = torch.Generator().manual_seed(0)
    k_centroids = torch.randn(1, 5, 8, generator=gen) * 2
    k_labels = torch.randint(0, 5, (1, 40), generator=gen)
    k_labels[0, :5] = torch.arange(5)
    keys = k_centroids[0][k_labels[0]][None]
    k_sizes = torch.bincount(k_labels[0], minlength=5)[None]
    queries = torch.randn(1, 30, 8, generator=gen) * 2
    q_labels = torch.arange(30)[None] % 3
    q_sizes = torch.full((1, 3), 10)
    exact = (queries @ keys.transpose(-1, -2) * 0.5).softmax(-1)  # (1, 30, 40)
    per_cluster = torch.zeros(1, 30, 5).scatter_add_(2, k_labels[:, None, :].expand(1, 30, 40), exact)
    mean_mass = torch.stack([per_cluster[0, q_labels[0] == c].mean(0) for c in range(3)])[None]
    probs = svg2.query_probabilities(queries, q_labels, q_sizes, k_centroids, k_sizes, 0.5)
    torch.testing.assert_close(probs, mean_mass, atol=1e-5, rtol=1e-5)
    q_centroids = torch.stack([queries[0, q_labels[0] == c].mean(0) for c in range(3)])[None]
    assert (svg2.centroid_probabilities(q_centroids, k_centroids, k_sizes, 0.5) - mean_mass).abs().max() > 0.05


@pytest.mark.parametrize("estimate", svg2.ESTIMATES)
def test_decide_keeps_the_top_p_clusters_of_its_estimate(estimate):
    ctx = _ctx((2, 4, 5), batch=2, heads=2)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, ctx.seq_len, 2, 16, generator=gen) * 2, torch.randn(2, ctx.seq_len, 2, 16, generator=gen) * 2
    planner = _svg2(num_q_centroids=4, num_k_centroids=9, top_p=0.7, min_kc_ratio=0.0, estimate=estimate)
    qc, kc, keep = planner.decide(q, k, ctx, SiteState())
    scale = 16 ** -0.5
    if estimate == "centroids":
        probs = svg2.centroid_probabilities(qc.centroids, kc.centroids, kc.sizes, scale)
    else:
        rows = q.transpose(1, 2).reshape(4, ctx.seq_len, 16)
        probs = svg2.query_probabilities(rows, qc.labels.flatten(0, 1), qc.sizes.flatten(0, 1), kc.centroids.flatten(0, 1),
                                         kc.sizes.flatten(0, 1), scale).view(2, 2, 4, 9)
    assert torch.equal(keep, svg2.select_key_clusters(probs, 0.7))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), ck=st.integers(1, 15), top_p=st.floats(0.05, 0.999), sharp=st.floats(0.1, 5.0))
def test_top_p_keeps_the_minimal_prefix_that_reaches_p(seed, ck, top_p, sharp):
    gen = torch.Generator().manual_seed(seed)
    probs = (torch.randn(2, 3, ck, generator=gen) * sharp).softmax(-1)
    keep = svg2.select_key_clusters(probs, top_p)
    for row, kept in zip(probs.view(-1, ck).tolist(), keep.view(-1, ck).tolist()):
        ranked = sorted(range(ck), key=lambda j: (-row[j], j))
        count = next(c for c in range(1, ck + 1) if sum(row[j] for j in ranked[:c]) >= top_p - 1e-6 or c == ck)
        assert {j for j in range(ck) if kept[j]} == set(ranked[:count])
        assert sum(row[j] for j in ranked[:count]) >= top_p - 1e-5  # keeps at least top_p ...
        assert count == 1 or sum(row[j] for j in ranked[: count - 1]) < top_p  # ... and no fewer would


@pytest.mark.parametrize("ratio, ck, expected", [(0.0, 10, 1), (0.1, 10, 1), (0.25, 10, 3), (0.1, 25, 3), (1.0, 7, 7)])
def test_min_kc_ratio_forces_the_top_clusters(ratio, ck, expected):
    probs = torch.zeros(1, 1, 2, ck)
    probs[..., 0] = 1.0  # top_p is reached by one cluster
    keep = svg2.select_key_clusters(probs, 0.9, ratio)
    assert (keep.sum(-1) == max(1, math.ceil(ratio * ck - 1e-9), expected)).all()
    assert keep[..., 0].all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), ck=st.integers(1, 12), density=st.floats(0.01, 1.0))
def test_density_keeps_the_fewest_top_clusters_that_hold_the_share_of_keys(seed, ck, density):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.randn(1, 2, 3, ck, generator=gen).softmax(-1)
    sizes = torch.randint(0, 9, (1, 2, ck), generator=gen)
    sizes[..., 0] += 1
    keep = svg2.select_key_clusters(probs, 0.9, k_sizes=sizes, density=density)
    for h in range(2):
        total = int(sizes[0, h].sum())
        for i in range(3):
            row = probs[0, h, i].tolist()
            ranked = sorted(range(ck), key=lambda j: (-row[j], j))
            held = [sum(int(sizes[0, h, j]) for j in ranked[:c]) for c in range(ck + 1)]
            count = next((c for c in range(1, ck + 1) if held[c] >= density * total - 1e-9), ck)
            assert {j for j in range(ck) if keep[0, h, i, j]} == set(ranked[:count])


def test_top_p_one_keeps_every_cluster_even_where_the_estimate_underflows():
    probs = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    assert svg2.select_key_clusters(probs, 1.0).all()


# --- the plan ------------------------------------------------------------------------------------------------


def _ctx(grid=(3, 5, 7), text_len=0, position="none", batch=2, heads=2, branch=None):
    return PlanContext(grid=grid, text_len=text_len, text_position=position, batch=batch, heads=heads, branch=branch)


def _svg2(**options):
    return build_planner(resolve_config("svg2", **{"min_seq_len": 0, "dense_steps": 0, **options}))


def original_order_mask(plan, batch, heads):
    """The plan's token mask moved back to the original token order: bool (B, H, S, S)."""
    s = plan.seq_len
    permuted = token_mask(plan, batch, heads)
    rows = plan.order.expand(batch, heads, s)
    cols = plan.key_order.expand(batch, heads, s)
    out = torch.zeros(batch, heads, s, s, dtype=torch.bool)
    b, h = torch.meshgrid(torch.arange(batch), torch.arange(heads), indexing="ij")
    out[b[..., None, None], h[..., None, None], rows[..., :, None], cols[..., None, :]] = permuted
    return out


def brute_force_mask(ctx, q_labels, k_labels, keep):
    """Query token i attends key token j iff either is text or keep[label(i), label(j)]: bool (B, H, S, S)."""
    b, h = keep.shape[:2]
    s, start, n = ctx.seq_len, ctx.video_start, ctx.num_video_tokens
    mask = torch.ones(b, h, s, s, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            ql, kl = q_labels[bi, hi], k_labels[bi, hi]
            mask[bi, hi, start : start + n, start : start + n] = keep[bi, hi][ql[:, None], kl[None, :]]
    return mask


CASES = [  # (grid, text_len, position, batch, heads, kv_heads, branch, options)
    ((3, 5, 7), 0, "none", 1, 2, 2, None, dict(num_q_centroids=4, num_k_centroids=7)),
    ((3, 5, 7), 5, "prefix", 2, 2, 2, "cond_uncond", dict(num_q_centroids=6, num_k_centroids=9, top_p=0.5)),
    ((2, 3, 11), 9, "suffix", 2, 4, 2, "cond_uncond", dict(num_q_centroids=5, num_k_centroids=12, top_p=0.7)),
    # Tokens drawn from 5 vectors in 20 clusters: at most 5 clusters are not empty.
    ((1, 7, 9), 3, "prefix", 2, 3, 1, None, dict(num_q_centroids=20, num_k_centroids=20, top_p=0.6)),
    ((2, 4, 5), 0, "none", 2, 2, 2, None, dict(num_q_centroids=3, num_k_centroids=8, density=0.3)),
]


@pytest.mark.parametrize("grid, text_len, position, batch, heads, kv_heads, branch, options", CASES)
def test_plan_is_exactly_the_cluster_pair_mask(grid, text_len, position, batch, heads, kv_heads, branch, options):
    ctx = _ctx(grid, text_len, position, batch, heads, branch)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, ctx.seq_len, heads, 16, generator=gen)
    k = torch.randn(batch, ctx.seq_len, kv_heads, 16, generator=gen)
    repeated = options.get("num_k_centroids") == 20
    if repeated:
        pick = torch.randint(0, 5, (ctx.seq_len,), generator=gen)
        q, k = q[:, :5][:, pick], k[:, :5][:, pick]
    planner = _svg2(**options)
    qc, kc, keep = planner.decide(q, k, ctx, SiteState())
    plan = svg2.cluster_plan(qc, kc, keep, ctx)
    plan.check_rows()
    expected = brute_force_mask(ctx, qc.labels, kc.labels, keep)
    assert torch.equal(original_order_mask(plan, batch, heads), expected)
    # Blocks are the clusters, unpadded: the computed fraction is the mask's.
    torch.testing.assert_close(plan.head_densities(), expected.double().mean(dim=(-1, -2)))
    # Every block of the permuted order holds one cluster: its tokens share a label, and its length is the size.
    start = ctx.video_start
    for labels, sizes, order, bounds in ((qc.labels, qc.sizes, plan.order, plan.q_bounds), (kc.labels, kc.sizes, plan.k_order, plan.k_bounds)):
        video_blocks = slice(1, None) if position == "prefix" else slice(0, sizes.shape[-1])
        assert torch.equal(bounds.diff(dim=-1)[..., video_blocks], sizes)
        for bi in range(batch):
            for hi in range(heads):
                for c in range(sizes.shape[-1]):
                    lo, hi_ = bounds[bi, hi, video_blocks.start + c], bounds[bi, hi, video_blocks.start + c + 1]
                    assert (labels[bi, hi, order[bi, hi, lo:hi_] - start] == c).all()
    if repeated:
        assert (kc.sizes == 0).any() and (plan.block_lengths("k") == 0).any()
    # And the kernel computes what the mask says.
    v = torch.randn(batch, ctx.seq_len, kv_heads, 16, generator=gen)
    out = kernels.run(q, k, v, plan, backend="reference")
    kr, vr = (x.repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2) for x in (k, v))
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=expected).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_cfg_rows_cluster_on_their_own():
    """Rows of a cond_uncond batch get their own clusters, from the same starting positions: the same tokens in
    row 1 as in row 0 give the same plan rows, other tokens others."""
    ctx = _ctx((2, 4, 4), batch=2, heads=1, branch="cond_uncond")
    q, k = torch.randn(1, ctx.seq_len, 1, 8), torch.randn(1, ctx.seq_len, 1, 8)
    same = _svg2(num_q_centroids=3, num_k_centroids=4).plan(q.repeat(2, 1, 1, 1), k.repeat(2, 1, 1, 1), ctx, SiteState())
    assert torch.equal(same.layout[0], same.layout[1]) and torch.equal(same.order[0], same.order[1])
    other = _svg2(num_q_centroids=3, num_k_centroids=4).plan(torch.cat([q, q.flip(1)]), torch.cat([k, -k]), ctx, SiteState())
    assert not torch.equal(other.order[0], other.order[1])


@pytest.mark.parametrize("position, text_len", [("none", 0), ("prefix", 6), ("suffix", 4)])
def test_permutation_round_trips_exactly(position, text_len):
    ctx = _ctx((2, 5, 5), text_len, position, batch=2, heads=3)
    q, k = torch.randn(2, ctx.seq_len, 3, 8), torch.randn(2, ctx.seq_len, 3, 8)
    plan = _svg2(num_q_centroids=4, num_k_centroids=6).plan(q, k, ctx, SiteState())
    for order in (plan.order, plan.k_order):
        assert torch.equal(order.sort(dim=-1).values, torch.arange(ctx.seq_len).expand_as(order))
    if text_len:  # text stays in place, one block, first or last
        text = ctx.text_token_mask().nonzero().flatten()
        where = slice(0, text_len) if position == "prefix" else slice(ctx.seq_len - text_len, None)
        assert (plan.order[..., where] == text).all() and (plan.k_order[..., where] == text).all()
    x = torch.randn(2, 3, ctx.seq_len, 8)
    pq, pk, pv = permute(plan, x, x, x * 2)
    assert torch.equal(pq, x.gather(2, plan.order[..., None].expand_as(x)))
    assert torch.equal(pk, x.gather(2, plan.k_order[..., None].expand_as(x))) and torch.equal(pv, pk * 2)
    restored, _ = finish(plan, pq, None)
    assert torch.equal(restored, x)


def test_separate_key_order_applies_the_model_mask_in_the_original_order():
    """The reference kernel reads a model mask in the original order under different query and key orders."""
    s, b, h = 30, 2, 2
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, s, h, 8, generator=gen) for _ in range(3))
    order = torch.stack([torch.randperm(s, generator=gen) for _ in range(b * h)]).view(b, h, s)
    k_order = torch.stack([torch.randperm(s, generator=gen) for _ in range(b * h)]).view(b, h, s)
    bounds = torch.tensor([0, 7, 7, 19, 30]).expand(b, h, 5)
    layout = torch.rand(b, h, 4, 4, generator=gen) < 0.6
    layout[..., 0] = True
    plan = AttentionPlan(seq_len=s, layout=layout, q_bounds=bounds, k_bounds=bounds, order=order, k_order=k_order)
    model = torch.rand(b, 1, s, s, generator=gen) < 0.8
    model[..., 0] = True
    mask = original_order_mask(plan, b, h)
    out = kernels.run(q, k, v, plan, backend="reference", attn_mask=model)
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask & model).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_p_one_is_dense_attention(dtype):
    ctx = _ctx((3, 5, 7), text_len=5, position="suffix", batch=2, heads=2, branch="cond_uncond")
    q, k, v = (torch.randn(2, ctx.seq_len, 2, 16).to(dtype) for _ in range(3))
    plan = _svg2(num_q_centroids=5, num_k_centroids=11, top_p=1.0).plan(q, k, ctx, SiteState())
    assert plan.density == pytest.approx(1.0)
    out = kernels.run(q, k, v, plan, backend="reference")
    expected = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


def test_lower_top_p_computes_less():
    ctx = _ctx((4, 6, 6), batch=1, heads=2)
    q, k = torch.randn(1, ctx.seq_len, 2, 16) * 3, torch.randn(1, ctx.seq_len, 2, 16) * 3
    densities = [_svg2(num_q_centroids=6, num_k_centroids=20, top_p=p, min_kc_ratio=0.0).plan(q, k, ctx, SiteState()).density
                 for p in (0.3, 0.6, 0.9, 1.0)]
    assert densities == sorted(densities) and densities[0] < densities[-1] == pytest.approx(1.0)


# --- state: warm starts, branches, the re-plan schedule ---------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Counts the k-means helper calls svg2 makes and records the centroids each assignment starts from."""
    calls = {"assign": 0, "update": 0, "starts": []}

    def assign(x, centroids, **kw):
        calls["assign"] += 1
        calls["starts"].append(centroids.clone())
        return sparse_dit.ops.kmeans_assign(x, centroids, **kw)

    def update(x, labels, centroids):
        calls["update"] += 1
        return sparse_dit.ops.kmeans_update(x, labels, centroids)

    monkeypatch.setattr(svg2, "kmeans_assign", assign)
    monkeypatch.setattr(svg2, "kmeans_update", update)
    return calls


def test_later_steps_warm_start_from_the_cached_centroids(counted):
    attn = SparseAttention("svg2", num_q_centroids=3, num_k_centroids=5, kmeans_iter_init=7, kmeans_iter_step=2,
                           min_seq_len=0, dense_steps=1, replan_every=1)
    q, k, v = (torch.randn(2, 40, 2, 8) for _ in range(3))
    run = dict(grid=(1, 5, 8), site="blocks.0.attn1", branch="cond", num_steps=4)
    attn(q, k, v, step=0, **run)  # dense warm-up: no clustering
    assert counted["assign"] == counted["update"] == 0
    attn(q, k, v, step=1, **run)  # first sparse step: queries and keys from random tokens
    assert counted["assign"] == counted["update"] == 2 * 7
    state = attn.state(make_context(q, (1, 5, 8), site="blocks.0.attn1", branch="cond"))
    cached_q, cached_k = state.centroids.clone(), state.extra["k_centroids"].clone()
    assert cached_q.shape == (2, 2, 3, 8) and cached_k.shape == (2, 2, 5, 8)
    counted["starts"].clear()
    attn(q * 1.1, k, v, step=2, **run)  # later steps: kmeans_iter_step iterations from the cache
    assert counted["assign"] == counted["update"] == 2 * 7 + 2 * 2
    starts = counted["starts"]
    assert torch.equal(starts[0], cached_q.view(4, 3, 8)) and torch.equal(starts[2], cached_k.view(4, 5, 8))
    attn.reset()  # a new pipeline call starts cold again
    attn(q, k, v, step=1, **run)
    assert counted["assign"] == 2 * 7 + 2 * 2 + 2 * 7


def test_cfg_branches_keep_their_own_centroids(counted):
    attn = SparseAttention("svg2", num_q_centroids=3, num_k_centroids=5, kmeans_iter_init=4, kmeans_iter_step=1,
                           min_seq_len=0, dense_steps=0, replan_every=1)
    q, k, v = (torch.randn(1, 40, 2, 8) for _ in range(3))
    for step in range(2):
        for branch in ("cond", "uncond"):
            attn(q if branch == "cond" else -q, k, v, grid=(1, 5, 8), site="s", branch=branch, step=step, num_steps=2)
    # Each branch initialises once (4 iterations, queries and keys) and warm-starts once (1 iteration).
    assert counted["assign"] == 2 * (2 * 4 + 2 * 1)
    assert set(attn.states.keys()) == {("s", "cond"), ("s", "uncond")}
    cond, uncond = (attn.state(make_context(q, (1, 5, 8), site="s", branch=b)) for b in ("cond", "uncond"))
    assert not torch.equal(cond.centroids, uncond.centroids)


def test_replan_schedule_reuses_the_plan_between_replans(counted):
    attn = SparseAttention("svg2", num_q_centroids=3, num_k_centroids=5, kmeans_iter_init=2, kmeans_iter_step=1,
                           min_seq_len=0, dense_steps=0, replan_every=2)
    q, k, v = (torch.randn(1, 40, 2, 8) for _ in range(3))
    assert attn.planner.cache_key(PlanContext(grid=(1, 5, 8))) is None  # dynamic: kept in state, never cached
    for step in range(4):
        attn(q, k, v, grid=(1, 5, 8), site="s", step=step, num_steps=4)
    assert counted["assign"] == 2 * 2 + 2 * 1  # planned at steps 0 and 2 only


def test_a_changed_batch_starts_cold():
    planner = _svg2(num_q_centroids=3, num_k_centroids=4, kmeans_iter_init=3, kmeans_iter_step=1)
    state = SiteState()
    planner.plan(torch.randn(2, 40, 2, 8), torch.randn(2, 40, 2, 8), _ctx((1, 5, 8), batch=2), state)
    planner.plan(torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2, 8), _ctx((1, 5, 8), batch=1), state)
    assert state.centroids.shape == (1, 2, 3, 8)


# --- defaults and config --------------------------------------------------------------------------------------


def test_default_cluster_counts_scale_with_the_video_tokens():
    config = resolve_config("svg2")
    assert config.cluster_counts(21 * 45 * 80) == (295, 1008)  # Wan 2.1 720p: the anchor's 300 and 1000
    assert config.cluster_counts(16 * 16 * 16) == (16, 55)  # the demo grid
    assert config.cluster_counts(10) == (1, 1)
    assert resolve_config("svg2", num_q_centroids=50, num_k_centroids=80).cluster_counts(30) == (30, 30)
    assert (config.top_p, config.min_kc_ratio, config.estimate) == (0.9, 0.1, "queries")
    assert (config.kmeans_iter_init, config.kmeans_iter_step, config.replan_every) == (10, 1, 2)


@pytest.mark.parametrize("options, field", [
    ({"num_q_centroids": 0}, "num_q_centroids"),
    ({"num_k_centroids": 2.5}, "num_k_centroids"),
    ({"q_cluster_tokens": 0}, "q_cluster_tokens"),
    ({"k_cluster_tokens": True}, "k_cluster_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"density": 0.0}, "density"),
    ({"density": "0.2"}, "density"),
    ({"min_kc_ratio": -0.1}, "min_kc_ratio"),
    ({"kmeans_iter_init": 0}, "kmeans_iter_init"),
    ({"kmeans_iter_step": 0}, "kmeans_iter_step"),
    ({"scale": 0}, "scale"),
    ({"estimate": "keys"}, "estimate"),
    ({"seed": 1.5}, "seed"),
    ({"num_centroids": 3}, "unknown option"),
])
def test_invalid_configs_raise(options, field):
    with pytest.raises(ConfigError, match=field):
        resolve_config("svg2", **options)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])  # CFG as two calls, as one batch; a text mask
def test_runs_in_a_tiny_pipeline_with_cfg(family):
    pipe, kwargs = make_pipeline(family)
    pipe.enable_sparse_attention("svg2", num_q_centroids=4, num_k_centroids=8, top_p=0.6, min_seq_len=0, dense_steps=1)
    out = pipe(**kwargs).frames
    assert torch.isfinite(torch.as_tensor(out)).all()
    stats = pipe.sparse_attention_stats()
    assert 0.0 < stats.density(sparse_only=True) < 1.0
    pipe.disable_sparse_attention()
