"""`oracle` and the exact block mass it ranks by, against brute force."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dit import ConfigError, PatternFile, kernels
from sparse_dit.patterns import PlanContext, build_planner, resolve_config
from sparse_dit.patterns.block_mass import block_mass, top_share
from sparse_dit.patterns.oracle import select_by_mass, select_top_blocks
from sparse_dit.state import SiteState

from conftest import TOL


def brute_block_mass(q, k, block_size):
    """Row-by-row softmax in float64, summed over each key block and averaged over each query block's rows."""
    b, s, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    probs = torch.einsum("bshd,bthd->bhst", q.double(), k.double()).mul(d**-0.5).softmax(-1)
    n = -(-s // block_size)
    out = torch.zeros(b, h, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            rows, cols = slice(i * block_size, (i + 1) * block_size), slice(j * block_size, (j + 1) * block_size)
            out[:, :, i, j] = probs[:, :, rows, cols].sum(-1).mean(-1)
    return out


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), s=st.integers(1, 200), h=st.sampled_from([1, 2, 4]), kv_share=st.sampled_from([1, 2]),
       block=st.sampled_from([1, 7, 16, 64]), seed=st.integers(0, 2**16))
def test_block_mass_matches_brute_force(b, s, h, kv_share, block, seed):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = max(1, h // kv_share)
    q = torch.randn(b, s, h, 8, generator=gen) * 2
    k = torch.randn(b, s, kv_heads, 8, generator=gen) * 2
    mass = block_mass(q, k, block)
    torch.testing.assert_close(mass.double(), brute_block_mass(q, k, block), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.ones(mass.shape[:-1]), atol=1e-5, rtol=0)


def test_block_mass_chunks_agree_across_query_chunks(monkeypatch):
    import sparse_dit.ops as module

    q, k = torch.randn(1, 333, 2, 8), torch.randn(1, 333, 2, 8)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1 << 30)
    whole = block_mass(q, k, 16)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 2 * 333 * 48)  # several chunks of 48 rows, a short last one
    torch.testing.assert_close(block_mass(q, k, 16), whole)


def test_top_share():
    mass = torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0]])
    assert top_share(mass, 0.2).item() == pytest.approx(0.5)  # 1 of 5 blocks
    assert top_share(mass, 0.4).item() == pytest.approx(0.8)
    assert top_share(mass, 1e-9).item() == pytest.approx(0.5)  # at least one block


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), h=st.integers(1, 3), seed=st.integers(0, 2**16), count=st.integers(1, 12))
def test_top_count_selection_keeps_the_heaviest_blocks(n, h, seed, count):
    gen = torch.Generator().manual_seed(seed)
    mass = torch.rand(2, h, n, n, generator=gen).softmax(-1)
    counts = torch.full((h,), min(count, n))
    layout = select_top_blocks(mass, counts)
    assert (layout.sum(-1) == counts.view(1, -1, 1)).all()
    assert layout.diagonal(dim1=-2, dim2=-1).all()
    # Apart from the forced diagonal, no dropped block outweighs a kept one.
    free = ~torch.eye(n, dtype=torch.bool)
    kept_min = torch.where(layout & free, mass, torch.inf).amin(-1)
    dropped_max = torch.where(~layout & free, mass, -torch.inf).amax(-1)
    assert (dropped_max <= kept_min).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**16), threshold=st.floats(0.05, 1.0))
def test_mass_selection_is_the_minimal_prefix(n, seed, threshold):
    gen = torch.Generator().manual_seed(seed)
    mass = (torch.randn(1, 2, n, n, generator=gen) * 2).softmax(-1)
    layout = select_by_mass(mass, threshold)
    for b, h, i in torch.cartesian_prod(torch.arange(1), torch.arange(2), torch.arange(n)).tolist():
        row = mass[b, h, i].tolist()
        order = sorted(range(n), key=lambda j: -row[j])
        count = next((c for c in range(1, n + 1) if sum(row[j] for j in order[:c]) >= threshold - 1e-6), n)
        expected = set(order[:count]) | {i}
        assert set(layout[b, h, i].nonzero().flatten().tolist()) == expected
        assert sum(row[j] for j in expected) >= threshold - 1e-5


def _ctx(grid, text_len=0, position="none", batch=2, heads=2):
    return PlanContext(grid=grid, text_len=text_len, text_position=position, batch=batch, heads=heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{"density": 1.0}, {"mass": 1.0}])
def test_full_oracle_is_dense_attention(dtype, options):
    ctx = _ctx((3, 5, 7), text_len=5, position="prefix")  # 110 tokens: not a multiple of the block
    q, k, v = (torch.randn(2, ctx.seq_len, 2, 16).to(dtype) for _ in range(3))
    plan = build_planner(resolve_config("oracle", block_size=16, **options)).plan(q, k, ctx, SiteState())
    assert plan.density == pytest.approx(1.0)
    out = kernels.run(q, k, v, plan, backend="reference")
    expected = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_rows_and_columns_are_kept(position):
    ctx = _ctx((2, 8, 8), text_len=20, position=position)
    q, k = torch.randn(2, ctx.seq_len, 2, 16), torch.randn(2, ctx.seq_len, 2, 16)
    plan = build_planner(resolve_config("oracle", block_size=16, density=0.1)).plan(q, k, ctx, SiteState())
    text = ctx.text_token_mask()
    text_blocks = torch.nn.functional.pad(text, (0, (-text.numel()) % 16)).view(-1, 16).any(-1)
    assert plan.layout[:, :, text_blocks].all() and plan.layout[:, :, :, text_blocks].all()
    assert plan.layout.diagonal(dim1=-2, dim2=-1).all()


def test_a_density_pattern_sets_the_count_per_head():
    ctx = PlanContext(grid=(1, 16, 16), batch=1, heads=2, step=3, layer=1, site="t.l1")
    q, k = torch.randn(1, 256, 2, 8), torch.randn(1, 256, 2, 8)
    config = resolve_config("oracle", block_size=16)
    pattern = PatternFile("oracle", tensors={"t.l1/density": torch.tensor([[float("nan")] * 2, [0.25, 0.5]])},
                          step_buckets=(0, 3))
    planner = build_planner(config, pattern)
    layout = planner.plan(q, k, ctx, SiteState()).layout
    assert layout.sum(-1)[0, 0].eq(4).all() and layout.sum(-1)[0, 1].eq(8).all()
    # Steps 0-2 have no entry (NaN) and another site none at all: there `density` holds.
    for other in (dataclasses.replace(ctx, step=1), dataclasses.replace(ctx, site="t.l2")):
        assert planner.plan(q, k, other, SiteState()).layout.sum(-1).eq(round(0.2 * 16)).all()
    with pytest.raises(ConfigError, match="not both"):
        build_planner(resolve_config("oracle", mass=0.9), pattern)
    with pytest.raises(ConfigError, match="outside"):
        build_planner(config, PatternFile("oracle", tensors={"s/density": torch.tensor([[1.5, 0.5]])}))


def test_oracle_loses_less_than_random_on_concentrated_attention():
    """Where a few key blocks hold the mass, the heaviest blocks reproduce attention far better than random ones."""
    ctx = PlanContext(grid=(1, 16, 16), batch=1, heads=2)
    centres = torch.randn(16, 1, 2, 16).repeat_interleave(16, dim=0).view(1, 256, 2, 16)  # one direction per block
    q, k = (centres * 2 + 0.3 * torch.randn(1, 256, 2, 16) for _ in range(2))
    v = torch.randn(1, 256, 2, 16)
    dense = kernels.run(q, k, v, build_planner(resolve_config("dense", block_size=16)).plan(q, k, ctx, SiteState()), backend="reference")
    errors = {}
    for method in ("oracle", "random"):
        plan = build_planner(resolve_config(method, block_size=16, density=0.25)).plan(q, k, ctx, SiteState())
        errors[method] = float((kernels.run(q, k, v, plan, backend="reference") - dense).norm() / dense.norm())
    assert errors["oracle"] < 0.5 * errors["random"]


@pytest.mark.parametrize("options", [{"density": 0.0}, {"density": True}, {"mass": 1.5}, {"mass": "x"}, {"scale": -1.0},
                                     {"density_table": ((0, 0, (0.5,)),)}])
def test_bad_options_raise(options):
    with pytest.raises(ConfigError):
        resolve_config("oracle", **options)
