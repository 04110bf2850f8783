"""Sparse attention methods: one module per method, each a `Planner` that turns (q, k, context) into a plan."""

from __future__ import annotations

import os
from typing import Any

from ..config import SparseAttentionConfig
from ..errors import ConfigError, UnknownMethodError
from ..pattern_file import PatternFile, is_pattern_path
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method, registered_methods
# Registration order is listing order: the controls first, then the methods.
from .dense import DenseConfig, DensePlanner  # isort: skip
from .random import RandomConfig, RandomPlanner  # isort: skip
from .oracle import OracleConfig, OraclePlanner  # isort: skip
from .window import WindowConfig, WindowPlanner  # isort: skip
from .gna import GnaConfig, GnaPlanner  # isort: skip
from .clear import ClearConfig, ClearPlanner  # isort: skip
from .adaspa import AdaSpaConfig, AdaSpaPlanner  # isort: skip
from .xattention import XAttentionConfig, XAttentionPlanner  # isort: skip
from .svg2 import Svg2Config, Svg2Planner  # isort: skip
from .vmoba import VmobaConfig, VmobaPlanner  # isort: skip

DEFAULT_METHOD = "window"

__all__ = [
    "DEFAULT_METHOD",
    "AdaSpaConfig",
    "AdaSpaPlanner",
    "ClearConfig",
    "ClearPlanner",
    "DenseConfig",
    "DensePlanner",
    "GnaConfig",
    "GnaPlanner",
    "OracleConfig",
    "OraclePlanner",
    "PlanContext",
    "Planner",
    "RandomConfig",
    "RandomPlanner",
    "Svg2Config",
    "Svg2Planner",
    "VmobaConfig",
    "VmobaPlanner",
    "WindowConfig",
    "WindowPlanner",
    "XAttentionConfig",
    "XAttentionPlanner",
    "build_planner",
    "keep_text_and_diagonal",
    "list_methods",
    "register_method",
    "resolve",
    "resolve_config",
]


def list_methods() -> list[str]:
    """Names of every registered method."""
    return list(registered_methods())


def _planner_class(name: str) -> type[Planner]:
    methods = registered_methods()
    if name not in methods:
        raise UnknownMethodError(f"unknown sparse attention method {name!r}; valid methods: {', '.join(methods)}")
    return methods[name]


def resolve_config(spec: str | SparseAttentionConfig | os.PathLike | None = None, **overrides: Any) -> SparseAttentionConfig:
    """Turn what a user passed into a validated config.

    Args:
        spec: a method name, a config object, or None for the default method (`window`).
        **overrides: config fields to set, e.g. `dense_steps=0.3, block_size=128`.
    """
    if spec is None:
        spec = DEFAULT_METHOD
    if isinstance(spec, SparseAttentionConfig):
        _planner_class(spec.method)
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, PatternFile) or _names_a_file(spec):
        raise ConfigError(
            f"{spec!r} is a pattern file, which carries tensors a config cannot hold: pass it to "
            "enable_sparse_attention or SparseAttention, or use sparse_dit.patterns.resolve"
        )
    if not isinstance(spec, str):
        raise ConfigError(f"spec must be a method name, a config object or None, got {type(spec).__name__}")
    if spec not in registered_methods() and spec.endswith(".json"):
        raise ConfigError(
            f"{spec!r} looks like a file, not a method name; pattern files are .safetensors files written by "
            f"PatternFile.save. Valid methods: {', '.join(list_methods())}"
        )
    config_cls = _planner_class(spec).config_cls
    unknown = sorted(set(overrides) - set(config_cls.option_names()))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for method {spec!r}; valid options: {', '.join(config_cls.option_names())}")
    try:
        return config_cls(**overrides)
    except TypeError as exc:  # a wrong type that dataclass construction itself rejects
        raise ConfigError(f"invalid options for method {spec!r}: {exc}") from exc


def _names_a_file(spec: Any) -> bool:
    """Whether `spec` names a pattern file; a registered method's name never does, whatever is on disk."""
    return is_pattern_path(spec) and not (isinstance(spec, str) and spec in registered_methods())


def resolve(spec: str | SparseAttentionConfig | PatternFile | os.PathLike | None = None,
            **overrides: Any) -> tuple[SparseAttentionConfig, PatternFile | None]:
    """Like `resolve_config`, and also accepts a pattern file (a path or a loaded `PatternFile`): its method
    and options give the config (`overrides` on top), and the file is returned for the planner."""
    if _names_a_file(spec):
        spec = PatternFile.load(spec)
    if isinstance(spec, PatternFile):
        config = resolve_config(spec.method, **{**spec.options, **overrides})
        _planner_class(spec.method).check_pattern(spec)
        return config, spec
    return resolve_config(spec, **overrides), None


def build_planner(config: SparseAttentionConfig, pattern: PatternFile | None = None) -> Planner:
    """A fresh planner for `config`, reading `pattern` if given."""
    return _planner_class(config.method)(config, pattern)
