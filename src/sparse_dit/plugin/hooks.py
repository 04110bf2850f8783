"""The two diffusers `ModelHook`s: one on each transformer root, one on each video self-attention module."""

from __future__ import annotations

import torch

from ..pipelines.adapters import ModelAdapter
from . import compat
from . import interception
from .runtime import AttentionSite, SparseAttentionRuntime

ROOT_HOOK = "sparse_dit_root"
ATTENTION_HOOK = "sparse_dit_attention"

_api = compat.load()


class _NoState:
    def reset(self) -> None:
        pass


class SparseRootHook(_api.ModelHook):
    """Before every transformer forward, records the token grid and the denoising step.

    Stateful so that the pipeline's `cache_context` reaches it (step index, cond/uncond) and its end-of-call
    reset (`maybe_free_model_hooks`) ends the run.
    """

    _is_stateful = True

    def __init__(self, runtime: SparseAttentionRuntime, adapter: ModelAdapter) -> None:
        super().__init__()
        self.runtime = runtime
        self.adapter = adapter
        self.state_manager = _api.StateManager(_NoState)  # found by diffusers' `_set_cache_context`

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        bound = self.adapter.bind(module, args, kwargs)
        context = getattr(self.state_manager, "_context", None)
        self.runtime.begin_forward(self.adapter.grid(module, bound), bound.get("timestep"), context)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runtime.end_run()
        return module


class SparseAttentionHook(_api.ModelHook):
    """Routes one self-attention module's attention to the runtime while the hook is registered."""

    def __init__(self, runtime: SparseAttentionRuntime, site: AttentionSite) -> None:
        super().__init__()
        self.runtime = runtime
        self.site = site
        self.handle: torch.Tensor | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.handle = interception.register_site(self.runtime, self.site, module)
        self.dispatcher = interception.uses_dispatcher(self.handle)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        interception.unregister_site(self.handle, module)
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        interception._RUNNING.append(self.handle)
        try:
            if self.dispatcher:
                return self.fn_ref.original_forward(*args, **kwargs)
            with interception.SdpaMode():
                return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            interception._RUNNING.pop()
