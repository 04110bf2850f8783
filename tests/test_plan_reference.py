"""AttentionPlan and the torch reference kernel against a brute-force row-by-row softmax."""

import pytest
import torch
import torch.nn.functional as F

from sparse_dit import AttentionPlan, ShapeError, kernels
from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE

from conftest import TOL


def brute_force(q, k, v, allowed, scale=None):
    """out[b, i, h] = softmax over allowed[b, h, i, :] of q.k, one row at a time, in float64."""
    b, s, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, s, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(s):
                keys = allowed[bi, hi, i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                scores = (k[bi, keys, hi].double() @ q[bi, i, hi].double()) * scale
                out[bi, i, hi] = torch.softmax(scores, 0) @ v[bi, keys, hi].double()
    return out


def random_layout(b, h, nq, nk, p=0.3, generator=None):
    layout = torch.rand(b, h, nq, nk, generator=generator) < p
    layout[..., torch.arange(min(nq, nk)), torch.arange(min(nq, nk))] = True
    return layout


def expand(layout_bh, q_idx, k_idx):
    """Token mask from a block layout (B, H, nq, nk) and per-token block indices (S,)."""
    return layout_bh[:, :, q_idx][:, :, :, k_idx]


def qkv(b=2, s=45, h=3, d=16, dtype=torch.float32):
    return [torch.randn(b, s, h, d).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_full_plan_equals_dense_attention(dtype):
    q, k, v = qkv(dtype=dtype)
    plan = AttentionPlan.full(45, 8)
    assert plan.density == pytest.approx(1.0)
    out = kernels.run(q, k, v, plan, backend="reference")
    expected = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ragged_fixed_blocks_match_brute_force(dtype):
    b, s, h, bs = 2, 45, 3, 8  # 45 tokens: 6 blocks, the last one of 5 tokens
    q, k, v = qkv(b, s, h, dtype=dtype)
    layout = random_layout(b, h, 6, 6, generator=torch.Generator().manual_seed(1))
    plan = AttentionPlan(seq_len=s, layout=layout, block_size=bs)
    idx = torch.arange(s) // bs
    expected = brute_force(q, k, v, expand(layout, idx, idx))
    out = kernels.run(q, k, v, plan, backend="reference")
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])
    lengths = torch.tensor([8, 8, 8, 8, 8, 5], dtype=torch.float64)
    manual = (layout.double() * lengths[:, None] * lengths[None, :]).sum((-1, -2)) / s**2
    assert plan.density == pytest.approx(float(manual.mean()))


def test_broadcast_layout_and_lse():
    q, k, v = qkv(2, 40, 2)
    layout = random_layout(1, 2, 5, 5)
    plan = AttentionPlan(seq_len=40, layout=layout, block_size=8)
    out, lse = kernels.run(q, k, v, plan, return_lse=True)
    idx = torch.arange(40) // 8
    allowed = expand(layout.expand(2, 2, 5, 5), idx, idx)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * 16**-0.5
    expected_lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), brute_force(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_variable_blocks_match_brute_force():
    b, s, h = 1, 30, 2
    q, k, v = qkv(b, s, h)
    q_bounds = torch.tensor([[[0, 7, 19, 30], [0, 3, 4, 30]]])
    k_bounds = torch.tensor([[[0, 10, 12, 25, 30], [0, 1, 20, 29, 30]]])
    layout = torch.rand(b, h, 3, 4) < 0.5
    layout[..., 0] = True
    plan = AttentionPlan(seq_len=s, layout=layout, q_bounds=q_bounds, k_bounds=k_bounds)
    allowed = torch.zeros(b, h, s, s, dtype=torch.bool)
    for hi in range(h):
        q_idx = torch.bucketize(torch.arange(s), q_bounds[0, hi, 1:], right=True)
        k_idx = torch.bucketize(torch.arange(s), k_bounds[0, hi, 1:], right=True)
        allowed[0, hi] = layout[0, hi][q_idx][:, k_idx]
    torch.testing.assert_close(kernels.run(q, k, v, plan).double(), brute_force(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_order_permutes_then_restores():
    b, s, h, bs = 2, 24, 2, 6
    q, k, v = qkv(b, s, h)
    order = torch.stack([torch.randperm(s) for _ in range(b * h)]).view(b, h, s)
    layout = random_layout(b, h, 4, 4)
    plan = AttentionPlan(seq_len=s, layout=layout, block_size=bs, order=order)
    idx = torch.arange(s) // bs
    allowed_perm = expand(layout, idx, idx)  # in permuted positions
    allowed = torch.zeros_like(allowed_perm)
    for bi in range(b):
        for hi in range(h):
            o = order[bi, hi]
            allowed[bi, hi][o[:, None], o[None, :]] = allowed_perm[bi, hi]
    torch.testing.assert_close(kernels.run(q, k, v, plan).double(), brute_force(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_head_modes_and_their_density():
    q, k, v = qkv(1, 32, 3)
    layout = torch.eye(4, dtype=torch.bool).expand(1, 3, 4, 4)
    plan = AttentionPlan(seq_len=32, layout=layout, block_size=8, head_mode=torch.tensor([[HEAD_DENSE, HEAD_SPARSE, HEAD_SKIP]]))
    out = kernels.run(q, k, v, plan)
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out[:, :, 0], dense[:, :, 0])
    assert torch.count_nonzero(out[:, :, 2]) == 0
    assert plan.density == pytest.approx((1.0 + 0.25 + 0.0) / 3)


@pytest.mark.parametrize("quant,tol", [("int8", 0.02), ("int4", 0.3)])
def test_quantized_qk_stays_close(quant, tol):
    q, k, v = qkv(1, 64, 2)
    full = AttentionPlan.full(64, 16)
    plan = AttentionPlan(seq_len=64, layout=full.layout, block_size=16, quant=quant)
    exact, approx = kernels.run(q, k, v, full), kernels.run(q, k, v, plan)
    assert not torch.equal(exact, approx)
    assert (approx - exact).abs().max() < tol


def test_model_mask_is_combined():
    q, k, v = qkv(2, 16, 1)
    keep = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    keep[1, ..., 12:] = False  # padded text keys of the second sample
    out = kernels.run(q, k, v, AttentionPlan.full(16, 4), attn_mask=keep)
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=keep).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_bad_plans_and_inputs_raise():
    q, k, v = qkv(1, 20, 2)
    with pytest.raises(ShapeError, match="S=16"):
        kernels.run(q, k, v, AttentionPlan.full(16, 4))
    with pytest.raises(ShapeError, match="bool"):
        AttentionPlan(seq_len=20, layout=torch.ones(1, 1, 5, 5), block_size=4)
    with pytest.raises(ShapeError, match="needs 5"):
        AttentionPlan(seq_len=20, layout=torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size=4)
    plan = AttentionPlan(seq_len=20, layout=torch.ones(1, 3, 5, 5, dtype=torch.bool), block_size=4)
    with pytest.raises(ShapeError, match="broadcast"):
        kernels.run(q, k, v, plan)
    empty = torch.eye(5, dtype=torch.bool)[None, None].clone()
    empty[..., 2, 2] = False
    with pytest.raises(ShapeError, match="attends no key block"):
        AttentionPlan(seq_len=20, layout=empty, block_size=4).check_rows()
    with pytest.raises(ShapeError, match="self-attention"):
        kernels.run(q, k[:, :10], v[:, :10], AttentionPlan.full(20, 4))


def test_a_replaced_plan_does_not_inherit_the_kernels_cache():
    """dataclasses.replace once copied `cache`, so gather ran the old layout's block groups for the new plan."""
    import dataclasses

    from sparse_dit.plan import AttentionPlan

    q = torch.randn(1, 128, 1, 16)
    full = AttentionPlan.full(128, 32)
    kernels.run(q, q, q, full, backend="gather")
    assert full.cache
    diagonal = dataclasses.replace(full, layout=torch.eye(4, dtype=torch.bool)[None, None])
    assert diagonal.cache == {}
    expected = kernels.run(q, q, q, diagonal, backend="reference")
    torch.testing.assert_close(kernels.run(q, q, q, diagonal, backend="gather"), expected)


def test_check_rows_with_one_layout_for_every_head_and_per_head_modes():
    """The regression: a layout shared by all heads (H' = 1) with per-head modes (H' = H) crashed on an in-place
    broadcast instead of checking the sparse heads only."""
    layout = torch.eye(5, dtype=torch.bool)[None, None].clone()
    layout[..., 2, 2] = False  # query block 2 keeps nothing
    modes = torch.tensor([[HEAD_DENSE, HEAD_SKIP, HEAD_DENSE]], dtype=torch.int8)
    AttentionPlan(seq_len=20, layout=layout, block_size=4, head_mode=modes).check_rows()  # no sparse head: fine
    with pytest.raises(ShapeError, match="attends no key block"):
        AttentionPlan(seq_len=20, layout=layout, block_size=4, head_mode=modes.clone().fill_(HEAD_SPARSE)).check_rows()
    # Per-head variable boundaries over the shared layout: an empty row of a zero-length block is allowed.
    bounds = torch.tensor([[[0, 4, 8, 8, 12, 20], [0, 4, 8, 12, 16, 20]]])
    plan = AttentionPlan(seq_len=20, layout=layout, q_bounds=bounds, k_bounds=bounds)
    with pytest.raises(ShapeError, match="attends no key block"):  # head 1's block 2 holds tokens
        plan.check_rows()
    AttentionPlan(seq_len=20, layout=layout, q_bounds=bounds[:, :1], k_bounds=bounds[:, :1]).check_rows()


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_reference_rows_that_attend_nothing_give_zero_and_minus_infinity(quant):
    """With or without the LSE: output 0 and LSE -inf, never NaN (the model mask empties the rows here)."""
    q, k, v = qkv(2, 20, 2)
    plan = AttentionPlan(seq_len=20, layout=torch.ones(1, 1, 5, 5, dtype=torch.bool), block_size=4, quant=quant)
    mask = torch.ones(2, 2, 20, 20, dtype=torch.bool)
    mask[1, 0, 3:7] = False  # queries 3..6 of row 1, head 0 attend nothing
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    for attn_mask in (mask, additive):
        plain = kernels.run(q, k, v, plan, backend="reference", attn_mask=attn_mask)
        out, lse = kernels.run(q, k, v, plan, backend="reference", attn_mask=attn_mask, return_lse=True)
        for result in (plain, out):
            assert torch.isfinite(result).all() and result[1, 3:7, 0].abs().max() == 0
        assert torch.isneginf(lse[1, 0, 3:7]).all() and torch.isfinite(lse[0]).all() and torch.isfinite(lse[1, 1]).all()
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
