"""Where attention is caught, after the model's own projections, norms and RoPE.

Two routes, both active only inside a hooked self-attention module's forward:
- a dispatcher backend, set on the module's processor for the duration of its forward, for processors that
  call `dispatch_attention_fn` (Wan, HunyuanVideo, LTX, Flux, QwenImage);
- a `TorchFunctionMode` around `F.scaled_dot_product_attention` for processors that call it directly
  (CogVideoX, Mochi, SD3).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import SparseDiTError
from . import compat
from .runtime import AttentionSite, SparseAttentionRuntime

BACKEND_NAME = "sparse_dit"
_MISSING = object()


@dataclass(frozen=True)
class _Active:
    site: AttentionSite
    runtime: SparseAttentionRuntime
    backend: Any  # the processor's own backend, used for every dense call


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("sparse_dit_active", default=None)


def _unsupported(what: str) -> SparseDiTError:
    return SparseDiTError(f"sparse attention does not support {what}; disable sparse attention for this run")


def _dispatcher_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """The registered backend: (B, S, H, D) in, (B, S, H, D) out."""
    active = _ACTIVE.get()
    api = compat.load()

    def dense() -> torch.Tensor:
        return api.dispatch_attention_fn(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, attention_kwargs={"return_lse": True} if return_lse else None,
            backend=active.backend if active else None, parallel_config=_parallel_config,
        )

    if active is None:  # a processor shared with a module that is not hooked
        return dense()
    if _parallel_config is not None or return_lse:
        raise _unsupported("context parallelism (each rank sees only a shard of the token grid)")
    if dropout_p or is_causal:
        raise _unsupported("attention dropout or causal masks")
    return active.runtime.attend(active.site, query, key, value, attn_mask=attn_mask, scale=scale, dense=dense)


class _SdpaMode(TorchFunctionMode):
    """Sends `F.scaled_dot_product_attention` calls (B, H, S, D) of the active module to the runtime."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        active = _ACTIVE.get()
        if func is not F.scaled_dot_product_attention or active is None:
            return func(*args, **kwargs)
        return _sdpa(active, func, *args, **kwargs)


def _sdpa(active: _Active, func, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    def dense() -> torch.Tensor:
        out = func(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)

    if dropout_p or is_causal:
        raise _unsupported("attention dropout or causal masks")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out = active.runtime.attend(active.site, q, k, v, attn_mask=attn_mask, scale=scale, dense=dense)
    return out.transpose(1, 2)


_backend_member = None


def _member():
    global _backend_member
    if _backend_member is None:
        _backend_member = compat.register_backend(BACKEND_NAME, _dispatcher_backend)
    return _backend_member


@contextmanager
def intercept(module: torch.nn.Module, site: AttentionSite, runtime: SparseAttentionRuntime) -> Iterator[None]:
    """Route the self-attention of `module` to `runtime` for the duration of the block."""
    processor = getattr(module, "processor", None)
    uses_dispatcher = processor is not None and hasattr(processor, "_attention_backend")
    own = processor.__dict__.get("_attention_backend", _MISSING) if uses_dispatcher else _MISSING
    token = _ACTIVE.set(_Active(site, runtime, processor._attention_backend if uses_dispatcher else None))
    try:
        if uses_dispatcher:
            processor._attention_backend = _member()
            try:
                yield
            finally:
                if own is _MISSING:
                    del processor._attention_backend
                else:
                    processor._attention_backend = own
        else:
            with _SdpaMode():
                yield
    finally:
        _ACTIVE.reset(token)
