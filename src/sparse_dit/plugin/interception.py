"""Where attention is caught, after the model's own projections, norms and RoPE.

Two routes, both active only inside a hooked self-attention module's forward:
- a dispatcher backend, set on the module's processor while it is hooked, for processors that call
  `dispatch_attention_fn` (Wan, HunyuanVideo, LTX, Flux, QwenImage);
- a `TorchFunctionMode` around `F.scaled_dot_product_attention` for processors that call it directly
  (CogVideoX, Mochi, SD3).

The dispatcher backend is registered as one that takes part in diffusers' context parallelism: a call that
arrives with a parallel config (each process holding a shard of the tokens) goes to `plugin.parallel`.

Either way the call reaches `sparse_dit::attend`, a `torch.library` custom op, so that `torch.compile` (regional,
`transformer.compile_repeated_blocks()`, or whole-model) sees one opaque op where planning, the kernels and the
stats run, instead of breaking its graph on them. The op finds its call site from a handle tensor: an int tensor
per hooked module, a graph input rather than a constant, so one compiled block serves every layer.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..attention import sdpa
from ..errors import SparseDiTError
from . import compat, parallel
from .runtime import AttentionSite, SparseAttentionRuntime

BACKEND_NAME = "sparse_dit"
_MISSING = object()


@dataclass(frozen=True)
class _Site:
    runtime: weakref.ref  # to the SparseAttentionRuntime; the hook holds it, this registry must not
    site: AttentionSite
    backend: Any  # the processor's own dispatcher backend (dense calls use it), or None for the SDPA route
    dispatcher: bool


_SITES: dict[int, _Site] = {}
_handles = itertools.count()
# Handles of the hooked modules whose forward is running, innermost last. A plain list, not a ContextVar:
# dynamo traces list pushes and pops, and a forward runs on one thread.
_RUNNING: list[torch.Tensor] = []
# Kept on a routed processor itself, not in a registry keyed by id(): ids are reused once an object is freed.
_ROUTED = "_sparse_dit_routed"  # [hooked modules using the processor, its own `_attention_backend` or _MISSING]


def register_site(runtime: SparseAttentionRuntime, site: AttentionSite, module: torch.nn.Module) -> torch.Tensor:
    """Route `module`'s attention to `runtime`; returns the site's handle (an int64 scalar tensor)."""
    processor = getattr(module, "processor", None)
    dispatcher = processor is not None and hasattr(processor, "_attention_backend")
    backend = None
    if dispatcher:
        routed = processor.__dict__.setdefault(_ROUTED, [0, processor.__dict__.get("_attention_backend", _MISSING)])
        own = routed[1]
        backend = (type(processor)._attention_backend if own is _MISSING else own)
        routed[0] += 1
        processor._attention_backend = _member()
    number = next(_handles)
    _SITES[number] = _Site(weakref.ref(runtime), site, backend, dispatcher)
    return torch.tensor(number, dtype=torch.int64)


def unregister_site(handle: torch.Tensor, module: torch.nn.Module) -> None:
    """Undo `register_site`: the processor gets its own backend back once no hooked module uses it."""
    entry = _SITES.pop(int(handle), None)
    processor = getattr(module, "processor", None)
    if entry is None or not entry.dispatcher or processor is None:
        return
    routed = processor.__dict__.get(_ROUTED)
    if routed is None:
        return
    routed[0] -= 1
    if routed[0] == 0:
        del processor.__dict__[_ROUTED]
        if routed[1] is _MISSING:
            processor.__dict__.pop("_attention_backend", None)
        else:
            processor._attention_backend = routed[1]


def uses_dispatcher(handle: torch.Tensor) -> bool:
    return _SITES[int(handle)].dispatcher


def _unsupported(what: str) -> SparseDiTError:
    return SparseDiTError(f"sparse attention does not support {what}; disable sparse attention for this run")


def _attend_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  handle: torch.Tensor, scale: float | None) -> torch.Tensor:
    entry = _SITES[int(handle)]
    runtime = entry.runtime()
    if runtime is None:
        raise SparseDiTError(f"{entry.site.id} is hooked by a sparse attention runtime that no longer exists; enable again")
    if entry.dispatcher:
        def dense() -> torch.Tensor:
            return compat.load().dispatch_attention_fn(q, k, v, attn_mask=attn_mask, scale=scale, backend=entry.backend,
                                                       enable_gqa=k.shape[2] != q.shape[2])
    else:
        def dense() -> torch.Tensor:
            return sdpa(q, k, v, scale=scale, attn_mask=attn_mask)
    return runtime.attend(entry.site, q, k, v, attn_mask=attn_mask, scale=scale, dense=dense)


@torch.library.custom_op("sparse_dit::attend", mutates_args=())
def _attend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               handle: torch.Tensor, scale: float | None) -> torch.Tensor:
    return _attend_eager(q, k, v, attn_mask, handle, scale)  # kernels and SDPA return new tensors: no aliasing


@_attend_op.register_fake
def _(q, k, v, attn_mask, handle, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
           scale: float | None) -> torch.Tensor:
    """Self-attention of the innermost running hooked module: (B, S, H, D) in and out."""
    handle = _RUNNING[-1]
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _attend_eager(q, k, v, attn_mask, handle, scale)  # the op has no backward; eager keeps autograd
    return _attend_op(q, k, v, attn_mask, handle, None if scale is None else float(scale))


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
    if not _RUNNING:  # a processor shared with a module that is not hooked: the default backend, as before
        return compat.load().dispatch_attention_fn(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, attention_kwargs={"return_lse": True} if return_lse else None,
            parallel_config=_parallel_config,
        )
    if return_lse:
        raise _unsupported("returning the log-sum-exp to the model (return_lse=True)")
    if dropout_p or is_causal:
        raise _unsupported("attention dropout or causal masks")
    if _parallel_config is not None and parallel.split_of(_parallel_config) is not None:
        entry = _SITES[int(_RUNNING[-1])]
        runtime = entry.runtime()
        if runtime is None:
            raise SparseDiTError(f"{entry.site.id} is hooked by a sparse attention runtime that no longer exists; enable again")
        return parallel.attend(runtime, entry.site, entry.backend, query, key, value, attn_mask, scale, _parallel_config)
    return attend(query, key, value, attn_mask, scale)


class SdpaMode(TorchFunctionMode):
    """Sends `F.scaled_dot_product_attention` calls (B, H, S, D) of the running hooked module to sparse-dit."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not _RUNNING:
            return func(*args, **kwargs)
        return _sdpa(*args, **kwargs)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p or is_causal:
        raise _unsupported("attention dropout or causal masks")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return attend(q, k, v, attn_mask, scale).transpose(1, 2)


_backend_member = None


def _member():
    global _backend_member
    if _backend_member is None:
        _backend_member = compat.register_backend(BACKEND_NAME, _dispatcher_backend, supports_context_parallel=True)
    return _backend_member
