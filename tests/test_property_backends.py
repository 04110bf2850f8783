"""Random draws against the capability table: every backend either matches the reference or raises ConfigError.

The random-draw complement of tests/test_backend_contract.py (one hand-made case per plan field): Hypothesis
draws shapes (S not a multiple of the block, B in 1..2, grouped-query heads, D in {32, 64, 80, 128}, a v head
dim of its own), plans (fixed or variable blocks, token orders, dense and skipped heads, int8 Q·K, text prefix
or suffix by the keep-text rule or a direct layout, fields shared across batch rows and heads or not) and
dtypes. For each draw, each backend that `capabilities.honours` per the table must agree with the reference
run on the same inputs upcast to float64, and each other backend must raise `ConfigError`.

Tolerances, absolute and relative, against that reference (`TOLERANCE`): float32 2e-5 (accumulation order
only), float16 3e-3 and bfloat16 2e-2 (about three times the format's spacing near 1, 1e-3 and 8e-3: softmax
and P·V rounded in the input dtype); int8 Q·K in half precision 1e-2 at least, since flex feeds the dequantised
Q and K to a half-precision product where the reference multiplies them in float32. The LSE: the same, at least
1e-4 (the reference takes it in float32).

Triton runs under TRITON_INTERPRET=1 (`triton_interpreter`), so its draws are tiny. FlexAttention compiles
per shape and dtype (seconds each), so its own tests keep one shape, float32 and bfloat16, and draw
everything else.
"""

import triton_interpreter  # noqa: I001  (first: sets TRITON_INTERPRET before anything imports triton)

import dataclasses
from typing import Literal

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sparse_dit import ConfigError, kernels
from sparse_dit.kernels.capabilities import Call, honours, select_backend
from sparse_dit.patterns.base import keep_text_and_diagonal
from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan, PlanContext

if triton_interpreter.HAS_TRITON:
    triton_interpreter.interpreted_kernels()

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
QUANT_HALF_TOLERANCE = 1e-2
# Every compile costs seconds, so flex draws float32 and the half precision video DiTs run in; float16 is drawn
# for every other backend.
FLEX_DTYPES = (torch.float32, torch.bfloat16)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def rarely(draw) -> bool:
    """True one draw in four: for the fields most backends refuse, so that most draws also run the fast paths."""
    return draw(st.integers(0, 3)) == 3  # not 0: Hypothesis leans towards the simplest value


@dataclasses.dataclass
class Draw:
    """One call: q (B, S, H, D), k (B, S, Hkv, D), v (B, S, Hkv, Dv), a plan and whether the LSE is asked for."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    plan: AttentionPlan
    return_lse: bool

    def __repr__(self) -> str:  # Hypothesis prints the falsifying draw: shapes and the plan's fields, not values
        p = self.plan
        fields = {"block_size": p.block_size, "variable": p.q_bounds is not None, "order": p.order is not None,
                  "head_mode": None if p.head_mode is None else p.head_mode.tolist(), "quant": p.quant,
                  "layout": tuple(p.layout.shape), "density": round(p.density, 3)}
        return (f"Draw(q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, v={tuple(self.v.shape)}, {self.q.dtype}, "
                f"return_lse={self.return_lse}, plan={fields})")

    def call(self) -> Call:
        return Call.of(self.plan, self.q, None, self.return_lse, v_head_dim=self.v.shape[-1])


def text_tokens(draw, s: int) -> torch.Tensor:
    """bool (S,): True at text tokens, a prefix, a suffix or none, as joint-attention models place them."""
    position = draw(st.sampled_from(["none", "prefix", "suffix"]))
    mask = torch.zeros(s, dtype=torch.bool)
    if position != "none" and s > 1:
        n = draw(st.integers(1, max(1, s // 3)))
        mask[:n] = position == "prefix"
        mask[s - n :] = position == "suffix"
    return mask


def variable_bounds(draw, gen: torch.Generator, lead: tuple[int, int], n: int, s: int) -> torch.Tensor:
    """long (B', H', n + 1) boundaries from 0 to S; blocks after the first may be empty (SVG2's padding clusters)."""
    cuts = torch.randint(1, s + 1, (*lead, n - 1), generator=gen).sort(dim=-1).values
    return torch.cat([torch.zeros(*lead, 1, dtype=torch.long), cuts, torch.full((*lead, 1), s)], dim=-1)


def keep_text_directly(layout: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor, text: torch.Tensor,
                       order: torch.Tensor | None) -> torch.Tensor:
    """Text queries' blocks keep every key block and every block keeps the text keys' blocks, read in the plan's
    token order. layout bool (B', H', nq, nk); q_index, k_index long (B', H', S) block of each permuted position."""
    lead = layout.shape[:2]
    s = text.numel()
    permuted = text.expand(*lead, s) if order is None else text[order]  # (B', H', S) text at each permuted position
    q_text = torch.zeros(*lead, layout.shape[2], dtype=torch.bool).scatter_reduce(2, q_index.expand(*lead, s), permuted, "amax")
    k_text = torch.zeros(*lead, layout.shape[3], dtype=torch.bool).scatter_reduce(2, k_index.expand(*lead, s), permuted, "amax")
    return layout | q_text[..., :, None] | k_text[..., None, :]


@st.composite
def plans(draw, b: int, h: int, s: int, blocks: list[int], shared: bool = True) -> AttentionPlan:
    """A random plan over S tokens whose fields broadcast to (B, H): shared across batch rows or heads where
    `shared` draws so, else per row and head."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lead = (draw(st.sampled_from(sorted({1, b}))), draw(st.sampled_from(sorted({1, h})))) if shared else (b, h)
    block = draw(st.sampled_from(blocks))
    variable = rarely(draw)
    n = -(-s // block)
    layout = torch.rand(*lead, n, n, generator=gen) < draw(st.sampled_from([0.1, 0.3, 0.6]))
    order = torch.stack([torch.randperm(s, generator=gen) for _ in range(lead[0] * lead[1])]).view(*lead, s) if draw(st.booleans()) else None
    head_mode = None
    if draw(st.booleans()):
        head_mode = torch.tensor([HEAD_DENSE, HEAD_SPARSE, HEAD_SKIP], dtype=torch.int8)[torch.randint(3, lead, generator=gen)]
    quant = "int8" if rarely(draw) else "none"
    text = text_tokens(draw, s)
    if variable:
        layout[..., 0] = True  # key cluster 0 is never empty, so no query cluster ends up with no keys
        plan = AttentionPlan(seq_len=s, layout=layout, block_size=block, q_bounds=variable_bounds(draw, gen, lead, n, s),
                             k_bounds=variable_bounds(draw, gen, lead, n, s), order=order, head_mode=head_mode, quant=quant)
        layout = keep_text_directly(layout, plan.token_block_index("q"), plan.token_block_index("k"), text, order)
    else:
        video = int((~text).sum())
        position = "none" if not text.any() else "prefix" if text[0] else "suffix"
        ctx = PlanContext(grid=(1, 1, video), text_len=s - video, text_position=position)
        layout = keep_text_and_diagonal(layout, ctx, block)
    plan = AttentionPlan(seq_len=s, layout=layout, block_size=block, order=order, head_mode=head_mode, quant=quant,
                         q_bounds=plan.q_bounds if variable else None, k_bounds=plan.k_bounds if variable else None)
    plan.check_rows()  # what every planner's plan passes (`SparseAttention._checked`)
    return plan


@st.composite
def draws(draw, max_blocks: int, blocks: list[int], head_dims: list[int], shape: tuple[int, int, int] | None = None,
          wide_values: Literal["never", "sometimes", "always"] = "sometimes", dtypes: tuple[torch.dtype, ...] = DTYPES) -> Draw:
    """A call with random shapes, dtype, plan and LSE request, and as `wide_values` says a v head dim of its own. With `shape`: B, S, H fixed and plans per row and head (FlexAttention compiles anew for every shape
    of the inputs and of the plan's block mask)."""
    if shape is None:
        kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        b, h = draw(st.integers(1, 2)), kv_heads * group
        block = max(blocks)
        s = draw(st.integers(1, max_blocks)) * block - draw(st.integers(1, block - 1))  # never a whole number of blocks
    else:
        b, s, h = shape
        kv_heads = draw(st.sampled_from([k for k in (1, 2) if h % k == 0]))
    d = draw(st.sampled_from(head_dims))
    dv = d + 16 if wide_values == "always" or (wide_values == "sometimes" and rarely(draw)) else d
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(b, s, h, d, generator=gen).to(dtype)
    k = torch.randn(b, s, kv_heads, d, generator=gen).to(dtype)
    v = torch.randn(b, s, kv_heads, dv, generator=gen).to(dtype)
    return Draw(q, k, v, draw(plans(b, h, s, blocks, shared=shape is None)), rarely(draw))


def tolerance(d: Draw) -> float:
    tol = TOLERANCE[d.q.dtype]
    return max(tol, QUANT_HALF_TOLERANCE) if d.plan.quant != "none" and d.q.dtype != torch.float32 else tol


def expected(d: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference on the inputs upcast to float64: (B, S, H, Dv) output and float32 (B, H, S) LSE (the
    reference takes the LSE, and low-bit Q·K, in float32)."""
    q, k, v = (x.double() for x in (d.q, d.k, d.v))
    out = kernels.run(q, k, v, d.plan, backend="reference")
    _, lse = kernels.run(q, k, v, d.plan, backend="reference", return_lse=True)
    return out, lse


def check(d: Draw, backend: str) -> None:
    """`backend` matches the float64 reference if the table says it honours the draw, else raises ConfigError."""
    plan = dataclasses.replace(d.plan)  # a fresh cache: nothing derived for another backend is reused
    event(f"{backend} {'runs' if honours(backend, d.call()) else 'refuses'}")  # --hypothesis-show-statistics
    if not honours(backend, d.call()):
        with pytest.raises(ConfigError, match=f"backend '{backend}' cannot honour"):
            kernels.run(d.q, d.k, d.v, plan, backend=backend, return_lse=d.return_lse)
        return
    result = kernels.run(d.q, d.k, d.v, plan, backend=backend, return_lse=d.return_lse)
    out, lse = result if d.return_lse else (result, None)
    want_out, want_lse = expected(d)
    tol = tolerance(d)
    assert out.dtype == d.q.dtype and out.shape == want_out.shape
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol, msg=lambda m: f"{backend}: {m}")
    if lse is not None:  # float32 whatever the input: skipped heads' -inf compare equal
        torch.testing.assert_close(lse.double(), want_lse.double(), atol=max(tol, 1e-4), rtol=max(tol, 1e-4))


@settings(max_examples=60, **SETTINGS)
@given(d=draws(max_blocks=4, blocks=[16, 32, 48], head_dims=[32, 64, 80, 128]))
def test_cpu_backends_agree_with_the_reference_or_refuse(d):
    """Reference, gather and auto on random shapes; flex and triton refusals only (their runs: the tests below)."""
    for backend in ("reference", "gather"):
        check(d, backend)
    for backend in ("flex", "triton"):
        if not honours(backend, d.call()):
            check(d, backend)
    chosen = select_backend(d.plan, d.q, None, d.return_lse, v_head_dim=d.v.shape[-1])
    assert honours(chosen, d.call()), f"auto chose {chosen!r}, which does not honour the draw"


@pytest.mark.skipif(not triton_interpreter.HAS_TRITON, reason="triton is not installed (its refusals are checked above)")
@settings(max_examples=20, **SETTINGS)
@given(d=draws(max_blocks=2, blocks=[16, 32], head_dims=[32, 64, 128, 80]))
def test_triton_under_the_interpreter_agrees_or_refuses(d):
    """Tiny draws: the interpreter runs every program instance in Python."""
    check(d, "triton")


@settings(max_examples=10, **SETTINGS)
@given(d=draws(max_blocks=3, blocks=[32], head_dims=[32], shape=(2, 75, 2), wide_values="never", dtypes=FLEX_DTYPES))
def test_flex_agrees_or_refuses(d):
    """One (B, S, H, D) and block size, so compiled FlexAttention compiles once per dtype (several seconds each);
    plans, GQA, dtypes and the LSE request are drawn. Its v head dim of its own: `test_flex_takes_wide_values`."""
    check(d, "flex")


@settings(max_examples=2, **SETTINGS)
@given(d=draws(max_blocks=3, blocks=[32], head_dims=[32], shape=(2, 75, 2), wide_values="always", dtypes=(torch.float32,)))
def test_flex_takes_wide_values(d):
    """v's head dim of its own (48 against 32), which the table says flex honours: one more compile."""
    check(d, "flex")


# Gradients sum over every query of a key: looser than the outputs by about the square root of the keys kept.
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


@settings(max_examples=30, **SETTINGS)
@given(d=draws(max_blocks=4, blocks=[16, 32, 48], head_dims=[32, 64], wide_values="never"))
def test_gather_gradients_agree_with_the_reference_or_refuse(d):
    """The autograd path of gather (training onto a static pattern): dq, dk and dv against the float64 reference's
    under the same random output gradient; variable blocks and low-bit Q·K must be refused."""
    plan = dataclasses.replace(d.plan)
    q, k, v = (x.detach().clone().requires_grad_() for x in (d.q, d.k, d.v))
    if not honours("gather", Call.of(plan, q, None, False, grad=True)):
        with pytest.raises(ConfigError, match="backend 'gather' cannot honour"):
            kernels.run(q, k, v, plan, backend="gather")
        return
    out = kernels.run(q, k, v, plan, backend="gather")
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(out, (q, k, v), cotangent.to(out.dtype))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (d.q, d.k, d.v))
    want = torch.autograd.grad(kernels.run(q64, k64, v64, d.plan, backend="reference"), (q64, k64, v64), cotangent.double())
    tol = GRAD_TOLERANCE[d.q.dtype]
    for name, got, expected_grad in zip("qkv", grads, want):
        assert got.dtype == d.q.dtype
        torch.testing.assert_close(got.double(), expected_grad, atol=tol, rtol=tol, msg=lambda m: f"d{name}: {m}")
