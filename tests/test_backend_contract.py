"""The kernel capability contract: for every backend and every plan field or call option, `kernels.run` either
computes what the reference computes or raises ConfigError naming what it cannot honour. No backend silently
ignores a field, and "auto" only picks a backend whose row of `capabilities.TABLE` covers the call.

Triton runs on CPU under TRITON_INTERPRET=1 (`triton_interpreter`); without triton installed its cases must
raise. Inputs are small (S=200 in blocks of 64: a ragged last block) so the interpreter and the one FlexAttention
compile stay quick.
"""

import triton_interpreter  # noqa: I001  (first: sets TRITON_INTERPRET before anything imports triton)

import dataclasses

import pytest
import torch

from sparse_dit import ConfigError, kernels
from sparse_dit.kernels import capabilities
from sparse_dit.kernels.capabilities import TABLE, Call, choose_backend, honours, select_backend
from sparse_dit.kernels.quant import QUANT_LEVELS, fake_quant, quantize_blocks
from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan

from conftest import TOL

if triton_interpreter.HAS_TRITON:
    triton_interpreter.interpreted_kernels()

B, S, H, D, BLOCK = 2, 200, 2, 32, 64
N = -(-S // BLOCK)
ATOL = 1e-4  # fp32 against the fp32 reference: accumulation order only (the interpreter's tl.dot included)
BACKENDS = ("reference", "gather", "flex", "triton", "auto")
FIELDS = ("fixed", "variable", "order", "head_mode", "int8", "int4", "mask", "lse", "grad")

# What each backend runs on CPU; every other (backend, field) must raise. Written out so that a change to the
# table is a deliberate change here too.
RUNS_ON_CPU = {
    "reference": set(FIELDS),
    "gather": {"fixed", "variable", "order", "head_mode", "lse", "grad"},
    "flex": {"fixed", "order", "head_mode", "int8", "int4"},
    "triton": {"fixed", "variable", "order", "head_mode", "int8", "int4", "lse"} if triton_interpreter.HAS_TRITON else set(),
    "auto": set(FIELDS),
}
# What a refusal must name.
NAMED = {"variable": "plan.q_bounds", "int8": "plan.quant='int8'", "int4": "plan.quant='int4'", "mask": "attn_mask",
         "lse": "return_lse", "grad": "gradient", "fixed": "device", "order": "device", "head_mode": "device"}


def named(backend: str, field: str) -> str:
    """What refusing `field` must name (without triton installed, Triton refuses the device first)."""
    return "device" if backend == "triton" and not triton_interpreter.HAS_TRITON else NAMED[field]


def bounds(gen: torch.Generator) -> torch.Tensor:
    """(B, H, N + 1) cluster boundaries whose first cluster has at least 20 tokens (key cluster 0 is never empty)."""
    cuts = torch.randint(20, S, (B, H, N - 1), generator=gen).sort(dim=-1).values
    return torch.cat([torch.zeros(B, H, 1, dtype=torch.long), cuts, torch.full((B, H, 1), S)], dim=-1)


def case(field: str) -> tuple[AttentionPlan, torch.Tensor | None, bool, bool]:
    """(plan, attn_mask, return_lse, grad) exercising one field; every plan's layout is (B, H, N, N)."""
    gen = torch.Generator().manual_seed(1)
    layout = (torch.rand(B, H, N, N, generator=gen) < 0.4) | torch.eye(N, dtype=torch.bool)
    mask, lse, grad = None, False, False
    if field == "variable":
        layout[..., 0] = True  # every query row keeps key cluster 0, which is not empty
    plan = AttentionPlan(seq_len=S, layout=layout, block_size=BLOCK)
    if field == "variable":
        plan = dataclasses.replace(plan, q_bounds=bounds(gen), k_bounds=bounds(gen))
    elif field == "order":
        plan = dataclasses.replace(plan, order=torch.stack([torch.randperm(S, generator=gen) for _ in range(B * H)]).view(B, H, S))
    elif field == "head_mode":  # dense, skipped and sparse heads
        plan = dataclasses.replace(plan, head_mode=torch.tensor([[HEAD_DENSE, HEAD_SKIP], [HEAD_SPARSE, HEAD_DENSE]], dtype=torch.int8))
    elif field in ("int8", "int4"):
        plan = dataclasses.replace(plan, quant=field)
    elif field == "mask":  # padded keys of the second sample, inside blocks: every kept block keeps some keys
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[1, ..., 70:110] = False
    elif field == "lse":
        lse = True
    elif field == "grad":
        grad = True
    return plan, mask, lse, grad


def inputs(grad: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(B, S, H, D, generator=gen).requires_grad_(grad) for _ in range(3)]


def reference(q, k, v, plan, mask, lse):
    """The reference's output, LSE and gradients on fresh copies of the inputs."""
    q, k, v = (x.detach().clone().requires_grad_(x.requires_grad) for x in (q, k, v))
    result = kernels.run(q, k, v, plan, backend="reference", attn_mask=mask, return_lse=lse)
    out = result[0] if lse else result
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v)) if q.requires_grad else None
    return result, grads


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_honours_the_field_or_refuses(backend, field, monkeypatch):
    # auto tries gather from S=200 here, so its choice is a real one, not "below AUTO_MIN_SEQ".
    monkeypatch.setitem(capabilities.AUTO_PREFERENCE, "cpu", (("gather", 0),))
    plan, mask, lse, grad = case(field)
    q, k, v = inputs(grad)
    call = Call.of(plan, q, mask, lse)
    if backend != "auto":
        assert honours(backend, call) == (field in RUNS_ON_CPU[backend]), "the table disagrees with RUNS_ON_CPU"
    else:
        chosen = select_backend(plan, q, mask, lse)
        assert honours(chosen, call), f"auto chose {chosen!r}, which does not honour {field}"
        assert chosen == ("gather" if field in RUNS_ON_CPU["gather"] else "reference")
    if field not in RUNS_ON_CPU[backend]:
        with pytest.raises(ConfigError) as error:
            kernels.run(q, k, v, plan, backend=backend, attn_mask=mask, return_lse=lse)
        assert named(backend, field) in str(error.value) and "reference" in str(error.value)
        return

    result = kernels.run(q, k, v, plan, backend=backend, attn_mask=mask, return_lse=lse)
    expected, expected_grads = reference(q, k, v, plan, mask, lse)
    if lse:
        torch.testing.assert_close(result[1], expected[1], atol=ATOL, rtol=ATOL)  # -inf rows too
        result, expected = result[0], expected[0]
    torch.testing.assert_close(result, expected, atol=ATOL, rtol=ATOL)
    if grad:
        grads = torch.autograd.grad(result.pow(2).sum(), (q, k, v))
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("field", ["order", "head_mode", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["gather", "triton"])
def test_half_precision_within_its_tolerance_or_refused(backend, dtype, field):
    plan, _, _, _ = case(field)
    q, k, v = (x.to(dtype) for x in inputs(False))
    if field not in RUNS_ON_CPU[backend]:
        with pytest.raises(ConfigError, match=named(backend, field)):
            kernels.run(q, k, v, plan, backend=backend)
        return
    out = kernels.run(q, k, v, plan, backend=backend)
    expected = kernels.run(q.float(), k.float(), v.float(), plan, backend="reference")
    assert out.dtype == dtype
    # int8 Q·K: both sides round the same per-block grid; fp16/bf16 P·V and accumulation differ.
    tol = max(TOL[dtype], 1e-2) if field == "int8" else TOL[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("field", ["variable", "order", "head_mode", "int8", "int4", "mask"])
def test_every_field_changes_the_result(field):
    """Matching the reference means honouring the field only if the field changes the reference's output."""
    plan, mask, _, _ = case(field)
    q, k, v = inputs(False)
    with_field = kernels.run(q, k, v, plan, backend="reference", attn_mask=mask)
    plain = dataclasses.replace(plan, q_bounds=None, k_bounds=None, order=None, head_mode=None, quant="none")
    without = kernels.run(q, k, v, plain, backend="reference")
    assert (with_field - without).abs().max() > 100 * ATOL


def test_int8_plan_on_cpu_refused_by_gather_and_quantised_by_auto():
    """The regression: gather computed int8 plans unquantised, and auto sent them there from 512 tokens."""
    s = 640
    layout = (torch.rand(1, H, 10, 10) < 0.3) | torch.eye(10, dtype=torch.bool)
    plan = AttentionPlan(seq_len=s, layout=layout, block_size=BLOCK, quant="int8")
    q, k, v = (torch.randn(1, s, H, D) for _ in range(3))
    with pytest.raises(ConfigError, match="plan.quant='int8'") as error:
        kernels.run(q, k, v, plan, backend="gather")
    able = [b for b in TABLE if b != "gather" and honours(b, Call.of(plan, q))]
    assert f"backends that can: {', '.join(able)}" in str(error.value)
    assert select_backend(plan, q) == "reference"
    out = kernels.run(q, k, v, plan)
    quantised = kernels.run(q, k, v, plan, backend="reference")
    exact = kernels.run(q, k, v, dataclasses.replace(plan, quant="none"), backend="reference")
    torch.testing.assert_close(out, quantised, atol=0, rtol=0)
    assert (out - exact).abs().max() > 1e-3
    # The same plan unquantised still goes to the fast path.
    assert select_backend(dataclasses.replace(plan, quant="none"), q) == "gather"


def test_auto_on_cpu_prefers_gather_from_auto_min_seq():
    q = torch.randn(1, 640, H, D)
    plan = AttentionPlan.full(640, BLOCK)
    assert select_backend(plan, q) == "gather"
    assert select_backend(plan, q, return_lse=True) == "gather"  # the LSE from the same kernel calls
    assert select_backend(plan, q, torch.ones(1, 1, 1, 640, dtype=torch.bool)) == "reference"
    assert select_backend(plan, q.requires_grad_()) == "gather"  # through autograd
    assert select_backend(plan, q, return_lse=True) == "reference"  # no LSE with a gradient
    short = AttentionPlan.full(S, BLOCK)
    assert select_backend(short, torch.randn(1, S, H, D)) == "reference"


def test_auto_on_cuda_prefers_triton_then_flex(monkeypatch):
    """The CUDA preference, read from the table without a GPU: the compiled Triton row stands in as present."""
    monkeypatch.setattr(capabilities, "_runtime_ready", lambda runtime: runtime != "triton-interpreter")
    plan = AttentionPlan.full(640, BLOCK)
    gpu = dataclasses.replace(Call.of(plan, torch.randn(1, 640, H, 64)), device="cuda", dtype=torch.bfloat16)
    assert choose_backend(gpu) == "triton"
    assert choose_backend(dataclasses.replace(gpu, lse=True, quant="int4", variable_blocks=True)) == "triton"
    assert choose_backend(dataclasses.replace(gpu, grad=True)) == "flex"  # forward-only Triton; flex has a backward
    assert choose_backend(dataclasses.replace(gpu, grad=True, seq_len=S)) == "reference"
    assert choose_backend(dataclasses.replace(gpu, dtype=torch.float32)) == "flex"
    assert choose_backend(dataclasses.replace(gpu, head_dim=96)) == "flex"
    assert choose_backend(dataclasses.replace(gpu, attn_mask=True)) == "reference"
    with pytest.raises(ConfigError, match="head dim 96 on cuda .it takes 64, 128.; backends that can: reference, flex"):
        choose_backend(dataclasses.replace(gpu, head_dim=96), "triton")
    with pytest.raises(ConfigError, match="a gradient .* on cpu; backends that can: reference, or 'auto'"):
        choose_backend(dataclasses.replace(gpu, device="cpu", grad=True, dtype=torch.float32, variable_blocks=True), "flex")
    cpu = dataclasses.replace(gpu, device="cpu", grad=True)
    assert choose_backend(cpu) == "gather"
    assert choose_backend(dataclasses.replace(cpu, lse=True)) == "reference"
    assert choose_backend(dataclasses.replace(cpu, variable_blocks=True)) == "reference"


@pytest.mark.parametrize("field", ["variable", "lse"])
def test_gather_refuses_a_gradient_through_variable_blocks_or_the_lse(field):
    plan, _, lse, _ = case(field)
    q, k, v = inputs(True)
    with pytest.raises(ConfigError, match="gradient .* through variable blocks or the LSE; backends that can: reference"):
        kernels.run(q, k, v, plan, backend="gather", return_lse=lse)
    result = kernels.run(q, k, v, plan, return_lse=lse)  # auto: the reference
    assert (result[0] if lse else result).requires_grad


@pytest.mark.parametrize("needs_grad", ["q", "k", "v"])
def test_gather_gradient_through_one_input_alone(needs_grad):
    """Autograd routes to the differentiable gather when any one input needs a gradient; the others get none."""
    plan = case("order")[0]
    tensors = dict(zip("qkv", inputs(False)))
    tensors[needs_grad].requires_grad_(True)
    out = kernels.run(*tensors.values(), plan, backend="gather")
    (got,) = torch.autograd.grad(out.pow(2).sum(), tensors[needs_grad])
    fresh = {name: x.detach().clone().requires_grad_(name == needs_grad) for name, x in tensors.items()}
    (want,) = torch.autograd.grad(kernels.run(*fresh.values(), plan, backend="reference").pow(2).sum(), fresh[needs_grad])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_unknown_backend():
    with pytest.raises(ConfigError, match="valid backends: auto, triton, gather, flex, reference"):
        select_backend(AttentionPlan.full(S, BLOCK), torch.randn(1, S, H, D), requested="cuda")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quant_spec(quant):
    """One absmax scale per (batch row, head, block) over its tokens and channels; values on the integer grid."""
    plan = dataclasses.replace(case("variable")[0], quant=quant)
    x = torch.randn(B, H, S, D) * torch.linspace(0.1, 3.0, S)[:, None]
    values, scales = quantize_blocks(x, plan, "k")
    levels = QUANT_LEVELS[quant]
    idx = plan.token_block_index("k").expand(B, H, S)
    for b, h, j in [(0, 0, 0), (1, 1, 2), (1, 0, N - 1)]:
        tokens = idx[b, h] == j
        if tokens.any():
            assert scales[b, h, j] == pytest.approx(float(x[b, h, tokens].abs().max()) / levels, rel=1e-6)
            assert values[b, h, tokens].abs().max() == levels  # the block's largest value hits the grid's edge
    assert values.dtype == torch.int8
    dequantised = fake_quant(x, plan, "k")
    torch.testing.assert_close(dequantised, values.float() * scales.gather(2, idx)[..., None])
    assert ((dequantised - x).abs() <= scales.gather(2, idx)[..., None] / 2 + 1e-6).all()
