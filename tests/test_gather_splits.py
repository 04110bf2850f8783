"""The gather path's L2-sized key splits: no split may come out empty, whatever the block size.

The regression: once one block's K and V exceeded `gather.KV_BYTES` (block 2048 at head dim 128 fp32), a query
block keeping fewer blocks than there were splits got an empty split, and the CPU flash kernel divided by its
zero key length: SIGFPE, the process gone without a traceback. Every case runs in a child process, so that a
crash fails the test instead of killing pytest.
"""

import os
import subprocess
import sys
import textwrap

# Each case prints the largest difference from the reference; the child exits 0 only if all ran.
SCRIPT = textwrap.dedent(
    """
    import dataclasses
    import torch
    import sparse_dit
    from sparse_dit import kernels
    from sparse_dit.attention import make_context
    from sparse_dit.kernels import gather
    from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan

    torch.manual_seed(0)

    def compare(name, q, k, v, plan):
        out = kernels.run(q, k, v, plan, backend="gather")
        ref = kernels.run(q, k, v, plan, backend="reference")
        print(name, float((out.float() - ref.float()).abs().max()), flush=True)

    # 1. The reported case through the public API: block 2048, head dim 128, fp32, one or two kept blocks
    #    per query block; S ragged so the last block is short.
    s = 2 * 2048 + 100
    q, k, v = (torch.randn(1, s, 2, 128) for _ in range(3))
    attention = sparse_dit.SparseAttention("window", block_size=2048, min_seq_len=0, backend="gather")
    out = attention(q, k, v)
    plan = attention.plan(q, k, make_context(q, None))
    ref = kernels.run(q, k, v, plan, backend="reference")
    print("functional-2048", float((out - ref).abs().max()), flush=True)

    # 2. Many more splits than kept blocks at a small size: a 4 KiB budget splits every block's keys.
    gather.KV_BYTES = 4096
    s, bs = 333, 32
    n = -(-s // bs)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, s, 2, 64, dtype=dtype) for _ in range(3))
        layout = (torch.rand(2, 2, n, n) < 0.3) | torch.eye(n, dtype=torch.bool)
        plan = AttentionPlan(seq_len=s, layout=layout, block_size=bs)
        compare(f"splits-{dtype}", q, k, v, plan)
        order = torch.stack([torch.randperm(s) for _ in range(4)]).view(2, 2, s)
        modes = torch.tensor([[HEAD_DENSE, HEAD_SKIP], [HEAD_SPARSE, HEAD_DENSE]], dtype=torch.int8)
        # A fresh cache: dataclasses.replace would carry over the groups gather derived from the plain plan.
        compare(f"splits-order-heads-{dtype}", q, k, v, dataclasses.replace(plan, order=order, head_mode=modes))
    """
)


def run_child(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)


def test_gather_with_more_key_splits_than_kept_blocks_matches_the_reference():
    child = run_child(SCRIPT)
    # A negative return code is the signal that killed the child (-8: SIGFPE).
    assert child.returncode == 0, f"child exited {child.returncode}:\n{child.stdout}\n{child.stderr[-3000:]}"
    results = dict(line.split() for line in child.stdout.splitlines())
    assert set(results) == {"functional-2048", "splits-torch.float32", "splits-order-heads-torch.float32",
                            "splits-torch.bfloat16", "splits-order-heads-torch.bfloat16"}
    for name, error in results.items():
        # fp32: accumulation order only; bf16: the gather path merges splits in fp32, the reference runs bf16 SDPA.
        assert float(error) < (2e-2 if "bfloat16" in name else 1e-5), (name, error)
