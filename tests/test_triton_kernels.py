"""The Triton kernels on CPU (TRITON_INTERPRET=1) against the torch reference and torch re-implementations.

@triton.jit reads TRITON_INTERPRET when a function is decorated, so `triton_interpreter` sets it before anything
here imports triton, and rebuilds what another test file in the same process imported earlier. The
interpreter costs about 5 ms per (program x key chunk), so inputs stay small: S=200 (a ragged last block
for blocks of 64 and 128), D <= 64, two or three heads.
"""

import triton_interpreter  # noqa: F401  (first: sets TRITON_INTERPRET before anything imports triton)

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from sparse_dit.errors import ShapeError
from sparse_dit.kernels.reference import reference_attention
from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan

B, S, H = 2, 200, 3
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


tk = triton_interpreter.interpreted_kernels()


def qkv(dtype, d=32, b=B, h=H):
    return [torch.randn(b, S, h, d).to(dtype) for _ in range(3)]


def block_layout(b, h, n, p=0.35):
    layout = torch.rand(b, h, n, n) < p
    return layout | torch.eye(n, dtype=torch.bool)  # a query block never ends with no key block


def random_order(b, h):
    return torch.stack([torch.randperm(S) for _ in range(b * h)]).view(b, h, S)


def variable_bounds(b, h, n, min_first=1):
    """(b, h, n + 1) cluster boundaries: a first cluster of at least `min_first` tokens, then random cuts
    (duplicates make zero-length clusters)."""
    cuts = torch.randint(min_first, S + 1, (b, h, n - 1)).sort(dim=-1).values
    return torch.cat([torch.zeros(b, h, 1, dtype=torch.long), cuts, torch.full((b, h, 1), S)], dim=-1)


def assert_matches_reference(q, k, v, plan, atol):
    out, lse = tk.triton_attention(q, k, v, plan, return_lse=True)
    expected, expected_lse = reference_attention(q.float(), k.float(), v.float(), plan, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], S)
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=atol)
    torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-4)  # -inf (skipped heads) must match too
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fixed_blocks_with_order_and_head_modes(dtype):
    q, k, v = qkv(dtype)
    modes = torch.tensor([[HEAD_DENSE, HEAD_SPARSE, HEAD_SKIP], [HEAD_SPARSE, HEAD_SPARSE, HEAD_DENSE]], dtype=torch.int8)
    plan = AttentionPlan(seq_len=S, layout=block_layout(B, H, 4), block_size=64, order=random_order(B, H), head_mode=modes)
    assert_matches_reference(q, k, v, plan, TOL[dtype])
    assert ("triton_csr", "cpu") in plan.cache  # built once, reused by the next call


def test_block_128_plan_broadcast_over_batch_and_strided_inputs():
    # q, k, v sliced from one fused (B, S, 3, H, D) projection: strided views, not contiguous tensors.
    qkv_fused = torch.randn(B, S, 3, H, 64, dtype=torch.float16)
    q, k, v = qkv_fused.unbind(dim=2)
    plan = AttentionPlan(seq_len=S, layout=block_layout(1, H, 2, p=0.5), block_size=128)
    assert_matches_reference(q, k, v, plan, TOL[torch.float16])


def test_full_plan_equals_dense_sdpa():
    q, k, v = qkv(torch.float32, d=16)
    out = tk.triton_attention(q, k, v, AttentionPlan.full(S, 64), scale=0.3)
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_variable_blocks_match_reference(dtype):
    b, h, nq, nk = 2, 2, 5, 6
    q, k, v = qkv(dtype, d=16, b=b, h=h)
    # A first query cluster of >= 100 tokens spans two 64-row tiles; keys are shared over the batch.
    q_bounds, k_bounds = variable_bounds(b, h, nq, min_first=100), variable_bounds(1, h, nk)
    layout = torch.rand(b, h, nq, nk) < 0.4
    layout[..., 0] = True  # key cluster 0 is never empty: every query row attends something
    plan = AttentionPlan(seq_len=S, layout=layout, q_bounds=q_bounds, k_bounds=k_bounds, order=random_order(b, h))
    assert_matches_reference(q, k, v, plan, TOL[dtype])


@pytest.mark.parametrize("quant, variable", [("int8", False), ("int8", True), ("int4", False)])
def test_quantized_qk_matches_reference(quant, variable):
    q, k, v = qkv(torch.float16, h=2)
    if variable:
        bounds = variable_bounds(1, 1, 4, min_first=10)
        plan = AttentionPlan(seq_len=S, layout=block_layout(B, 2, 4, p=0.5), q_bounds=bounds, k_bounds=bounds, quant=quant)
    else:
        plan = AttentionPlan(seq_len=S, layout=block_layout(B, 2, 4), block_size=64, quant=quant)
    # Both sides round Q and K with the same per-block scales; only accumulation order differs.
    out = assert_matches_reference(q, k, v, plan, 1e-2)
    exact = reference_attention(q.float(), k.float(), v.float(), dataclasses.replace(plan, quant="none"))
    quantized = reference_attention(q.float(), k.float(), v.float(), plan)
    # It really quantized: the exact result is much further away than the quantized one.
    assert (out.float() - exact).abs().max() > 5 * (out.float() - quantized).abs().max()


def test_csr_broadcasts_the_plan_and_applies_head_modes():
    layout = torch.tensor([[True, False, True], [False, True, False], [True, True, False]]).view(1, 1, 3, 3)
    modes = torch.tensor([[HEAD_SPARSE, HEAD_DENSE, HEAD_SKIP]], dtype=torch.int8)  # (1, H): one row per head
    plan = AttentionPlan(seq_len=3 * 64, layout=layout, block_size=64, head_mode=modes)
    csr = tk.plan_csr(plan, torch.device("cpu"))
    assert (csr.plan_batch, csr.plan_heads) == (1, 3)
    rows = [csr.cols[csr.row_ptr[r]:csr.row_ptr[r + 1]].tolist() for r in range(9)]
    assert rows[:3] == [[0, 2], [1], [0, 1]]  # sparse head: the layout
    assert rows[3:6] == [[0, 1, 2]] * 3  # dense head: every block
    assert rows[6:] == [[]] * 3  # skipped head: nothing to compute
    assert csr.row_ptr.dtype == csr.cols.dtype == torch.int32
    assert tk.plan_csr(plan, torch.device("cpu")) is csr


def test_query_tiles_cover_every_row_once_within_its_block():
    from sparse_dit.kernels.triton.csr import query_tiles

    bounds = torch.tensor([[0, 150, 150, 151, 200], [0, 64, 128, 192, 200]]).view(1, 2, 5)
    plan = AttentionPlan(seq_len=S, layout=torch.ones(1, 2, 4, 4, dtype=torch.bool), q_bounds=bounds, k_bounds=bounds)
    tiles = query_tiles(plan, torch.device("cpu"), 64)
    for p in range(2):
        covered = torch.zeros(S, dtype=torch.int64)
        for block, start, end in tiles[p].tolist():
            if block < 0:
                continue
            assert bounds[0, p, block] <= start < end <= bounds[0, p, block + 1] and end - start <= 64
            covered[start:end] += 1
        assert covered.eq(1).all()


def test_supports():
    q = torch.randn(1, S, 2, 32)
    plan = AttentionPlan.full(S, 64)
    assert tk.supports(plan, q, None, True)
    assert not tk.supports(plan, q, torch.ones(1, 1, S, S, dtype=torch.bool), False)  # model masks: reference
    assert not tk.supports(plan, torch.randn(1, S, 2, 48), None, False)
    assert not tk.supports(plan, q.requires_grad_(), None, False)  # forward only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_mean_pool(dtype):
    x = torch.randn(B, S, H, 32).to(dtype)
    pooled = tk.block_mean_pool(x, 64)
    xf = x.float().transpose(1, 2)
    expected = torch.stack([xf[:, :, i:i + 64].mean(dim=2) for i in range(0, S, 64)], dim=2)  # last: 8 rows
    assert pooled.shape == (B, H, 4, 32) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, block", [(torch.float32, 64), (torch.bfloat16, 128)])
def test_block_attention_mass(dtype, block):
    q, k, _ = qkv(dtype, h=2)
    lse = torch.logsumexp((q.float().transpose(1, 2) @ k.float().transpose(1, 2).mT) * 0.2, dim=-1)
    lse[1, 0] = float("-inf")  # a skipped head carries no mass
    mass = tk.block_attention_mass(q, k, lse, block, scale=0.2)
    probs = torch.exp((q.float().transpose(1, 2) @ k.float().transpose(1, 2).mT) * 0.2 - lse[..., None])
    probs = probs.nan_to_num(posinf=0.0)
    n = -(-S // block)
    padded = F.pad(probs, (0, n * block - S, 0, n * block - S))
    expected = padded.view(B, 2, n, block, n, block).sum(dim=(3, 5))
    assert mass.shape == (B, 2, n, n) and mass.dtype == torch.float32
    torch.testing.assert_close(mass, expected, atol=TOL[dtype], rtol=TOL[dtype])
    rows = torch.tensor([min(block, S - i) for i in range(0, S, block)], dtype=torch.float32)
    torch.testing.assert_close(mass[0, 0].sum(dim=-1), rows, atol=1e-3, rtol=1e-3)  # dense LSE: rows sum to 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kmeans_assign(dtype):
    x, centroids = torch.randn(3, 150, 16).to(dtype), torch.randn(3, 70, 16).to(dtype)  # 70: two ragged steps
    assign = tk.kmeans_assign(x, centroids)
    dist = torch.cdist(x.double(), centroids.double())
    assert assign.dtype == torch.int32 and assign.shape == (3, 150)
    chosen = dist.gather(2, assign.long()[..., None]).squeeze(-1)
    torch.testing.assert_close(chosen, dist.min(dim=-1).values, atol=1e-2, rtol=0)  # nearest up to rounding
    assert (assign.long() == dist.argmin(dim=-1)).float().mean() > 0.98


def test_helpers_refuse_head_dims_they_cannot_tile():
    with pytest.raises(ShapeError, match="head dim 24"):
        tk.kmeans_assign(torch.randn(1, 8, 24), torch.randn(1, 4, 24))
