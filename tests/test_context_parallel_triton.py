"""Ring attention's key shards through the Triton kernels (what a GPU runs), under the CPU interpreter: each shard
is a variable-block plan with zero-length and padding blocks, and must return the exact LSE."""

import triton_interpreter  # noqa: F401  (first: sets TRITON_INTERPRET before anything imports triton)

import pytest
import torch

pytest.importorskip("triton")

from sparse_dit.kernels.lse import merge, shard_attention  # noqa: E402
from sparse_dit.kernels.reference import reference_attention  # noqa: E402
from test_context_parallel import _plan, _qkv, _shards  # noqa: E402

triton_interpreter.interpreted_kernels()


@pytest.mark.parametrize("kind", ["fixed", "order", "head_mode", "variable"])
def test_triton_key_shards_merge_to_the_plan(kind):
    seq_len, parts = 45, 2  # 23 + 22 tokens in blocks of 16: blocks cut at the shard edge
    plan = _plan(seq_len, 16, 2, seed=seq_len, order=kind == "order", head_mode=kind == "head_mode",
                 variable=kind == "variable", batch=2)
    q, k, v = _qkv(2, seq_len, 2, dim=16)
    expected, expected_lse = reference_attention(q, k, v, plan, return_lse=True)
    for q_start, q_len in _shards(seq_len, parts):
        found = [shard_attention(plan, q[:, q_start : q_start + q_len], k[:, lo : lo + n], v[:, lo : lo + n], q_start,
                                 lo, backend="triton") for lo, n in _shards(seq_len, parts)]
        out, lse = merge([f for f in found if f is not None])
        torch.testing.assert_close(out, expected[:, q_start : q_start + q_len], atol=2e-6, rtol=0)
        kept = torch.isfinite(expected_lse[..., q_start : q_start + q_len])
        torch.testing.assert_close(lse[kept], expected_lse[..., q_start : q_start + q_len][kept], atol=2e-6, rtol=0)
