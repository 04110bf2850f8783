"""`enable_sparse_attention` / `disable_sparse_attention`: hook a pipeline or transformer, and unhook it exactly."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import SparseAttentionConfig
from ..errors import SparseDiTError, UnsupportedModelError
from ..patterns import resolve_config
from ..pipelines.adapters import get_adapter, supported_models
from . import compat
from .hooks import ATTENTION_HOOK, ROOT_HOOK, SparseAttentionHook, SparseRootHook
from .runtime import AttentionSite, SparseAttentionRuntime
from ..stats import AttentionStats

_RUNTIME_ATTR = "_sparse_dit_runtime"
_CREATED_ATTR = "_sparse_dit_created"  # registries and forwards this package added, to remove on disable


def _is_pipeline(target: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(target, DiffusionPipeline)


def transformers_of(target: Any) -> list[torch.nn.Module]:
    """The transformers `enable_sparse_attention` hooks in `target` (a pipeline or a transformer)."""
    return list(named_transformers(target).values())


def named_transformers(target: Any) -> dict[str, torch.nn.Module]:
    """{component name: transformer} of a pipeline; a bare transformer is named "transformer"."""
    if isinstance(target, torch.nn.Module):
        get_adapter(target)
        return {"transformer": target}
    if not _is_pipeline(target):
        raise SparseDiTError(f"expected a diffusers DiffusionPipeline or transformer model, got {type(target).__name__}")
    found = {name: m for name, m in target.components.items() if name.startswith("transformer") and isinstance(m, torch.nn.Module)}
    if not found:
        raise UnsupportedModelError(
            f"{type(target).__name__} has no transformer component; sparse-dit hooks Diffusion Transformer pipelines "
            f"whose denoiser is one of: {', '.join(supported_models())}"
        )
    for model in found.values():
        get_adapter(model)
    return found


def _register(module: torch.nn.Module, hook: Any, name: str) -> None:
    api = compat.load()
    created = []
    if not hasattr(module, "_diffusers_hook"):
        created.append("_diffusers_hook")
    if "forward" not in module.__dict__:
        created.append("forward")
    api.HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    module.__dict__.setdefault(_CREATED_ATTR, set()).update(created)


def _unregister(module: torch.nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(name) is None:
        return
    registry.remove_hook(name, recurse=False)
    created = module.__dict__.pop(_CREATED_ATTR, set())
    if not registry.hooks:
        # Leave the module as it was before enable: no instance `forward`, no empty hook registry.
        if "forward" in created:
            module.__dict__.pop("forward", None)
        if "_diffusers_hook" in created:
            del module._diffusers_hook


def enable_sparse_attention(
    target: Any, spec: str | SparseAttentionConfig | os.PathLike | None = None, **overrides: Any
) -> SparseAttentionConfig:
    """Replace the video self-attention of a diffusers pipeline or transformer with sparse attention.

    Every transformer of a pipeline is hooked (Wan 2.2's `transformer_2` too). Cross-attention and text-only
    attention are left alone. Enabling again replaces the previous setting cleanly.

    Args:
        target: a `DiffusionPipeline` or one of the supported transformer models.
        spec: a method name (`sparse_dit.list_methods()`), a config object, or None for the default method.
        **overrides: config options, e.g. `dense_steps=0.3, block_size=128, window=(3, 7, 7)`.
    Returns:
        The config in effect.

    Example:
        >>> pipe.enable_sparse_attention("window", window=(3, 9, 9))
    """
    config = resolve_config(spec, **overrides)
    named = named_transformers(target)
    models = list(named.values())
    disable_sparse_attention(target)
    api = compat.load()
    runtime = SparseAttentionRuntime(config, pipeline=target if _is_pipeline(target) else None)
    for component, model in named.items():
        adapter = get_adapter(model)
        _register(model, SparseRootHook(runtime, adapter), ROOT_HOOK)
        layer = 0
        for name, module in model.named_modules():
            if isinstance(module, api.attention_classes) and adapter.is_self_attention(name):
                site = AttentionSite(f"{component}.{name}", name, layer, adapter.text_position)
                _register(module, SparseAttentionHook(runtime, site), ATTENTION_HOOK)
                layer += 1
        model._diffusers_hook.invalidate_child_registries_cache()
        if layer == 0:
            disable_sparse_attention(target)
            raise UnsupportedModelError(f"{type(model).__name__} has no self-attention module matching {adapter.self_attention!r}")
    for obj in {id(target): target, **{id(m): m for m in models}}.values():
        setattr(obj, _RUNTIME_ATTR, runtime)
    return config


def disable_sparse_attention(target: Any) -> None:
    """Remove every sparse-dit hook from `target`, restoring the exact dense model. A no-op if not enabled."""
    for model in transformers_of(target):
        for module in model.modules():
            _unregister(module, ATTENTION_HOOK)
        _unregister(model, ROOT_HOOK)
        registry = getattr(model, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()
        model.__dict__.pop(_RUNTIME_ATTR, None)
    if not isinstance(target, torch.nn.Module):
        target.__dict__.pop(_RUNTIME_ATTR, None)


def runtime_of(target: Any) -> SparseAttentionRuntime:
    """The runtime `enable_sparse_attention` attached to `target`; raises if not enabled."""
    runtime = getattr(target, _RUNTIME_ATTR, None)
    if runtime is None:
        raise SparseDiTError("sparse attention is not enabled here; call enable_sparse_attention first")
    return runtime


def sparse_attention_stats(target: Any) -> AttentionStats:
    """A copy of what the hooked attention computed in the last run: density and call counts per (step, layer)."""
    return runtime_of(target).stats.snapshot()


def sparse_attention_config(target: Any) -> SparseAttentionConfig | None:
    """The config in effect on `target`, or None if sparse attention is not enabled."""
    runtime = getattr(target, _RUNTIME_ATTR, None)
    return None if runtime is None else runtime.config


def install_pipeline_methods() -> None:
    """Add `enable_sparse_attention`, `disable_sparse_attention` and `sparse_attention_stats` to `DiffusionPipeline`."""
    from diffusers import DiffusionPipeline

    def enable(self, spec=None, **overrides):
        return enable_sparse_attention(self, spec, **overrides)

    def disable(self):
        return disable_sparse_attention(self)

    def stats(self):
        return sparse_attention_stats(self)

    for name, fn, doc_of in (
        ("enable_sparse_attention", enable, enable_sparse_attention),
        ("disable_sparse_attention", disable, disable_sparse_attention),
        ("sparse_attention_stats", stats, sparse_attention_stats),
    ):
        fn.__doc__ = doc_of.__doc__
        fn.__name__ = name
        setattr(DiffusionPipeline, name, fn)
