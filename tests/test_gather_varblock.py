"""The CPU fast path for variable-block plans (`kernels.varblock`, run by the "gather" backend) against the reference.

Plans are drawn as SVG2 makes them and worse: per (batch row, head) or shared query and key clusters of awkward
sizes (empty and single-token clusters in every draw that has three or more, S not a multiple of anything),
video tokens in a random order per head with text kept in place as one block of its own (prefix or suffix,
its row and column always computed), keys in an order of their own or the queries', dense, sparse and skipped
heads, one axis variable and the other fixed, query clusters that keep only empty key clusters (zero rows, as
the reference gives them). Tolerances against the reference on the inputs upcast to float64: float32 2e-5
(accumulation order only), float16 3e-3 and bfloat16 2e-2 (`conftest.TOL`: softmax and P·V rounded in the input
dtype).

The same path's LSE (`return_lse=True`, ring attention's shards), and the fixed-block path's, against the
reference's: float32 LSE within the tolerance above and at least 1e-4, -inf with output 0 where a query attends
nothing, with and without key splits.
"""

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dit import ConfigError, kernels
from sparse_dit.cli import main
from sparse_dit.evals.bench_kernels import clustered_plan, uneven_sizes
from sparse_dit.kernels import AUTO_MIN_SEQ, backend_capabilities, gather, select_backend, varblock
from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan

from conftest import TOL

SETTINGS = dict(deadline=None, derandomize=True, max_examples=60)


def awkward_sizes(gen: torch.Generator, n: int, total: int) -> torch.Tensor:
    """n cluster sizes summing to `total`: one empty and one single-token cluster where n >= 3, the rest cut at random."""
    sizes = torch.zeros(n, dtype=torch.long)
    slots = torch.randperm(n, generator=gen)
    if n >= 3 and total >= 1:
        sizes[slots[1]] = 1  # slots[0] stays empty
        slots, total = slots[2:], total - 1
    cuts = torch.randint(0, total + 1, (len(slots) - 1,), generator=gen).sort().values
    sizes[slots] = torch.cat([cuts, torch.tensor([total])]) - torch.cat([torch.tensor([0]), cuts])
    return sizes


def video_order(gen: torch.Generator, lead: tuple[int, int], s: int, text: int, prefix: bool) -> torch.Tensor:
    """long (B', H', S): video tokens in a random order per row and head, text in place (as svg2 orders them)."""
    video = torch.arange(text, s) if prefix else torch.arange(s - text)
    rows = [video[torch.randperm(len(video), generator=gen)] for _ in range(lead[0] * lead[1])]
    text_tokens = torch.arange(text) if prefix else torch.arange(s - text, s)
    rows = [torch.cat([text_tokens, r] if prefix else [r, text_tokens]) for r in rows]
    return torch.stack(rows).view(*lead, s)


@st.composite
def varblock_cases(draw):
    """(q, k, v, plan): a variable-block plan over S tokens with text, as described in the module docstring."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    s = draw(st.integers(1, 160))
    position = draw(st.sampled_from(["none", "prefix", "suffix"]))
    text = 0 if position == "none" or s < 2 else draw(st.integers(1, max(1, s // 4)))
    prefix = position == "prefix"
    video = s - text
    # Shared by every row and head, per head, or per row and head (SVG2: per row and head).
    lead = draw(st.sampled_from([(1, 1), (1, h), (b, h)]))
    variable = draw(st.sampled_from(["both", "both", "q", "k"]))
    block = draw(st.sampled_from([7, 16]))  # the fixed axis, where one is fixed

    def axis_bounds(n_video: int) -> torch.Tensor:
        """long (B', H', n + 1): the video clusters, and text as one block of its own first or last."""
        rows = []
        for _ in range(lead[0] * lead[1]):
            sizes = awkward_sizes(gen, n_video, video)
            if text:
                sizes = torch.cat([torch.tensor([text]), sizes] if prefix else [sizes, torch.tensor([text])])
            rows.append(torch.nn.functional.pad(sizes.cumsum(0), (1, 0)))
        return torch.stack(rows).view(*lead, -1)

    nq_video, nk_video = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    q_bounds = axis_bounds(nq_video) if variable in ("both", "q") else None
    k_bounds = axis_bounds(nk_video) if variable in ("both", "k") else None
    n_fixed = -(-s // block)
    nq = n_fixed if q_bounds is None else q_bounds.shape[-1] - 1
    nk = n_fixed if k_bounds is None else k_bounds.shape[-1] - 1
    layout = torch.rand(*lead, nq, nk, generator=gen) < draw(st.sampled_from([0.15, 0.4, 0.8]))
    layout[..., torch.randint(nk, (1,), generator=gen)] = True  # every query cluster keeps a key cluster (maybe empty)
    order = video_order(gen, lead, s, text, prefix) if draw(st.booleans()) else None
    k_order = video_order(gen, lead, s, text, prefix) if draw(st.booleans()) else None
    plan = AttentionPlan(seq_len=s, layout=layout, block_size=block, q_bounds=q_bounds, k_bounds=k_bounds,
                         order=order, k_order=k_order)
    if text:  # the text query block keeps every key block, and every query block keeps the text key block
        q_text = plan.token_block_index("q")[..., 0 if prefix else -1]  # text stays in place: its first/last token
        k_text = plan.token_block_index("k")[..., 0 if prefix else -1]
        rows = torch.zeros(*lead, nq, dtype=torch.bool).scatter_(-1, q_text.expand(*lead)[..., None], True)
        cols = torch.zeros(*lead, nk, dtype=torch.bool).scatter_(-1, k_text.expand(*lead)[..., None], True)
        layout = layout | rows[..., :, None] | cols[..., None, :]
    head_mode = None
    if draw(st.booleans()):
        head_mode = torch.tensor([HEAD_DENSE, HEAD_SPARSE, HEAD_SKIP], dtype=torch.int8)[torch.randint(3, (1, h), generator=gen)]
    plan = dataclasses.replace(plan, layout=layout)
    plan.check_rows()  # what every planner's plan passes (checked on every head: stricter than with head modes)
    plan = dataclasses.replace(plan, head_mode=head_mode)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    d = draw(st.sampled_from([8, 32, 64]))
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to(dtype) for _ in range(3))
    return q, k, v, plan


def expected(q, k, v, plan):
    """The reference on the inputs upcast to float64."""
    return kernels.run(q.double(), k.double(), v.double(), plan, backend="reference")


@settings(**SETTINGS)
@given(case=varblock_cases())
def test_varblock_matches_the_reference(case):
    q, k, v, plan = case
    with torch.inference_mode():
        out = kernels.run(q, k, v, plan, backend="gather")
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), expected(q, k, v, plan), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varblock_key_splits_match_the_reference(dtype, monkeypatch):
    """Keys split into parts merged by their log-sum-exp (here at most 24 keys per part, cluster boundaries ignored)."""
    monkeypatch.setattr(gather, "KV_BYTES", 24 * 2 * 32 * dtype.itemsize)
    gen = torch.Generator().manual_seed(3)
    s, h = 301, 2
    plan = clustered_plan(s, h, 9, 23, 0.3, gen)
    q, k, v = (torch.randn(2, s, h, 32, generator=gen).to(dtype) for _ in range(3))
    assert len(gather.split_bounds(int(plan.block_lengths("k").max()) * 3, 2 * 32 * dtype.itemsize)) > 2
    with torch.inference_mode():
        out = kernels.run(q, k, v, plan, backend="gather")
    torch.testing.assert_close(out.double(), expected(q, k, v, plan), atol=TOL[dtype], rtol=TOL[dtype])


def test_clusters_that_keep_only_empty_key_clusters_output_zeros():
    """A query cluster whose kept key clusters are all empty attends to nothing: zeros, as the reference gives."""
    s = 10
    layout = torch.tensor([[True, False, False], [False, True, True], [True, True, False]])[None, None]
    q_bounds, k_bounds = torch.tensor([[[0, 4, 4, 10]]]), torch.tensor([[[0, 0, 10, 10]]])  # key clusters 0, 2 empty
    plan = AttentionPlan(seq_len=s, layout=layout, q_bounds=q_bounds, k_bounds=k_bounds)
    q, k, v = (torch.randn(1, s, 1, 8) for _ in range(3))
    out = kernels.run(q, k, v, plan, backend="gather")
    assert out[0, :4].abs().max() == 0 and out[0, 4:].abs().min() > 0
    torch.testing.assert_close(out, kernels.run(q, k, v, plan, backend="reference"), atol=2e-5, rtol=2e-5)


def test_auto_sends_variable_blocks_on_cpu_to_the_varblock_path():
    """The capability table's gather row takes variable blocks, and `kernels.run` runs them by cluster."""
    assert backend_capabilities("gather", "cpu").variable_blocks
    gen = torch.Generator().manual_seed(0)
    s, h = AUTO_MIN_SEQ + 37, 2
    plan = clustered_plan(s, h, 6, 20, 0.25, gen)
    q, k, v = (torch.randn(1, s, h, 16, generator=gen) for _ in range(3))
    assert select_backend(plan, q) == "gather"
    short = clustered_plan(AUTO_MIN_SEQ - 1, h, 6, 20, 0.25, gen)
    assert select_backend(short, torch.randn(1, AUTO_MIN_SEQ - 1, h, 16)) == "reference"  # as for fixed blocks
    with torch.inference_mode():
        out = kernels.run(q, k, v, plan)
    assert any(key[0] == "varblock_schedule" for key in plan.cache)
    assert not any(key[0] == "gather_groups" for key in plan.cache)
    torch.testing.assert_close(out, kernels.run(q, k, v, plan, backend="reference"), atol=2e-5, rtol=2e-5)
    # What the gather row refuses, it refuses for variable blocks too.
    with pytest.raises(ConfigError, match="plan.quant='int8'"):
        kernels.run(q, k, v, dataclasses.replace(plan, quant="int8"), backend="gather")


def test_schedule_counts_the_computed_pairs_and_outputs_outlive_the_workspace():
    gen = torch.Generator().manual_seed(1)
    s, h = 257, 3
    modes = torch.tensor([[HEAD_SPARSE, HEAD_DENSE, HEAD_SKIP]], dtype=torch.int8)
    plan = dataclasses.replace(clustered_plan(s, h, 7, 19, 0.3, gen), head_mode=modes)
    work = varblock.schedule(plan, 2, h, torch.device("cpu"))
    # The sparse head's pairs (density * S^2) and the dense head's S^2, for each of the 2 rows; none for the skipped.
    assert work.pairs == pytest.approx(2 * (float(plan.head_densities()[0, 0]) + 1) * s * s, rel=1e-9)
    first, second = ([torch.randn(2, s, h, 16, generator=gen) for _ in range(3)] for _ in range(2))
    with torch.inference_mode():
        out = kernels.run(*first, plan, backend="gather")
        kept = out.clone()
        kernels.run(*second, plan, backend="gather")
    torch.testing.assert_close(out, kept, atol=0, rtol=0)
    assert out[:, :, 2].abs().max() == 0  # the skipped head
    torch.testing.assert_close(out, kernels.run(*first, plan, backend="reference"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("n, total", [(1, 0), (1, 9), (3, 1), (4, 4), (64, 1000), (17, 40000)])
def test_uneven_sizes(n, total):
    """The benchmark's cluster sizes: they fill S, and where there are 4 or more, some are empty, some single."""
    sizes = uneven_sizes(total, n, torch.Generator().manual_seed(0))
    assert sizes.shape == (n,) and int(sizes.sum()) == total and int(sizes.min()) >= 0
    if n >= 4 and total >= n:
        assert (sizes == 0).any() and (sizes == 1).any() and int(sizes.max()) > 2 * total / n


def test_bench_kernels_times_a_variable_block_plan(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "kernels", "--seq", "600", "--density", "0.3", "--block", "64", "--clusters", "5,12",
                 "--backend", "gather", "--reps", "1", "--warmup", "0", "--json", str(path)]) == 0
    (record,) = json.loads(path.read_text())
    assert record["clusters"] == [5, 12] and record["varblock_ms"] > 0 and record["pair_ratio"] > 0
    assert 0.3 <= record["varblock_density"] < 0.6  # kept clusters until each query cluster holds 30% of the keys
    assert "per pair" in capsys.readouterr().out
    assert main(["bench", "kernels", "--clusters", "5"]) == 2
    assert "--clusters takes two positive counts" in capsys.readouterr().err


@pytest.mark.parametrize("position", ["prefix", "suffix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_svg2_plans_match_the_reference(position, dtype):
    """The plans the `svg2` method makes (separate query and key orders, text one block in place, empty key
    clusters where 5 distinct tokens meet 16 centroids), through the gather backend."""
    import sparse_dit
    from sparse_dit.attention import make_context

    gen = torch.Generator().manual_seed(5)
    grid, text = (2, 5, 7), 9
    s = 2 * 5 * 7 + text
    q, k, v = (torch.randn(2, s, 2, 32, generator=gen) for _ in range(3))
    k[:, :40] = k[:, :5].repeat(1, 8, 1, 1)  # repeated keys: some of the 16 key clusters stay empty
    attention = sparse_dit.SparseAttention("svg2", min_seq_len=0, num_q_centroids=6, num_k_centroids=16, top_p=0.6)
    plan = attention.plan(q, k, make_context(q, grid, text, position))
    assert plan.q_bounds is not None and plan.k_order is not None and (plan.block_lengths("k") == 0).any()
    q, k, v = (x.to(dtype) for x in (q, k, v))
    with torch.inference_mode():
        out = kernels.run(q, k, v, plan, backend="gather")
    torch.testing.assert_close(out.double(), expected(q, k, v, plan), atol=TOL[dtype], rtol=TOL[dtype])


def expected_with_lse(q, k, v, plan):
    """The reference's output and LSE on the inputs upcast to float64 (it takes the LSE in float32)."""
    return kernels.run(q.double(), k.double(), v.double(), plan, backend="reference", return_lse=True)


def check_lse(q, k, v, plan):
    """gather's (out, lse) against the reference, and its output against its own no-LSE output: the same sums."""
    with torch.inference_mode():
        out, lse = kernels.run(q, k, v, plan, backend="gather", return_lse=True)
        plain = kernels.run(q, k, v, plan, backend="gather")
    want, want_lse = expected_with_lse(q, k, v, plan)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    # -inf where the reference has it (queries that attend nothing), and exactly 0 output there.
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=max(tol, 1e-4), rtol=max(tol, 1e-4))
    nothing = torch.isneginf(lse).transpose(1, 2)
    assert not out[nothing].any()
    torch.testing.assert_close(out, plain, atol=tol, rtol=tol)
    return nothing


@settings(**{**SETTINGS, "max_examples": 40})
@given(case=varblock_cases(), split=st.booleans())
def test_varblock_lse_matches_the_reference(case, split):
    """The LSE of the variable-block path on the same draws, keys split at most 16 to a part or not."""
    q, k, v, plan = case
    with pytest.MonkeyPatch.context() as patch:
        if split:
            patch.setattr(gather, "KV_BYTES", 16 * 2 * q.shape[-1] * q.element_size())
        check_lse(q, k, v, plan)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fixed_block_lse_matches_the_reference(dtype, split, monkeypatch):
    """The fixed-block path with its LSE: S=301 in blocks of 32 (a short last block), per-head token orders,
    dense, sparse and skipped heads, query blocks that keep no key block (0 and -inf), a layout per row and head
    and one shared by all; with `split`, at most two key blocks per flash call, merged by their LSE."""
    if split:
        monkeypatch.setattr(gather, "KV_BYTES", 2 * 32 * 2 * 32 * dtype.itemsize)
    gen = torch.Generator().manual_seed(11)
    b, s, h, bs = 2, 301, 3, 32
    n = -(-s // bs)
    q, k, v = (torch.randn(b, s, h, 32, generator=gen).to(dtype) for _ in range(3))
    layout = (torch.rand(b, h, n, n, generator=gen) < 0.3) | torch.eye(n, dtype=torch.bool)
    layout[:, :, [1, n - 1]] = False  # a middle block and the short last one keep nothing
    order = torch.stack([torch.randperm(s, generator=gen) for _ in range(b * h)]).view(b, h, s)
    modes = torch.tensor([[HEAD_SPARSE, HEAD_DENSE, HEAD_SKIP]], dtype=torch.int8)
    plans = [AttentionPlan(seq_len=s, layout=layout, block_size=bs),
             AttentionPlan(seq_len=s, layout=layout[:1, :1], block_size=bs, order=order, head_mode=modes)]
    for plan in plans:
        if split:
            assert len(gather.split_bounds(int(plan.layout.sum(-1).max()), bs * 2 * 32 * dtype.itemsize)) > 2
        nothing = check_lse(q, k, v, plan)
        assert nothing.any() and not nothing.all()
    # Without head modes, exactly the tokens of the emptied blocks (in the plan's order) attend nothing.
    empty_tokens = torch.zeros(s, dtype=torch.bool)
    empty_tokens[bs : 2 * bs] = empty_tokens[(n - 1) * bs :] = True
    _, lse = kernels.run(q, k, v, plans[0], backend="gather", return_lse=True)
    assert torch.equal(torch.isneginf(lse), empty_tokens.expand(b, h, s))
