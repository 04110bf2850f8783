"""`sparse_attention` on plain tensors: the window geometry, the text rules and the policy knobs."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparse_dit import ShapeError, sparse_attention
from sparse_dit.patterns import PlanContext, WindowConfig, WindowPlanner
from sparse_dit.state import SiteState

from conftest import TOL


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def qkv(b, s, h=2, d=8, dtype=torch.float32):
    return [torch.randn(b, s, h, d).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_method_reproduces_sdpa(dtype):
    q, k, v = qkv(2, 3 * 5 * 7 + 11, dtype=dtype)  # S = 116, not a multiple of the block
    out = sparse_attention(q, k, v, method="dense", grid=(3, 5, 7), text_len=11, text_position="suffix", block_size=16, min_seq_len=0)
    torch.testing.assert_close(out.float(), sdpa(q.float(), k.float(), v.float()), atol=TOL[dtype], rtol=TOL[dtype])


def test_window_covering_everything_is_dense():
    q, k, v = qkv(1, 4 * 6 * 6)
    out = sparse_attention(q, k, v, method="window", grid=(4, 6, 6), window=-1, block_size=16, min_seq_len=0)
    torch.testing.assert_close(out, sdpa(q, k, v))


def _brute_force_layout(grid, window, block_size):
    """Block pair kept iff some token pair is inside the window (row-aligned blocks make the box test exact)."""
    f, h, w = grid
    coords = torch.tensor(list(itertools.product(range(f), range(h), range(w))))
    near = ((coords[:, None, :] - coords[None, :, :]).abs() <= torch.tensor(window) // 2).all(-1)
    n = len(coords) // block_size
    return near.view(n, block_size, n, block_size).any(3).any(1)


def test_window_layout_is_the_3d_neighbourhood():
    grid, window, bs = (4, 6, 8), (3, 3, 9), 8  # one block per grid row
    ctx = PlanContext(grid=grid)
    plan = WindowPlanner(WindowConfig(window=window, block_size=bs)).plan(None, None, ctx, SiteState())
    assert torch.equal(plan.layout[0, 0], _brute_force_layout(grid, window, bs))
    assert 0 < plan.density < 0.5


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_is_always_kept(position):
    grid, text_len, bs = (3, 4, 4), 10, 8
    s = 48 + text_len
    q, k, v = qkv(2, s)
    out = sparse_attention(q, k, v, method="window", grid=grid, text_len=text_len, text_position=position,
                           window=1, block_size=bs, min_seq_len=0)
    text = slice(0, text_len) if position == "prefix" else slice(48, s)
    # Text queries attend every key: their outputs are dense attention's.
    torch.testing.assert_close(out[:, text], sdpa(q, k, v)[:, text])
    plan = WindowPlanner(WindowConfig(window=1, block_size=bs)).plan(
        q, k, PlanContext(grid=grid, text_len=text_len, text_position=position), SiteState())
    idx = torch.arange(s) // bs
    mask = plan.layout[0, 0][idx][:, idx]
    assert mask[:, text].all() and mask[text, :].all()
    assert mask.diagonal().all()
    assert plan.density < 1.0


def test_policy_knobs_keep_calls_dense():
    q, k, v = qkv(1, 64)
    dense = sdpa(q, k, v)
    sparse = dict(method="window", grid=(1, 8, 8), window=1, block_size=8)
    assert not torch.allclose(sparse_attention(q, k, v, min_seq_len=0, **sparse), dense)
    torch.testing.assert_close(sparse_attention(q, k, v, min_seq_len=65, **sparse), dense)
    torch.testing.assert_close(sparse_attention(q, k, v, min_seq_len=0, layer=2, dense_layers=(2,), **sparse), dense)
    torch.testing.assert_close(sparse_attention(q, k, v, min_seq_len=0, step=1, num_steps=10, dense_steps=0.2, **sparse), dense)
    assert not torch.allclose(sparse_attention(q, k, v, min_seq_len=0, step=2, num_steps=10, dense_steps=0.2, **sparse), dense)


def test_shapes_that_do_not_fit_raise():
    q, k, v = qkv(1, 50)
    with pytest.raises(ShapeError, match="S = 50"):
        sparse_attention(q, k, v, method="window", grid=(2, 5, 5), text_len=2)
    with pytest.raises(ShapeError, match="text_position"):
        PlanContext(grid=(1, 2, 2), text_len=3, text_position="none")
    with pytest.raises(ShapeError, match="grid"):
        PlanContext(grid=(0, 2, 2))


def test_random_control_follows_a_density_pattern():
    from sparse_dit import PatternFile
    from sparse_dit.patterns import RandomConfig, RandomPlanner

    pattern = PatternFile("random", tensors={"l1/density": torch.tensor([[0.125, 0.5]])}, step_buckets=(2,))
    planner = RandomPlanner(RandomConfig(block_size=16), pattern)
    ctx = PlanContext(grid=(4, 16, 16), heads=2, step=2, layer=1, site="l1")
    plan = planner.plan(None, None, ctx, SiteState())
    assert plan.head_densities()[0].tolist() == pytest.approx([0.125, 0.5])
    assert torch.equal(plan.layout, planner.plan(None, None, ctx, SiteState()).layout)  # reproducible
    other = planner.plan(None, None, PlanContext(grid=(4, 16, 16), heads=2, step=1, layer=1, site="l1"), SiteState())
    assert other.head_densities()[0].tolist() == pytest.approx([0.2, 0.2], abs=0.01)  # before its buckets: `density`
    q, k, v = qkv(1, 1024)
    out = sparse_attention(q, k, v, method="random", grid=(4, 16, 16), density=0.25, block_size=64, min_seq_len=0,
                           backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
