"""The CPU paths (gathered SDPA, compiled FlexAttention) against the reference, and the kernel benchmark."""

import json

import pytest
import torch
import torch.nn.functional as F

from sparse_dit import ConfigError, kernels
from sparse_dit.kernels import gather
from sparse_dit.cli import main
from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan

from conftest import TOL

B, S, H, D, BLOCK = 2, 300, 3, 64, 64  # S is not a multiple of the block: a ragged last block
N = -(-S // BLOCK)


def inputs(dtype):
    return [torch.randn(B, S, H, D).to(dtype) for _ in range(3)]


def per_head_plan(**fields):
    layout = torch.rand(B, H, N, N) < 0.4
    layout |= torch.eye(N, dtype=torch.bool)
    return AttentionPlan(seq_len=S, layout=layout, block_size=BLOCK, **fields)


@pytest.mark.parametrize("split_keys", [False, True], ids=["whole", "split-keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_matches_reference_with_order_and_head_modes(dtype, split_keys, monkeypatch):
    if split_keys:  # at most two key blocks per SDPA call: parts merged by their LSE, the ragged block masked
        monkeypatch.setattr(gather, "KV_BYTES", 2 * BLOCK * 2 * D * dtype.itemsize)
    q, k, v = inputs(dtype)
    order = torch.stack([torch.randperm(S) for _ in range(B * H)]).view(B, H, S)
    modes = torch.tensor([[HEAD_DENSE, HEAD_SPARSE, HEAD_SKIP], [HEAD_SPARSE, HEAD_SPARSE, HEAD_DENSE]], dtype=torch.int8)
    plan = per_head_plan(order=order, head_mode=modes)  # rows keep different numbers of blocks: several groups
    with torch.inference_mode():
        out = kernels.run(q, k, v, plan, backend="gather")
        expected = kernels.run(q.float(), k.float(), v.float(), plan, backend="reference")
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])
    full = AttentionPlan(seq_len=S, layout=torch.ones(1, 1, N, N, dtype=torch.bool), block_size=BLOCK)
    dense = F.scaled_dot_product_attention(*(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(kernels.run(q, k, v, full, backend="gather").float(), dense, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("heads", [1, H])
def test_gather_outputs_outlive_its_workspace(heads):
    """The gather path reuses its buffers between calls; what it returns must not be one of them."""
    layout = torch.rand(1, heads, N, N) < 0.5
    layout[..., 0, :] = False  # a query block that attends to nothing outputs zeros
    plan = AttentionPlan(seq_len=S, layout=layout, block_size=BLOCK)
    first, second = ([torch.randn(B, S, heads, D) for _ in range(3)] for _ in range(2))
    with torch.inference_mode():
        out = kernels.run(*first, plan, backend="gather")
        kept = out.clone()
        kernels.run(*second, plan, backend="gather")
    torch.testing.assert_close(out, kept, atol=0, rtol=0)
    torch.testing.assert_close(out, kernels.run(*first, plan, backend="reference"), atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_auto_picks_gather_on_cpu_from_512_tokens():
    q, k, v = (torch.randn(1, 640, 2, 16) for _ in range(3))
    plan = AttentionPlan(seq_len=640, layout=torch.eye(10, dtype=torch.bool)[None, None], block_size=64)
    with torch.inference_mode():
        kernels.run(q, k, v, plan)
    assert any(key[0] == "gather_groups" for key in plan.cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_matches_reference_with_order_and_head_modes(dtype):
    q, k, v = inputs(dtype)
    order = torch.stack([torch.randperm(S) for _ in range(B * H)]).view(B, H, S)
    modes = torch.tensor([[HEAD_DENSE, HEAD_SPARSE, HEAD_SKIP], [HEAD_SPARSE, HEAD_SPARSE, HEAD_DENSE]], dtype=torch.int8)
    plan = per_head_plan(order=order, head_mode=modes)
    with torch.inference_mode():
        out = kernels.run(q, k, v, plan, backend="flex")
        expected = kernels.run(q.float(), k.float(), v.float(), plan, backend="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])
    assert ("flex_block_mask", "cpu") in plan.cache  # built once, reused by the next call


def test_flex_full_plan_equals_dense():
    q, k, v = inputs(torch.float32)
    layout = torch.ones(B, H, N, N, dtype=torch.bool)  # same BlockMask shape as above: no recompile
    plan = AttentionPlan(seq_len=S, layout=layout, block_size=BLOCK)
    with torch.inference_mode():
        out = kernels.run(q, k, v, plan, backend="flex")
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_flex_refuses_what_it_cannot_run_exactly():
    q, k, v = inputs(torch.float32)
    plan = per_head_plan()
    with pytest.raises(ConfigError, match="reference"):
        kernels.run(q, k, v, plan, backend="flex", attn_mask=torch.ones(B, 1, 1, S, dtype=torch.bool))
    with pytest.raises(ConfigError, match="LSE"):
        kernels.run(q, k, v, plan, backend="flex", return_lse=True)
    with pytest.raises(ConfigError, match="reference"):
        kernels.run(q, k, v, plan, backend="gather", attn_mask=torch.ones(B, 1, 1, S, dtype=torch.bool))
    # gather and auto (the reference at this length) take the LSE that flex refuses.
    want, want_lse = kernels.run(q, k, v, plan, backend="reference", return_lse=True)
    for backend in ("gather", "auto"):
        out, lse = kernels.run(q, k, v, plan, backend=backend, return_lse=True)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)


def test_bench_kernels_writes_one_record_per_case(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "kernels", "--seq", "256,384", "--density", "0.3", "--block", "64",
                 "--backend", "reference", "--reps", "1", "--warmup", "0", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert len(records) == 2
    keys = {"seq", "head_dim", "heads", "density", "block", "backend", "dense_ms", "sparse_ms", "speedup"}
    assert all(keys <= set(r) for r in records)
    assert {r["seq"] for r in records} == {256, 384}
    assert all(r["speedup"] > 0 and 0 < r["actual_density"] < 0.5 for r in records)
    assert "speedup" in capsys.readouterr().out
