"""What each kernel backend can honour, in one table, and the one choice of backend made from it.

A plan has fields (token order, variable blocks, head modes, low-bit Q·K) and a call has options (a model
mask, the LSE, a gradient, a device, dtype and head dim, a v head dim of its own). A backend that silently skipped one would compute
another attention than the plan's, so `select_backend` checks every field against `TABLE`: "auto" picks the
preferred backend that honours them all, and an explicit backend that does not raises `ConfigError` naming
the field and the backends that would. `kernels.run` and `sparse-dit bench kernels` both choose through it.

Nothing here imports triton: the Triton rows are checked only for calls on their device, and the package is
imported then (see `_runtime_ready`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from ..plan import QUANT_MODES, AttentionPlan

BACKENDS = ("auto", "triton", "gather", "flex", "reference")
AUTO_MIN_SEQ = 512  # below it the reference is as fast and exact

# The Triton kernels' reach, kept here so that the table can be read without importing triton;
# `triton.block_sparse.accepts` reads the same constants. On GPU: what tests/test_triton_aot.py compiles and
# checks (fp32 would run in TF32 on tensor cores, and fp32 tiles of D=128 overflow shared memory).
TRITON_GPU_HEAD_DIMS = (64, 128)
TRITON_GPU_DTYPES = (torch.float16, torch.bfloat16)
# Under TRITON_INTERPRET=1 also small heads (fast CPU tests) and fp32 (exact CPU tests).
TRITON_INTERPRETER_HEAD_DIMS = (16, 32, 64, 128)
TRITON_INTERPRETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
Runtime = Literal["torch", "triton", "triton-interpreter"]


@dataclass(frozen=True)
class Capabilities:
    """What one backend honours exactly on some devices.

    Attributes:
        fixed_blocks: plans with fixed-size blocks (`block_size`, the last block short).
        variable_blocks: plans with `q_bounds` / `k_bounds`.
        order: plans with a token `order`.
        head_modes: plans with `head_mode` (dense heads computed in full, skipped heads zero).
        quant: the `plan.quant` modes computed as `kernels.quant` specifies.
        attn_mask: a model attention mask.
        lse: `return_lse=True`.
        grad: inputs that require a gradient, with autograd enabled.
        grad_fixed_only: the gradient only for fixed-block plans without the LSE.
        devices: device types (`torch.device.type`) of this row; None: any.
        dtypes: input dtypes; None: any.
        head_dims: head dims; None: any.
        v_head_dim: values whose head dim Dv differs from q's and k's D.
        runtime: what must be present for the row to exist: "torch" (always), "triton" (triton installed,
            kernels built for the GPU) or "triton-interpreter" (kernels built under TRITON_INTERPRET=1).
    """

    fixed_blocks: bool
    variable_blocks: bool
    order: bool
    head_modes: bool
    quant: frozenset[str]
    attn_mask: bool
    lse: bool
    grad: bool
    devices: frozenset[str] | None
    dtypes: frozenset[torch.dtype] | None
    head_dims: frozenset[int] | None
    v_head_dim: bool
    runtime: Runtime = "torch"
    grad_fixed_only: bool = False


def _row(*, variable_blocks: bool, quant: tuple[str, ...], attn_mask: bool, lse: bool, grad: bool,
         devices: tuple[str, ...] | None, dtypes: tuple[torch.dtype, ...] | None, head_dims: tuple[int, ...] | None,
         v_head_dim: bool, runtime: Runtime = "torch", grad_fixed_only: bool = False) -> Capabilities:
    """A row of the table; every backend runs fixed blocks, token orders and head modes."""
    return Capabilities(
        fixed_blocks=True, variable_blocks=variable_blocks, order=True, head_modes=True, quant=frozenset(quant),
        attn_mask=attn_mask, lse=lse, grad=grad, devices=None if devices is None else frozenset(devices),
        dtypes=None if dtypes is None else frozenset(dtypes), head_dims=None if head_dims is None else frozenset(head_dims),
        v_head_dim=v_head_dim, runtime=runtime, grad_fixed_only=grad_fixed_only,
    )


# One or more rows per backend; a backend honours a call if the row for the call's device does.
TABLE: dict[str, tuple[Capabilities, ...]] = {
    # Dense attention under the expanded token mask: every field, any device, O(S^2) memory.
    "reference": (
        _row(variable_blocks=True, quant=QUANT_MODES, attn_mask=True, lse=True, grad=True, devices=None,
             dtypes=(*_FLOATS, torch.float64), head_dims=None, v_head_dim=True),
    ),
    # Gathered blocks through the CPU flash SDPA kernel: its key splits call the CPU-only flash kernel, and it
    # computes Q·K in the input dtype. That kernel takes one head dim for Q, K and V, and returns the LSE.
    # Variable blocks run per query cluster (`kernels.varblock`). A gradient takes a second, out-of-place
    # gather of fixed blocks through autograd (`gather_attention_autograd`), which returns no LSE.
    "gather": (
        _row(variable_blocks=True, quant=("none",), attn_mask=False, lse=True, grad=True, devices=("cpu",),
             dtypes=(*_FLOATS, torch.float64), head_dims=None, v_head_dim=False, grad_fixed_only=True),
    ),
    # Compiled FlexAttention over full kept blocks, Q and K fake-quantised beforehand. Inductor's CPU
    # template is inference-only, returns no LSE and takes no float64.
    "flex": (
        _row(variable_blocks=False, quant=QUANT_MODES, attn_mask=False, lse=False, grad=False, devices=("cpu",),
             dtypes=_FLOATS, head_dims=None, v_head_dim=True),
        _row(variable_blocks=False, quant=QUANT_MODES, attn_mask=False, lse=True, grad=True, devices=("cuda",),
             dtypes=_FLOATS, head_dims=None, v_head_dim=True),
    ),
    # The block-sparse kernels: every plan field, forward only, no model mask; the LSE is always computed. One
    # HEAD_DIM tile serves Q, K and V.
    "triton": (
        _row(variable_blocks=True, quant=QUANT_MODES, attn_mask=False, lse=True, grad=False, devices=("cuda",),
             dtypes=TRITON_GPU_DTYPES, head_dims=TRITON_GPU_HEAD_DIMS, v_head_dim=False,
             runtime="triton"),
        _row(variable_blocks=True, quant=QUANT_MODES, attn_mask=False, lse=True, grad=False, devices=("cpu",),
             dtypes=TRITON_INTERPRETER_DTYPES, head_dims=TRITON_INTERPRETER_HEAD_DIMS,
             v_head_dim=False, runtime="triton-interpreter"),
    ),
}

# What "auto" tries per device type, in order, each from a sequence length on; then the reference. Flex is
# never auto's choice on CPU: it compiles per shape and is slower than gather there (docs/benchmarks.md).
AUTO_PREFERENCE: dict[str, tuple[tuple[str, int], ...]] = {
    "cuda": (("triton", 0), ("flex", AUTO_MIN_SEQ)),
    "cpu": (("gather", AUTO_MIN_SEQ),),
}


@dataclass(frozen=True)
class Call:
    """What one attention call asks of a backend (built by `Call.of`)."""

    variable_blocks: bool
    order: bool
    head_modes: bool
    quant: str
    attn_mask: bool
    lse: bool
    grad: bool
    device: str
    dtype: torch.dtype
    head_dim: int
    seq_len: int
    v_head_dim: int | None = None  # v's head dim where it differs from head_dim

    @classmethod
    def of(cls, plan: AttentionPlan, q: torch.Tensor, attn_mask: torch.Tensor | None = None, return_lse: bool = False,
           grad: bool | None = None, v_head_dim: int | None = None) -> "Call":
        """The call `kernels.run(q, k, v, plan, attn_mask=attn_mask, return_lse=return_lse)` makes.

        Args:
            q: (B, S, H, D) queries.
            grad: whether the call must be differentiable; default: autograd is on and q requires a gradient
                (`kernels.run` passes whether any of q, k, v does).
            v_head_dim: v's head dim Dv; default: q's.
        """
        if grad is None:
            grad = torch.is_grad_enabled() and q.requires_grad
        return cls(
            variable_blocks=plan.q_bounds is not None or plan.k_bounds is not None, order=plan.order is not None,
            head_modes=plan.head_mode is not None, quant=plan.quant, attn_mask=attn_mask is not None,
            lse=bool(return_lse), grad=bool(grad), device=q.device.type, dtype=q.dtype, head_dim=q.shape[-1],
            seq_len=plan.seq_len, v_head_dim=None if v_head_dim in (None, q.shape[-1]) else v_head_dim,
        )


@functools.cache
def triton_installed() -> bool:
    """Whether triton can be imported (looked up once: a missing module is searched for on every sys.path entry)."""
    return importlib.util.find_spec("triton") is not None


def _runtime_ready(runtime: Runtime) -> bool:
    """Whether a row's runtime is present. Imports the Triton package only when asked about its rows."""
    if runtime == "torch":
        return True
    if not triton_installed():
        return False
    name = f"{__package__}.triton"
    # Decorated under TRITON_INTERPRET=1 or not when first imported: unimported, the variable decides.
    if name not in sys.modules and runtime == "triton-interpreter" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        module = importlib.import_module(name)
    except ImportError:
        return False
    return module.is_interpreted() == (runtime == "triton-interpreter")


_RUNTIME_MISSING = {
    "triton": "triton is not installed, or the Triton kernels were built for the CPU interpreter",
    "triton-interpreter": "the Triton kernels take CPU tensors only when built under TRITON_INTERPRET=1",
}


def backend_capabilities(backend: str, device: str | torch.device) -> Capabilities | None:
    """The row of `TABLE` for `backend` on this device type, or None where it does not run here."""
    kind = torch.device(device).type
    for row in TABLE[backend]:
        if (row.devices is None or kind in row.devices) and _runtime_ready(row.runtime):
            return row
    return None


def _names(values) -> str:
    ordered = sorted(values, key=lambda v: (0, v, "") if isinstance(v, int) else (1, 0, str(v)))
    return ", ".join(str(v).removeprefix("torch.") for v in ordered)


def unmet(backend: str, call: Call) -> list[str]:
    """What `backend` cannot honour of `call`, one phrase per field; empty if it honours everything."""
    row = backend_capabilities(backend, call.device)
    if row is None:
        rows = [r for r in TABLE[backend] if r.devices is None or call.device in r.devices]
        if not rows:
            devices = sorted({d for r in TABLE[backend] for d in r.devices or ()})
            return [f"device {call.device!r} (it runs on {', '.join(devices)})"]
        return [f"device {call.device!r} here ({_RUNTIME_MISSING[rows[0].runtime]})"]
    checks = [
        (not call.variable_blocks and not row.fixed_blocks, "fixed blocks (plan.block_size)"),
        (call.variable_blocks and not row.variable_blocks, "variable blocks (plan.q_bounds / plan.k_bounds)"),
        (call.order and not row.order, "a token order (plan.order)"),
        (call.head_modes and not row.head_modes, "dense and skipped heads (plan.head_mode)"),
        (call.quant not in row.quant, f"plan.quant={call.quant!r} (it takes {_names(repr(m) for m in row.quant)})"),
        (call.attn_mask and not row.attn_mask, "a model attention mask (attn_mask)"),
        (call.lse and not row.lse, f"the LSE (return_lse=True) on {call.device}"),
        (call.grad and not row.grad, f"a gradient (inputs that require grad) on {call.device}"),
        (call.grad and row.grad and row.grad_fixed_only and (call.variable_blocks or call.lse),
         "a gradient (inputs that require grad) through variable blocks or the LSE"),
        (row.dtypes is not None and call.dtype not in row.dtypes,
         f"dtype {_names([call.dtype])} on {call.device} (it takes {_names(row.dtypes or ())})"),
        (row.head_dims is not None and call.head_dim not in row.head_dims,
         f"head dim {call.head_dim} on {call.device} (it takes {_names(row.head_dims or ())})"),
        (call.v_head_dim is not None and not row.v_head_dim,
         f"a v head dim ({call.v_head_dim}) other than q's and k's ({call.head_dim})"),
    ]
    return [phrase for failed, phrase in checks if failed]


def honours(backend: str, call: Call) -> bool:
    """Whether `backend` computes `call` exactly as its plan and options say."""
    return not unmet(backend, call)


def choose_backend(call: Call, requested: str = "auto") -> str:
    """`select_backend` for a `Call` already described: the backend that runs it, or `ConfigError`."""
    if requested not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {requested!r}; valid backends: {', '.join(BACKENDS)}")
    if requested == "auto":
        for backend, min_seq in AUTO_PREFERENCE.get(call.device, ()):
            if call.seq_len >= min_seq and honours(backend, call):
                return backend
        requested = "reference"
    missing = unmet(requested, call)
    if missing:
        able = [b for b in TABLE if b != requested and honours(b, call)]
        alternatives = f"backends that can: {', '.join(able)}, or 'auto'" if able else "no backend can"
        raise ConfigError(f"backend {requested!r} cannot honour {' and '.join(missing)}; {alternatives}")
    return requested


def select_backend(
    plan: AttentionPlan,
    q: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    requested: str = "auto",
    *,
    grad: bool | None = None,
    v_head_dim: int | None = None,
) -> str:
    """The backend that runs this call: `requested` if it honours every field of the plan and option of the
    call, else `ConfigError` naming what it cannot honour and which backends can. For "auto": the first
    backend of `AUTO_PREFERENCE` for the device that honours every field and whose minimum sequence length
    the plan reaches, else "reference".

    Args:
        plan: the call's plan.
        q: (B, S, H, D) queries: their device, dtype and head dim, and whether they require a gradient.
        attn_mask: the model's mask, if any (only its presence matters).
        return_lse: whether the call returns the log-sum-exp.
        requested: one of `BACKENDS`.
        grad: whether the call must be differentiable (see `Call.of`).
        v_head_dim: v's head dim; default: q's.
    Returns:
        "triton", "gather", "flex" or "reference".
    """
    return choose_backend(Call.of(plan, q, attn_mask, return_lse, grad, v_head_dim), requested)


__all__ = [
    "AUTO_MIN_SEQ", "AUTO_PREFERENCE", "BACKENDS", "TABLE", "Call", "Capabilities", "backend_capabilities",
    "choose_backend", "honours", "select_backend", "unmet",
]
