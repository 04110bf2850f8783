"""`enable_sparse_attention` / `disable_sparse_attention`: hook a pipeline or transformer, and unhook it exactly."""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch

from ..config import SparseAttentionConfig
from ..errors import SparseDiTError, UnsupportedModelError
from ..pattern_file import ModelSignature, PatternFile, config_hash
from ..patterns import resolve
from ..pipelines.adapters import get_adapter, supported_models
from ..stats import AttentionStats
from . import compat, parallel
from .hooks import ATTENTION_HOOK, ROOT_HOOK, SparseAttentionHook, SparseRootHook
from .runtime import AttentionSite, SparseAttentionRuntime

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


def attention_sites(target: Any) -> list[tuple[AttentionSite, torch.nn.Module]]:
    """Every video self-attention module `enable_sparse_attention` hooks in `target`, with its site."""
    api = compat.load()
    found = []
    for component, model in named_transformers(target).items():
        adapter = get_adapter(model)
        layer = 0
        for name, module in model.named_modules():
            if isinstance(module, api.attention_classes) and adapter.is_self_attention(name):
                found.append((AttentionSite(f"{component}.{name}", name, layer, adapter.text_position), module))
                layer += 1
        if layer == 0:
            raise UnsupportedModelError(f"{type(model).__name__} has no self-attention module matching {adapter.self_attention!r}")
    return found


def model_signature(target: Any) -> ModelSignature:
    """What a pattern file made for `target` records of it: its transformers' classes and config hashes, and
    every self-attention site with its head count."""
    components = {name: (type(m).__name__, config_hash(getattr(m, "config", {}))) for name, m in named_transformers(target).items()}
    return ModelSignature(components, {site.id: int(getattr(module, "heads", 0)) for site, module in attention_sites(target)})


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
    target: Any, spec: str | SparseAttentionConfig | PatternFile | os.PathLike | None = None, **overrides: Any
) -> SparseAttentionConfig:
    """Replace the video self-attention of a diffusers pipeline or transformer with sparse attention.

    Every transformer of a pipeline is hooked (Wan 2.2's `transformer_2` too). Cross-attention and text-only
    attention are left alone. Enabling again replaces the previous setting cleanly.

    Args:
        target: a `DiffusionPipeline` or one of the supported transformer models.
        spec: a method name (`sparse_dit.list_methods()`), a config object, a pattern file (a ".safetensors"
            path or a loaded `PatternFile`: its method and options, checked against this model), or None for the
            default method.
        **overrides: config options, e.g. `dense_steps=0.3, block_size=128, window=(3, 7, 7)`.
    Returns:
        The config in effect.

    Example:
        >>> pipe.enable_sparse_attention("window", window=(3, 9, 9))
    """
    config, pattern = resolve(spec, **overrides)
    models = transformers_of(target)
    sites = attention_sites(target)
    if pattern is not None:
        pattern.check_model(model_signature(target))
    mine = _attached(target)
    for model in models:
        if _attached(model) not in (None, mine):
            raise SparseDiTError(
                f"this {type(target).__name__}'s {type(model).__name__} is shared with another pipeline (or was enabled "
                "on its own) that has sparse attention enabled; enabling here would silently change that one too. "
                "Call disable_sparse_attention on it first"
            )
    for model in models:  # already split over processes: refuse what cannot run there before hooking anything
        if getattr(model, "_parallel_config", None) is not None:
            parameter = next(model.parameters(), None)
            parallel.check(config, model, model._parallel_config, None if parameter is None else parameter.device)
    disable_sparse_attention(target)
    runtime = SparseAttentionRuntime(config, pipeline=target if _is_pipeline(target) else None, pattern=pattern)
    runtime.models = {name: weakref.ref(model) for name, model in named_transformers(target).items()}
    for model in models:
        _register(model, SparseRootHook(runtime, get_adapter(model)), ROOT_HOOK)
    for site, module in sites:
        _register(module, SparseAttentionHook(runtime, site), ATTENTION_HOOK)
    for model in models:
        model._diffusers_hook.invalidate_child_registries_cache()
    for obj in {id(target): target, **{id(m): m for m in models}}.values():
        obj.__dict__[_RUNTIME_ATTR] = runtime
        obj.__dict__["__deepcopy__"] = _refuse_deepcopy
        runtime.attached.append(weakref.ref(obj))
    return config


def _attached(obj: Any) -> SparseAttentionRuntime | None:
    return obj.__dict__.get(_RUNTIME_ATTR)


def _refuse_deepcopy(memo: dict) -> None:
    # The hooks replace each module's `forward` with a closure over the original module and its runtime, which
    # deepcopy does not copy: a copy would run the original's hooks (and report to the original's stats).
    raise SparseDiTError(
        "cannot deepcopy a model with sparse attention enabled: its hooks would stay bound to the original. Call "
        "disable_sparse_attention() first, copy, then enable sparse attention on each copy"
    )


def disable_sparse_attention(target: Any) -> None:
    """Remove every sparse-dit hook from `target`, restoring the exact dense model. A no-op if not enabled.

    A transformer shared with another pipeline is restored for both, and neither reports it enabled any more.
    """
    runtimes = {id(r): r for r in (_attached(target), *map(_attached, transformers_of(target))) if r is not None}
    for model in transformers_of(target):
        for module in model.modules():
            _unregister(module, ATTENTION_HOOK)
        _unregister(model, ROOT_HOOK)
        registry = getattr(model, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()
    for runtime in runtimes.values():
        for ref in runtime.attached:
            obj = ref()
            if obj is not None and obj.__dict__.get(_RUNTIME_ATTR) is runtime:
                del obj.__dict__[_RUNTIME_ATTR]
                obj.__dict__.pop("__deepcopy__", None)


def _runtime(target: Any) -> SparseAttentionRuntime | None:
    """The runtime hooked into `target`: its own, or that of a transformer it shares with another pipeline."""
    runtime = _attached(target)
    if runtime is None and not isinstance(target, torch.nn.Module) and _is_pipeline(target):
        runtime = next((r for r in map(_attached, transformers_of(target)) if r is not None), None)
    return runtime


def runtime_of(target: Any) -> SparseAttentionRuntime:
    """The runtime hooked into `target` (see `_runtime`); raises if sparse attention is not enabled."""
    runtime = _runtime(target)
    if runtime is None:
        raise SparseDiTError("sparse attention is not enabled here; call enable_sparse_attention first")
    return runtime


def sparse_attention_stats(target: Any) -> AttentionStats:
    """A copy of what the hooked attention computed in the last run: density and call counts per (step, layer)."""
    return runtime_of(target).stats.snapshot()


def sparse_attention_config(target: Any) -> SparseAttentionConfig | None:
    """The config in effect on `target`, or None if sparse attention is not enabled."""
    runtime = _runtime(target)
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
