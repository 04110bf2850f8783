"""One check of q, k, v on every path (`kernels.check_inputs`): dense or sparse, functional or stateful, any backend.

The regression: below `min_seq_len` (the dense path) the functional core ran SDPA on q and k of different
lengths or batches, which the sparse path rejected; a v head dim other than q's ran on `reference` and died
with a raw RuntimeError inside `gather`.
"""

import pytest
import torch
import torch.nn.functional as F

import sparse_dit
from sparse_dit import ConfigError, ShapeError, kernels
from sparse_dit.attention import make_context
from sparse_dit.kernels.capabilities import select_backend
from sparse_dit.plan import AttentionPlan

B, S, H, HKV, D, BLOCK = 2, 96, 4, 2, 32, 32
# Below min_seq_len every call is dense; at 0 every call is planned.
PATHS = {"dense": 10**6, "sparse": 0}


def good() -> dict[str, torch.Tensor]:
    """Valid inputs: grouped-query attention, H = 2 * HKV."""
    return {"q": torch.randn(B, S, H, D), "k": torch.randn(B, S, HKV, D), "v": torch.randn(B, S, HKV, D)}


def bad(case: str) -> dict[str, torch.Tensor]:
    """One invalid call per kind; q is always valid, so the functional core's grid fits."""
    x = good()
    if case == "sequence":
        x["k"], x["v"] = x["k"][:, :-5], x["v"][:, :-5]
    elif case == "batch":
        x["k"], x["v"] = x["k"][:1], x["v"][:1]
    elif case == "dims":
        x["k"] = x["k"][0]
    elif case == "gqa":
        x["k"], x["v"] = torch.randn(B, S, 3, D), torch.randn(B, S, 3, D)
    elif case == "kv_heads":
        x["v"] = x["v"][:, :, :1]
    elif case == "qk_head_dim":
        x["k"] = x["k"][..., :16]
    elif case == "dtype":
        x["v"] = x["v"].half()
    elif case == "empty":
        x["k"], x["v"] = x["k"][..., :0], x["v"][..., :0]
        x["q"] = x["q"][..., :0]
    return x


# What each message must name.
MESSAGES = {
    "sequence": "one sequence length S", "batch": "one batch size B", "dims": "4-D", "gqa": "multiple of key/value heads",
    "kv_heads": "same number of heads", "qk_head_dim": "one head dim D", "dtype": "one dtype", "empty": "no empty dimension",
}


def call(entry: str, x: dict[str, torch.Tensor], min_seq_len: int, **options) -> torch.Tensor:
    """One call through the functional core or a `SparseAttention`."""
    config = dict(method="window", block_size=BLOCK, min_seq_len=min_seq_len, **options)
    if entry == "functional":
        return sparse_dit.sparse_attention(x["q"], x["k"], x["v"], **config)
    return sparse_dit.SparseAttention(config.pop("method"), **config)(x["q"], x["k"], x["v"])


@pytest.mark.parametrize("case", list(MESSAGES))
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("entry", ["functional", "object"])
def test_invalid_inputs_raise_the_same_shape_error_on_every_path(entry, path, case):
    with pytest.raises(ShapeError, match=MESSAGES[case]):
        call(entry, bad(case), PATHS[path])


@pytest.mark.parametrize("case", list(MESSAGES))
@pytest.mark.parametrize("backend", ["reference", "gather", "auto"])
def test_kernels_run_checks_the_same(case, backend):
    x = bad(case)
    with pytest.raises(ShapeError, match=MESSAGES[case]):
        kernels.run(x["q"], x["k"], x["v"], AttentionPlan.full(S, BLOCK), backend=backend)


def wide_values() -> dict[str, torch.Tensor]:
    """Valid inputs whose values have their own head dim, 48 against q's and k's 32."""
    x = good()
    x["v"] = torch.randn(B, S, HKV, 48)
    return x


@pytest.mark.parametrize("entry", ["functional", "object"])
def test_a_v_head_dim_of_its_own_on_the_dense_path_is_sdpa(entry):
    x = wide_values()
    out = call(entry, x, PATHS["dense"])
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in x.values()), enable_gqa=True).transpose(1, 2)
    assert out.shape == (B, S, H, 48)
    torch.testing.assert_close(out, expected)


def test_a_v_head_dim_of_its_own_on_the_sparse_path_is_the_reference():
    x = wide_values()
    attention = sparse_dit.SparseAttention("window", block_size=BLOCK, min_seq_len=0)
    out = attention(x["q"], x["k"], x["v"])
    plan = attention.plan(x["q"], x["k"], make_context(x["q"], None))
    assert plan.density < 1  # a real sparse plan, not dense attention by another name
    assert out.shape == (B, S, H, 48)
    torch.testing.assert_close(out, kernels.run(x["q"], x["k"], x["v"], plan, backend="reference"))
    functional = sparse_dit.sparse_attention(x["q"], x["k"], x["v"], method="window", block_size=BLOCK, min_seq_len=0)
    torch.testing.assert_close(functional, out)


@pytest.mark.parametrize("entry", ["functional", "object"])
def test_gather_refuses_a_v_head_dim_of_its_own_with_a_config_error(entry):
    with pytest.raises(ConfigError, match=r"a v head dim \(48\) other than q's and k's \(32\); backends that can: reference"):
        call(entry, wide_values(), PATHS["sparse"], backend="gather")


def test_auto_sends_a_v_head_dim_of_its_own_past_gather_and_honours_the_order():
    """From AUTO_MIN_SEQ tokens auto picks gather on CPU, unless v's head dim differs; a token order permutes v's
    every column (the order once gathered v with q's head dim, dropping the rest)."""
    s = 640
    q, k, v = torch.randn(1, s, 2, 32), torch.randn(1, s, 2, 32), torch.randn(1, s, 2, 48)
    n = s // 64
    plan = AttentionPlan(seq_len=s, layout=(torch.rand(1, 2, n, n) < 0.3) | torch.eye(n, dtype=torch.bool),
                         order=torch.stack([torch.randperm(s), torch.randperm(s)])[None])
    assert select_backend(plan, q) == "gather"
    assert select_backend(plan, q, v_head_dim=48) == "reference"
    out = kernels.run(q, k, v, plan)
    # Each of v's columns alone, as its own 32-wide problem: the same attention weights, so the same columns.
    for lo in (0, 16):
        torch.testing.assert_close(out[..., lo : lo + 32], kernels.run(q, k, v[..., lo : lo + 32].contiguous(), plan, backend="gather"))
