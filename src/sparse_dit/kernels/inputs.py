"""The one check of an attention call's q, k and v, run on every path: dense or sparse, whichever backend.

`SparseAttention.attend` runs it before deciding dense or sparse, and `kernels.run` before choosing a backend,
so a call that one path would reject is rejected on all of them, with a `ShapeError` that says what to fix,
never a raw RuntimeError from deep inside a kernel.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError


def _shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


def _check_types(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Tensors, floating point, on one device, of one dtype (mixed dtypes only under autocast, as SDPA allows)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"{name} must be a torch.Tensor (B, S, H, D), got {type(x).__name__}")
        if not x.is_floating_point():
            raise ShapeError(f"{name} must be floating point (float32, float16, bfloat16), got {x.dtype}")
    if len({q.device, k.device, v.device}) > 1:
        raise ShapeError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them with .to()")
    if len({q.dtype, k.dtype, v.dtype}) > 1 and not torch.is_autocast_enabled(q.device.type):
        raise ShapeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise `ShapeError` unless q, k, v are the inputs of one self-attention call.

    Args:
        q: (B, S, H, D) queries.
        k: (B, S, Hkv, D) keys: the same batch, sequence and head dim as q; H a multiple of Hkv (grouped-query
            attention shares each key head across H / Hkv query heads).
        v: (B, S, Hkv, Dv) values: k's heads; Dv may differ from D (the output is then (B, S, H, Dv)), though
            not every backend computes that (`capabilities.TABLE`).
    Every dimension must be at least 1.
    """
    _check_types(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"q, k, v must be 4-D (B, S, H, D); got {_shapes(q, k, v)}")
    if 0 in (*q.shape, *k.shape, *v.shape):
        raise ShapeError(f"q, k, v must have no empty dimension; got {_shapes(q, k, v)}")
    b, s, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ShapeError(f"q, k, v must have one batch size B; got {_shapes(q, k, v)}")
    if k.shape[1] != s or v.shape[1] != s:
        # Cross-attention (keys of another length) is never made sparse: it stays with the model's attention.
        raise ShapeError(f"sparse attention is self-attention: q, k, v must have one sequence length S; got {_shapes(q, k, v)}")
    if k.shape[2] != v.shape[2]:
        raise ShapeError(f"k and v must have the same number of heads; got {_shapes(q, k, v)}")
    if h % k.shape[2]:
        raise ShapeError(
            f"query heads ({h}) must be a multiple of key/value heads ({k.shape[2]}) for grouped-query attention; "
            f"got {_shapes(q, k, v)}"
        )
    if k.shape[3] != d:
        raise ShapeError(f"q and k must have one head dim D (Q·K is taken over it); got {_shapes(q, k, v)}")
