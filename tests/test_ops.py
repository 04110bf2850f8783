"""The planner ops (`sparse_dit.ops`) against brute force in float64, and their Triton kernels against them.

Brute force is loops and plain formulas over awkward shapes: batch > 1, sequences that are not a multiple of the
block, a ragged chunk. The Triton kernels run on CPU under TRITON_INTERPRET=1 (`triton_interpreter`), on small
inputs: the interpreter is slow.
"""

import triton_interpreter  # noqa: I001  (first: sets TRITON_INTERPRET before anything imports triton)

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_dit import ops
from sparse_dit.errors import ShapeError

needs_triton = pytest.mark.skipif(not triton_interpreter.HAS_TRITON, reason="triton is not installed")
if triton_interpreter.HAS_TRITON:
    triton_interpreter.interpreted_kernels()


def brute_pool(x, block):
    b, s, h, d = x.shape
    out = torch.zeros(b, h, math.ceil(s / block), d, dtype=torch.float64)
    for i, start in enumerate(range(0, s, block)):
        for bi in range(b):
            for hi in range(h):
                out[bi, hi, i] = x[bi, start:start + block, hi].double().mean(dim=0)
    return out


def brute_mass(q, k, lse, block, scale):
    """mass[b, h, i, j] = sum over rows of block i, keys of block j of exp(q.k * scale - lse), row by row."""
    b, s, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    n = math.ceil(s / block)
    out = torch.zeros(b, h, n, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for r in range(s):
                scores = k[bi, :, hi].double() @ q[bi, r, hi].double() * scale
                row_lse = torch.logsumexp(scores, 0) if lse is None else lse[bi, hi, r].double()
                if row_lse == float("-inf"):
                    continue  # a row that attended nothing carries no mass
                probs = torch.exp(scores - row_lse)
                for j in range(n):
                    out[bi, hi, r // block, j] += probs[j * block:(j + 1) * block].sum()
    return out


def brute_top_p(row, p):
    """Indices of the fewest entries, highest first (ties by index), whose sum reaches p of the row's total."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    total, kept, acc = sum(row), [], 0.0
    for j in order:
        if kept and acc >= (p - ops.SHARE_TOL) * total:
            break
        kept.append(j)
        acc += row[j]
    return set(kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("s, block", [(53, 16), (7, 16), (64, 16)])  # ragged, one short block, whole blocks
def test_block_mean_pool(dtype, s, block):
    x = torch.randn(2, s, 3, 5).to(dtype)
    pooled = ops.block_mean_pool(x, block)
    assert pooled.shape == (2, 3, math.ceil(s / block), 5)
    assert pooled.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(pooled.double(), brute_pool(x, block), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_kmeans_assign(dtype, monkeypatch):
    monkeypatch.setattr(ops, "KMEANS_CHUNK", 3 * 70 * 16)  # 16 points per step: a ragged last step of 150
    x, centroids = torch.randn(3, 150, 6).to(dtype), torch.randn(3, 70, 6).to(dtype)
    assign = ops.kmeans_assign(x, centroids)
    assert assign.dtype == torch.int32 and assign.shape == (3, 150)
    dist = torch.stack([torch.stack([((c - p) ** 2).sum(-1) for p in xs.double()]) for xs, c in zip(x, centroids.double())])
    if dtype == torch.float64:
        assert torch.equal(assign.long(), dist.argmin(dim=-1))
    else:  # nearest up to rounding of |c|^2 - 2 x.c
        chosen = dist.gather(2, assign.long()[..., None]).squeeze(-1)
        torch.testing.assert_close(chosen, dist.min(dim=-1).values, atol=1e-2, rtol=0)


def test_kmeans_assign_ties_go_to_the_lowest_index():
    centroids = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])  # the last point is equidistant from all four
    assert ops.kmeans_assign(x, centroids).tolist() == [[0, 1, 0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kmeans_update_means_and_keeps_empty_clusters(dtype):
    x = torch.randn(2, 40, 4).to(dtype)
    centroids = torch.randn(2, 6, 4)
    assign = torch.randint(0, 5, (2, 40), dtype=torch.int32)  # centroid 5 gets no point
    assign[1, assign[1] == 2] = 3  # nor does centroid 2 in the second row
    updated = ops.kmeans_update(x, assign, centroids)
    assert updated.dtype == centroids.dtype and updated.shape == centroids.shape
    for bh in range(2):
        for c in range(6):
            members = x[bh][assign[bh] == c].double()
            expected = members.mean(dim=0) if len(members) else centroids[bh, c].double()
            torch.testing.assert_close(updated[bh, c].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(updated[:, 5], centroids[:, 5]) and torch.equal(updated[1, 2], centroids[1, 2])


@pytest.mark.parametrize("with_lse", [True, False], ids=["cached-lse", "dense-lse"])
@pytest.mark.parametrize("kv_heads", [2, 1])  # grouped-query attention: one key head for both query heads
def test_block_attention_mass(with_lse, kv_heads):
    b, s, h, block, scale = 2, 45, 2, 8, 0.3  # 6 blocks, the last of 5 tokens; 24-row chunks: a short last one
    q, k = torch.randn(b, s, h, 8) * 2, torch.randn(b, s, kv_heads, 8) * 2
    lse = None
    if with_lse:  # a sparse call's LSE (only the first 30 keys) and a skipped head's rows
        kk = k.repeat_interleave(h // kv_heads, dim=2)
        lse = torch.logsumexp(torch.einsum("bshd,bthd->bhst", q, kk)[..., :30] * scale, dim=-1)
        lse[1, 0] = float("-inf")
    mass = ops.block_attention_mass(q, k, lse, block, scale, chunk_rows=24)
    assert mass.shape == (b, h, 6, 6) and mass.dtype == torch.float32
    torch.testing.assert_close(mass.double(), brute_mass(q, k, lse, block, scale), atol=1e-4, rtol=1e-5)
    if not with_lse:  # dense attention: each row of blocks sums to its row count
        rows = torch.tensor([8, 8, 8, 8, 8, 5], dtype=torch.float32)
        torch.testing.assert_close(mass.sum(-1), rows.expand(b, h, 6), atol=1e-4, rtol=0)
        # The LSE found on the way is dense attention's, and the mass it comes with is the same.
        again, found = ops.block_attention_mass(q, k, None, block, scale, chunk_rows=24, return_lse=True)
        kk = k.repeat_interleave(h // kv_heads, dim=2)
        dense = torch.logsumexp(torch.einsum("bshd,bthd->bhst", q, kk) * scale, dim=-1)
        torch.testing.assert_close(found, dense, atol=1e-5, rtol=1e-5)
        assert torch.equal(again, mass)
        with pytest.raises(ShapeError, match="return_lse"):
            ops.block_attention_mass(q, k, found, block, scale, return_lse=True)
    else:
        assert mass[1, 0].eq(0).all()


def test_block_attention_mass_needs_an_lse_in_triton():
    with pytest.raises(ShapeError, match="LSE"):
        ops.block_attention_mass(torch.randn(1, 64, 1, 16), torch.randn(1, 64, 1, 16), None, 64, impl="triton")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 10), rows=st.integers(1, 3), seed=st.integers(0, 2**16), p=st.floats(0.05, 1.0),
       total=st.sampled_from([1.0, 0.3, 7.0]), ties=st.booleans())
def test_top_p_select_is_the_minimal_prefix(n, rows, seed, p, total, ties):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, n, generator=gen)
    if ties:
        scores = (scores * 3).round()  # repeated values and zeros
    scores = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12) * total
    keep = ops.top_p_select(scores, p)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    for r in range(rows):
        assert set(keep[r].nonzero().flatten().tolist()) == brute_top_p(scores[r].double().tolist(), p)


def test_top_p_select_keeps_the_top_entry_of_a_zero_row():
    keep = ops.top_p_select(torch.zeros(2, 3, 4), 0.9)
    assert keep.sum(-1).eq(1).all() and keep[..., 0].all()


# -- the Triton kernels (interpreted) against the torch ops ------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_block_mean_pool_matches_torch(dtype):
    x = torch.randn(2, 200, 2, 32).to(dtype)
    torch.testing.assert_close(ops.block_mean_pool(x, 64, impl="triton"), ops.block_mean_pool(x, 64, impl="torch"),
                               atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_kmeans_assign_matches_torch():
    x, centroids = torch.randn(3, 150, 16), torch.randn(3, 70, 16)
    torch.testing.assert_close(ops.kmeans_assign(x, centroids, impl="triton"), ops.kmeans_assign(x, centroids, impl="torch"),
                               atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_triton_block_attention_mass_matches_torch(kv_heads):
    q, k = torch.randn(2, 200, 2, 32), torch.randn(2, 200, kv_heads, 32)
    lse = torch.logsumexp(torch.einsum("bshd,bthd->bhst", q, k.repeat_interleave(2 // kv_heads, dim=2)) * 0.2, dim=-1)
    lse[0, 1] = float("-inf")
    triton_mass = ops.block_attention_mass(q, k, lse, 64, 0.2, impl="triton")
    torch.testing.assert_close(triton_mass, ops.block_attention_mass(q, k, lse, 64, 0.2, impl="torch"), atol=1e-4, rtol=1e-4)

