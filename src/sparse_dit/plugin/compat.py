"""The private diffusers APIs sparse-dit relies on, found once and checked, so a move fails loudly."""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import Callable

from ..errors import DiffusersCompatibilityError

TESTED_DIFFUSERS = "0.42.1"


def _fail(what: str, exc: Exception | None = None) -> DiffusersCompatibilityError:
    import diffusers

    return DiffusersCompatibilityError(
        f"sparse-dit needs {what}, which diffusers {diffusers.__version__} does not provide "
        f"({type(exc).__name__}: {exc}); sparse-dit is tested with diffusers=={TESTED_DIFFUSERS}: "
        f"pip install diffusers=={TESTED_DIFFUSERS}"
    )


@functools.cache
def load() -> SimpleNamespace:
    """The diffusers internals used by the plugin, or a `DiffusersCompatibilityError` naming what moved.

    Cached: the dispatcher backend asks for it on every attention call."""
    try:
        from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager
        from diffusers.models import attention_dispatch
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention, MochiAttention
    except ImportError as exc:
        raise _fail("diffusers.hooks.HookRegistry and the attention module classes", exc) from exc
    registry = getattr(attention_dispatch, "_AttentionBackendRegistry", None)
    for attr in ("_backends", "_constraints", "_supported_arg_names"):
        if not isinstance(getattr(registry, attr, None), dict):
            raise _fail(f"attention_dispatch._AttentionBackendRegistry.{attr}")
    enum = getattr(attention_dispatch, "AttentionBackendName", None)
    if enum is None or not hasattr(enum, "_value2member_map_"):
        raise _fail("attention_dispatch.AttentionBackendName")
    dispatch = attention_dispatch.dispatch_attention_fn
    if "backend" not in inspect.signature(dispatch).parameters:
        raise _fail("dispatch_attention_fn(..., backend=...)")
    for method in ("register_hook", "remove_hook", "check_if_exists_or_initialize"):
        if not hasattr(HookRegistry, method):
            raise _fail(f"HookRegistry.{method}")
    return SimpleNamespace(
        HookRegistry=HookRegistry,
        ModelHook=ModelHook,
        StateManager=StateManager,
        attention_classes=(Attention, MochiAttention, AttentionModuleMixin),
        backend_enum=enum,
        backend_registry=registry,
        dispatch_attention_fn=dispatch,
    )


def register_backend(name: str, fn: Callable, *, supports_context_parallel: bool = False) -> object:
    """Add `fn` to the diffusers attention dispatcher under `name` and return its enum member.

    The enum is closed and the registry private, so the member is added in place; nothing becomes the
    process-wide default, and a module uses it only while its processor's `_attention_backend` points at it.
    With `supports_context_parallel`, `enable_parallelism` accepts models whose processors use it.
    """
    api = load()
    enum, registry = api.backend_enum, api.backend_registry
    if name not in enum._value2member_map_:
        member = str.__new__(enum, name)
        member._name_, member._value_ = name.upper(), name
        enum._member_map_[member._name_] = member
        enum._value2member_map_[name] = member
        enum._member_names_.append(member._name_)
    member = enum(name)
    registry._backends[member] = fn
    registry._constraints[member] = []
    registry._supported_arg_names[member] = set(inspect.signature(fn).parameters)
    if supports_context_parallel:
        if not isinstance(getattr(registry, "_supports_context_parallel", None), set):
            raise _fail("attention_dispatch._AttentionBackendRegistry._supports_context_parallel")
        registry._supports_context_parallel.add(name)
    return member


@functools.cache
def context_parallel() -> SimpleNamespace:
    """The diffusers internals sparse-dit's context-parallel path uses, or a `DiffusersCompatibilityError`."""
    from diffusers.models import attention_dispatch

    templated = getattr(attention_dispatch, "_templated_context_parallel_attention", None)
    if templated is None or "forward_op" not in inspect.signature(templated).parameters:
        raise _fail("attention_dispatch._templated_context_parallel_attention(..., forward_op, backward_op)")
    return SimpleNamespace(templated_attention=templated)
