"""`xattention`: strided antidiagonal scores against explicit loops, threshold and density selection, awkward shapes."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_dit.patterns.xattention as xattention
from sparse_dit import ConfigError, SparseAttention, kernels
from sparse_dit.patterns import PlanContext, build_planner, resolve_config
from sparse_dit.patterns.block_mass import block_mass
from sparse_dit.patterns.xattention import antidiagonal_block_scores, antidiagonal_sums
from sparse_dit.state import SiteState

from conftest import TOL


def brute_antidiagonal_sums(q, k, stride):
    """For every stride x stride tile of Q·K, the sum of its antidiagonal (row offset r, column offset stride-1-r),
    entry by entry with explicit loops, in float64; tokens past S are absent. (B, H, G, G)."""
    b, s, h, _ = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    g = -(-s // stride)
    out = torch.zeros(b, h, g, g, dtype=torch.float64)
    for a in range(g):
        for c in range(g):
            for r in range(stride):
                row, col = a * stride + r, c * stride + stride - 1 - r
                if row < s and col < s:
                    out[:, :, a, c] += (q[:, row].double() * k[:, col].double()).sum(-1)
    return out


def brute_block_scores(q, k, block, stride, scale=None):
    """Softmax of the scaled antidiagonal sums along each row of groups, summed per block pair with loops."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    probs = (brute_antidiagonal_sums(q, k, stride) * scale / stride).softmax(-1)
    g, per = probs.shape[-1], block // stride
    n = -(-g // per)
    out = torch.zeros(*probs.shape[:2], n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[:, :, i, j] = probs[:, :, i * per:(i + 1) * per, j * per:(j + 1) * per].sum((-1, -2))
    return out


def _ctx(grid, text_len=0, position="none", batch=2, heads=2, **where):
    return PlanContext(grid=grid, text_len=text_len, text_position=position, batch=batch, heads=heads, **where)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), s=st.integers(1, 70), h=st.sampled_from([1, 2, 4]), kv_share=st.sampled_from([1, 2]),
       stride=st.sampled_from([1, 2, 3, 8]), seed=st.integers(0, 2**16))
def test_antidiagonal_sums_match_explicit_loops(b, s, h, kv_share, stride, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, 4, generator=gen)
    k = torch.randn(b, s, max(1, h // kv_share), 4, generator=gen)
    torch.testing.assert_close(antidiagonal_sums(q, k, stride).double(), brute_antidiagonal_sums(q, k, stride), atol=1e-4, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(s=st.integers(1, 90), stride=st.sampled_from([1, 2, 4]), per=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_block_scores_match_explicit_loops(s, stride, per, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, s, 2, 4, generator=gen) * 2 for _ in range(2))
    block = stride * per
    scores = antidiagonal_block_scores(q, k, block, stride, scale=0.7)
    torch.testing.assert_close(scores.double(), brute_block_scores(q, k, block, stride, scale=0.7), atol=1e-5, rtol=1e-5)


def test_bfloat16_product_moves_scores_by_under_a_hundredth_of_a_block():
    """The planner multiplies in bfloat16 where the CPU has it (`product_dtype`); every block's score (a sum of
    `block / stride` probabilities, its row summing to that many) moves by less than 0.01 with it."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 500, 2, 64, generator=gen) for _ in range(2))
    exact = antidiagonal_block_scores(q, k, 64, 8)
    torch.testing.assert_close(antidiagonal_block_scores(q, k, 64, 8, dtype=torch.bfloat16), exact, atol=1e-2, rtol=0)
    assert xattention.product_dtype(torch.device("meta")) == torch.float32


def test_block_scores_chunks_agree(monkeypatch):
    q, k = torch.randn(1, 321, 2, 8), torch.randn(1, 321, 2, 8)  # 41 groups of 8 in 21 blocks of 16: the last is short
    whole = antidiagonal_block_scores(q, k, 16, 8)
    monkeypatch.setattr(xattention, "SCORE_CHUNK_ELEMENTS", 2 * 41 * 2 * 4)  # 4 query blocks per chunk, 1 in the last
    torch.testing.assert_close(antidiagonal_block_scores(q, k, 16, 8), whole)


def test_stride_one_scores_are_the_exact_block_mass():
    """At stride 1 every tile is one entry: the scores are full attention's probabilities summed per block pair."""
    q, k = torch.randn(2, 75, 4, 8), torch.randn(2, 75, 2, 8)  # GQA, a short last block
    counts = torch.tensor([16, 16, 16, 16, 11.0])
    torch.testing.assert_close(antidiagonal_block_scores(q, k, 16, 1), block_mass(q, k, 16) * counts.view(1, 1, -1, 1),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 8), seed=st.integers(0, 2**16), threshold=st.floats(0.05, 1.0))
def test_threshold_keeps_the_minimal_prefix_of_scores(n, seed, threshold):
    block = 16
    ctx = _ctx((1, 1, n * block - 5))
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, ctx.seq_len, 2, 8, generator=gen) * 2 for _ in range(2))
    planner = build_planner(resolve_config("xattention", block_size=block, threshold=threshold))
    with mock.patch.object(xattention, "product_dtype", lambda device: torch.float32):  # exact ties, as the loops see them
        plan = planner.plan(q, k, ctx, SiteState())
    scores = brute_block_scores(q, k, block, planner.config.stride)
    for b in range(2):
        for h in range(2):
            for i in range(n):
                row = scores[b, h, i].tolist()
                order = sorted(range(n), key=lambda j: -row[j])
                count = n if threshold >= 1.0 else next(
                    c for c in range(1, n + 1) if sum(row[j] for j in order[:c]) >= (threshold - 1e-6) * sum(row))
                assert set(plan.layout[b, h, i].nonzero().flatten().tolist()) == set(order[:count]) | {i}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_threshold_one_is_dense_attention(dtype, position):
    ctx = _ctx((3, 5, 7), text_len=5, position=position, heads=4)  # 110 tokens: not a multiple of the block
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, ctx.seq_len, h, 16, generator=gen).to(dtype) * 3 for h in (4, 2, 2))  # GQA
    plan = build_planner(resolve_config("xattention", block_size=16, threshold=1.0)).plan(q, k, ctx, SiteState())
    assert plan.density == pytest.approx(1.0)
    out = kernels.run(q, k, v, plan, backend="reference")
    expected = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v)), enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype] * 3, rtol=TOL[dtype])


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_density_mode_hits_the_target(density):
    n = 16
    ctx = _ctx((1, 16, n * 8), heads=2)
    q, k = torch.randn(2, ctx.seq_len, 2, 8), torch.randn(2, ctx.seq_len, 2, 8)
    plan = build_planner(resolve_config("xattention", block_size=8 * 16, density=density)).plan(q, k, ctx, SiteState())
    count = round(density * n)
    assert (plan.layout.sum(-1) == count).all()
    assert plan.density == pytest.approx(count / n)
    assert plan.layout.diagonal(dim1=-2, dim2=-1).all()


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_rows_and_columns_and_the_diagonal_are_kept(position):
    ctx = _ctx((2, 8, 8), text_len=20, position=position)
    q, k = torch.randn(2, ctx.seq_len, 2, 16), torch.randn(2, ctx.seq_len, 2, 16)
    plan = build_planner(resolve_config("xattention", block_size=16, density=0.1)).plan(q, k, ctx, SiteState())
    text = ctx.text_token_mask()
    text_blocks = F.pad(text, (0, (-text.numel()) % 16)).view(-1, 16).any(-1)
    assert plan.layout[:, :, text_blocks].all() and plan.layout[:, :, :, text_blocks].all()
    assert plan.layout.diagonal(dim1=-2, dim2=-1).all()


def test_beats_random_on_concentrated_attention():
    """Where a few key blocks hold the mass, antidiagonal scores find them: far closer to dense than random blocks."""
    ctx = PlanContext(grid=(1, 16, 16), batch=1, heads=2)
    centres = torch.randn(16, 1, 2, 16).repeat_interleave(16, dim=0).view(1, 256, 2, 16)
    q, k = (centres * 2 + 0.3 * torch.randn(1, 256, 2, 16) for _ in range(2))
    v = torch.randn(1, 256, 2, 16)
    dense = kernels.run(q, k, v, build_planner(resolve_config("dense", block_size=16)).plan(q, k, ctx, SiteState()), backend="reference")
    errors = {}
    for method in ("xattention", "random"):
        plan = build_planner(resolve_config(method, block_size=16, density=0.25)).plan(q, k, ctx, SiteState())
        errors[method] = float((kernels.run(q, k, v, plan, backend="reference") - dense).norm() / dense.norm())
    assert errors["xattention"] < 0.5 * errors["random"]


@pytest.mark.parametrize("options, selections", [({}, 2), ({"replan_every": 1}, 3)])  # default: every other step
def test_plans_on_its_schedule_and_records_its_cost(options, selections):
    attn = SparseAttention("xattention", block_size=16, min_seq_len=0, dense_steps=1, **options)
    q, k, v = (torch.randn(1, 256, 2, 8) for _ in range(3))
    for step in range(4):
        attn(q, k, v, grid=(1, 16, 16), layer=0, step=step, num_steps=4)
    extra = attn.state(_ctx((1, 16, 16), batch=1, layer=0, site="layer0")).extra
    assert extra["selections"] == selections
    assert 0 < attn.stats.plan_share < 1
    # Scoring is S^2 D / stride multiply-adds against dense attention's 2 S^2 D: 1/8 at the default stride 4.
    assert extra["selection_flops"] / extra["dense_flops"] == pytest.approx(1 / 8)


@pytest.mark.parametrize("options, match", [
    ({"threshold": 1.5}, "threshold"), ({"threshold": 0}, "threshold"), ({"density": 2.0}, "density"),
    ({"threshold": 0.9, "density": 0.2}, "not both"), ({"stride": 0}, "stride"), ({"stride": True}, "stride"),
    ({"stride": 8, "block_size": 36}, "multiple of stride"), ({"scale": 0}, "scale"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("xattention", **options)


def test_defaults():
    config = resolve_config("xattention")
    assert config.effective_threshold == 0.9 and config.stride == 4 and config.replan_every == 2
    assert resolve_config("xattention", density=0.3).effective_threshold is None
