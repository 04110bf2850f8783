"""diffusers integration: hooks that learn layer, step, token grid and text span, and the attention interception."""

from .api import (
    disable_sparse_attention,
    enable_sparse_attention,
    install_pipeline_methods,
    sparse_attention_config,
    sparse_attention_stats,
    transformers_of,
)
from ..stats import AttentionStats, LayerStepStats

__all__ = [
    "AttentionStats",
    "LayerStepStats",
    "disable_sparse_attention",
    "enable_sparse_attention",
    "install_pipeline_methods",
    "sparse_attention_config",
    "sparse_attention_stats",
    "transformers_of",
]
