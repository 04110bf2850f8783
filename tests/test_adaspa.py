"""`adaspa`: exact block mass from a cached LSE against brute force, head-adaptive selection, reuse between searches."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_dit.patterns.adaspa as adaspa
from sparse_dit import ConfigError, SparseAttention, kernels
from sparse_dit.patterns import PlanContext, build_planner, resolve_config
from sparse_dit.patterns.adaspa import (dense_lse, head_budgets, head_recall, search_log, select_by_count,
                                        select_by_threshold, selection_overlap)
from sparse_dit.plugin.api import runtime_of
from sparse_dit.state import SiteState

from conftest import TOL
from tiny_models import make_pipeline


def brute_probs(q, k, scale=None):
    """softmax(q k^T * scale) in float64, (B, H, S, S), k repeated for grouped-query attention."""
    h, d = q.shape[2], q.shape[3]
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    scale = d**-0.5 if scale is None else scale
    return (torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * scale).softmax(-1)


def brute_block_sums(probs, block):
    """Probabilities summed over every (query block, key block) with explicit loops: (B, H, n, n)."""
    s = probs.shape[-1]
    n = -(-s // block)
    out = torch.zeros(*probs.shape[:2], n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[:, :, i, j] = probs[:, :, i * block:(i + 1) * block, j * block:(j + 1) * block].sum((-1, -2))
    return out


def minimal_prefix(row, threshold):
    """Indices of the fewest entries, highest first, whose share of the row's total reaches threshold."""
    order = sorted(range(len(row)), key=lambda j: -row[j])
    total = sum(row)
    if threshold >= 1.0:
        return set(order)
    count = next((c for c in range(1, len(row) + 1) if sum(row[j] for j in order[:c]) >= (threshold - 1e-6) * total), len(row))
    return set(order[:count])


def _ctx(grid, text_len=0, position="none", batch=2, heads=2, **where):
    return PlanContext(grid=grid, text_len=text_len, text_position=position, batch=batch, heads=heads, **where)


def _sharp_and_flat(batch, block, n, d=16):
    """q = k of two heads: one whose tokens point one way per block (attention stays near its own block), one of
    near-zero vectors (attention spread evenly). (batch, block * n, 2, d)."""
    centres = torch.randn(batch, n, 1, d).repeat_interleave(block, dim=1)
    sharp = centres * 3 + 0.1 * torch.randn(batch, block * n, 1, d)
    flat = 0.01 * torch.randn(batch, block * n, 1, d)
    return torch.cat([sharp, flat], dim=2)


def _qk(ctx, kv_heads=None, d=8, seed=0, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(ctx.batch, ctx.seq_len, ctx.heads, d, generator=gen) * spread
    k = torch.randn(ctx.batch, ctx.seq_len, kv_heads or ctx.heads, d, generator=gen) * spread
    return q, k


# -- the search: LSE and block mass ---------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), s=st.integers(1, 150), h=st.sampled_from([1, 2, 4]), kv_share=st.sampled_from([1, 2]),
       block=st.sampled_from([1, 7, 16, 32]), seed=st.integers(0, 2**16))
def test_search_mass_is_the_exact_block_mass_of_full_attention(b, s, h, kv_share, block, seed):
    ctx = _ctx((1, 1, s), batch=b, heads=h)
    q, k = _qk(ctx, kv_heads=max(1, h // kv_share), seed=seed)
    probs = brute_probs(q, k)
    planner = build_planner(resolve_config("adaspa", block_size=block))
    state = SiteState()
    mass, fresh = planner.search_mass(q, k, ctx, state)
    assert fresh
    kk = k.repeat_interleave(h // k.shape[2], 2).double()
    lse = (torch.einsum("bshd,bthd->bhst", q.double(), kk) * 8**-0.5).logsumexp(-1)
    torch.testing.assert_close(state.lse.double(), lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.double(), brute_block_sums(probs, block), atol=1e-5, rtol=1e-5)


def test_dense_lse_chunks_agree():
    q, k = _qk(_ctx((1, 1, 333)))
    torch.testing.assert_close(dense_lse(q, k, 0.3, chunk_rows=40), dense_lse(q, k, 0.3), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(dense_lse(q, k, 0.3, chunk_rows=40), dense_lse(q, k, 0.3, chunk_rows=1000))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 10), h=st.integers(1, 4), seed=st.integers(0, 2**16), threshold=st.floats(0.05, 1.0),
       adaptive=st.booleans())
def test_threshold_keeps_the_minimal_prefix_at_each_heads_threshold(n, h, seed, threshold, adaptive):
    block = 8
    ctx = _ctx((1, 1, n * block - 3), heads=h)  # a short last block
    q, k = _qk(ctx, seed=seed)
    planner = build_planner(resolve_config("adaspa", block_size=block, threshold=threshold, head_adaptive=adaptive))
    state = SiteState()
    mass, _ = planner.search_mass(q, k, ctx, state)
    selected, budgets = planner.select(mass)
    brute = brute_block_sums(brute_probs(q, k), block)
    if not adaptive or h == 1:
        assert (budgets == threshold).all()
    for b in range(ctx.batch):
        for hh in range(h):
            for i in range(brute.shape[-2]):
                expected = minimal_prefix(brute[b, hh, i].tolist(), float(budgets[b, hh]))
                assert set(selected[b, hh, i].nonzero().flatten().tolist()) == expected


def test_head_budgets_follow_the_paper():
    # Paper, s = 0.8 (density 0.2): heads of recall > 0.8 are n; the n best get s' = 0.9, the n worst s' = 0.7.
    recall = torch.tensor([[0.95, 0.5, 0.85, 0.6], [0.9, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    budgets = head_budgets(recall, 0.2, 0.8)
    expected = torch.tensor([[0.1, 0.3, 0.1, 0.3], [0.1, 0.3, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(budgets, expected)
    # n is capped at H / 2, so the mean budget is the base one; flat heads never get less than concentrated ones.
    many = head_budgets(torch.tensor([[0.99, 0.98, 0.97, 0.96, 0.95]]), 0.2, 0.8)
    torch.testing.assert_close(many, torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]], dtype=torch.float64))
    # Thresholds move the same way, kept in [0, 1]: 0.9 -> 0.85 / 0.95; 1.0 (dense) does not move.
    torch.testing.assert_close(head_budgets(recall[:1], 0.9, 0.8), torch.tensor([[0.85, 0.95, 0.85, 0.95]], dtype=torch.float64))
    assert (head_budgets(recall, 1.0, 0.8) == 1.0).all()


def test_flat_heads_get_more_blocks():
    """A head whose attention concentrates on its diagonal block and one spread evenly: the flat head keeps more."""
    block, n = 8, 8
    ctx = _ctx((1, 1, block * n), batch=1, heads=2)
    q = k = _sharp_and_flat(1, block, n)
    mass, _ = build_planner(resolve_config("adaspa", block_size=block)).search_mass(q, k, ctx, SiteState())
    recall = head_recall(mass, 0.2)
    assert recall[0, 0] > 0.8 > recall[0, 1]
    for options in ({"density": 0.25}, {"threshold": 0.6}):
        planner = build_planner(resolve_config("adaspa", block_size=block, **options))
        selected, budgets = planner.select(mass)
        assert budgets[0, 1] > budgets[0, 0]
        assert selected[0, 1].sum() > selected[0, 0].sum()


# -- dense at 1.0, density mode, awkward shapes ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_threshold_one_is_dense_attention(dtype, position):
    ctx = _ctx((3, 5, 7), text_len=5, position=position)  # 110 tokens: not a multiple of the block
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, ctx.seq_len, h, 16, generator=gen).to(dtype) for h in (4, 2, 2))  # GQA
    ctx = _ctx((3, 5, 7), text_len=5, position=position, heads=4)
    plan = build_planner(resolve_config("adaspa", block_size=16, threshold=1.0)).plan(q, k, ctx, SiteState())
    assert plan.density == pytest.approx(1.0)
    out = kernels.run(q, k, v, plan, backend="reference")
    expected = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v)), enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_density_mode_hits_the_target(density):
    block, n = 8, 16
    ctx = _ctx((1, n, block), heads=4)
    q, k = _qk(ctx)
    exact = build_planner(resolve_config("adaspa", block_size=block, density=density, head_adaptive=False))
    plan = exact.plan(q, k, ctx, SiteState())
    count = round(density * n)
    assert (plan.layout.sum(-1) == count).all()
    assert plan.density == pytest.approx(count / n)
    assert plan.layout.diagonal(dim1=-2, dim2=-1).all()
    # Head-adaptive: heads move by density / 2 either way in pairs, so the mean stays the target (to rounding).
    q = k = _sharp_and_flat(2, block, n).repeat(1, 1, 2, 1)  # heads: sharp, flat, sharp, flat
    adaptive = build_planner(resolve_config("adaspa", block_size=block, density=density)).plan(q, k, ctx, SiteState())
    assert abs(adaptive.density - density) <= 1 / n
    counts = adaptive.layout.sum(-1)
    assert (counts[:, 0::2] < counts[:, 1::2]).all()


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_rows_and_columns_and_the_diagonal_are_kept(position):
    ctx = _ctx((2, 8, 8), text_len=20, position=position)
    q, k = _qk(ctx, d=16)
    plan = build_planner(resolve_config("adaspa", block_size=16, density=0.1)).plan(q, k, ctx, SiteState())
    text = ctx.text_token_mask()
    text_blocks = F.pad(text, (0, (-text.numel()) % 16)).view(-1, 16).any(-1)
    assert plan.layout[:, :, text_blocks].all() and plan.layout[:, :, :, text_blocks].all()
    assert plan.layout.diagonal(dim1=-2, dim2=-1).all()
    assert plan.layout.shape == (2, 2, 10, 10)  # 148 tokens: a short last block


def test_selection_helpers():
    mass = torch.tensor([[[[0.1, 0.6, 0.3], [0.0, 0.0, 1.0], [0.3, 0.1, 0.6]]]])
    assert select_by_threshold(mass, 0.65)[0, 0].tolist() == [[False, True, True], [False, False, True], [True, False, True]]
    assert select_by_threshold(mass, 1.0).all()  # even blocks of zero mass
    per_head = select_by_threshold(mass.expand(1, 2, 3, 3), torch.tensor([[0.5, 0.95]]))
    assert per_head.sum(-1).tolist() == [[[1, 1, 1], [3, 1, 3]]]
    # Counts rank the diagonal first, then by mass.
    assert select_by_count(mass, torch.tensor([[2]]))[0, 0].tolist() == [[True, True, False], [False, True, True], [True, False, True]]


def test_selection_overlap():
    before = torch.tensor([[[[True, True], [False, True]]]])
    after = torch.tensor([[[[True, False], [True, True]]]])
    mass = torch.tensor([[[[0.5, 0.5], [0.25, 0.75]]]])
    overlap = selection_overlap(before, after, mass)
    assert overlap["jaccard"] == [pytest.approx(2 / 4)]
    assert overlap["mass_recall"] == [pytest.approx((0.5 + 0.5 + 0.75) / 2)]


# -- the schedule: search, reuse, cached LSE ---------------------------------------------------------------------------

class Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.lse_given = fn, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if len(args) > 2:  # block_attention_mass(q, k, lse, ...): was the LSE given or found on the way
            self.lse_given.append(args[2] is not None)
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("options, searches", [
    ({}, [2]),  # the default: once, at the first sparse step (20% dense)
    ({"search_steps": (0.6,)}, [2, 6]),  # the paper's schedule: the first sparse step and 60% of the run
    ({"search_steps": (3, 0.8)}, [2, 3, 8]),
    ({"search_steps": None, "replan_every": 3}, [2, 5, 8]),
    ({"search_steps": None, "replan_steps": (4, 7)}, [2, 4, 7]),  # the first sparse step plans: there is no plan yet
])
def test_indices_are_reused_between_searches(monkeypatch, options, searches):
    mass_fn, lse_fn = Counter(adaspa.block_attention_mass), Counter(adaspa.dense_lse)
    monkeypatch.setattr(adaspa, "block_attention_mass", mass_fn)
    monkeypatch.setattr(adaspa, "dense_lse", lse_fn)
    q, k, v = (torch.randn(1, 128, 2, 8) for _ in range(3))
    attn = SparseAttention("adaspa", block_size=16, min_seq_len=0, density=0.25, compare_first=True, **options)
    plans = []
    for step in range(10):
        attn(q, k, v, grid=(1, 8, 16), layer=0, step=step, num_steps=10)
        plans.append(attn.state(_ctx((1, 8, 16), batch=1, heads=2, layer=0, site="layer0")).plan)
    state = attn.state(_ctx((1, 8, 16), batch=1, heads=2, layer=0, site="layer0"))
    assert [r["step"] for r in state.extra["searches"]] == searches
    assert mass_fn.calls == len(searches)
    # The LSE is found once, on the way of the first search's mass pass (on CPU no separate LSE pass runs);
    # later searches read it from the cache.
    assert lse_fn.calls == 0 and mass_fn.lse_given == [False] + [True] * (len(searches) - 1)
    assert [r["lse"] for r in state.extra["searches"]] == ["fresh"] + ["cached"] * (len(searches) - 1)
    # Between searches the very same plan object runs (its kernel indices cached on it).
    for step in range(searches[0] + 1, 10):
        assert (plans[step] is plans[step - 1]) == (step not in searches)
    assert state.extra["selections"] == len(searches) and attn.stats.plan_share > 0
    # The same inputs at every step: each later search chooses what the first did.
    for record in state.extra["searches"][1:]:
        assert record["vs_previous"]["jaccard"] == [1.0, 1.0] and record["vs_first"]["jaccard"] == [1.0, 1.0]
    attn.reset()
    assert len(attn.states) == 0


def test_a_stale_lse_is_recomputed():
    ctx = _ctx((1, 1, 64), batch=1, heads=2)
    q, k = _qk(ctx)
    planner = build_planner(resolve_config("adaspa", block_size=16))
    state = SiteState(lse=torch.full((1, 2, 64), float("-inf")))  # bounds no row: every row's mass is 0
    mass, fresh = planner.search_mass(q, k, ctx, state)
    assert fresh
    torch.testing.assert_close(mass.sum(-1), torch.full((1, 2, 4), 16.0))


def test_fractional_search_steps_need_the_step_count():
    planner = build_planner(resolve_config("adaspa", block_size=16, min_seq_len=0, search_steps=(0.6,)))
    state = SiteState()
    q, k = _qk(_ctx((1, 1, 64), batch=1))
    planner.plan(q, k, _ctx((1, 1, 64), batch=1, step=0), state)
    with pytest.raises(ConfigError, match="number of denoising steps is unknown"):
        planner.plan(q, k, _ctx((1, 1, 64), batch=1, step=1), state)


def test_pipeline_run_records_searches_per_site_and_branch():
    pipe, kwargs = make_pipeline("wan")
    pipe.enable_sparse_attention("adaspa", block_size=8, min_seq_len=0, dense_steps=0, search_steps=(1,), threshold=0.9)
    log = {}
    kwargs["callback_on_step_end"] = lambda p, i, t, tensors: (log.update(search_log(runtime_of(p).engine.states)), tensors)[1]
    pipe(**kwargs)
    assert log and {branch for _, branch in log} == {"cond", "uncond"}
    for records in log.values():
        assert [r["step"] for r in records] == [0, 1]
        assert "vs_first" not in records[1]  # compare_first is off: no first layout kept
        assert [r["lse"] for r in records] == ["fresh", "cached"]
        overlap = records[1]["vs_previous"]
        assert all(0.0 <= x <= 1.0 + 1e-9 for x in overlap["jaccard"] + overlap["mass_recall"])
        # Old blocks hold at least the share of the new mass that the new (threshold 0.9, moved by at most 0.05) do
        # when they are the same blocks.
        for jaccard, held in zip(overlap["jaccard"], overlap["mass_recall"]):
            assert jaccard < 1.0 or held >= 0.85 - 1e-6


@pytest.mark.parametrize("options, match", [
    ({"threshold": 1.5}, "threshold"), ({"threshold": 0.0}, "threshold"), ({"density": 0}, "density"),
    ({"density": True}, "density"), ({"threshold": 0.9, "density": 0.2}, "not both"), ({"scale": -1.0}, "scale"),
    ({"head_adaptive": 1}, "head_adaptive"), ({"compare_first": "yes"}, "compare_first"), ({"recall_split": 1.0}, "recall_split"), ({"recall_density": 0}, "recall_density"),
    ({"search_steps": (1.5,)}, "search_steps"), ({"search_steps": (-1,)}, "search_steps"), ({"search_steps": "0.6"}, "search_steps"),
    ({"replan_every": 2}, "search_steps=None"), ({"replan_steps": (3,)}, "search_steps=None"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("adaspa", **options)


def test_defaults():
    config = resolve_config("adaspa")
    assert config.effective_threshold == 0.7 and config.search_steps == () and config.dense_steps == 0.2
    assert resolve_config("adaspa", density=0.2).effective_threshold is None
    assert resolve_config("adaspa", search_steps=0.5).search_steps == (0.5,)
