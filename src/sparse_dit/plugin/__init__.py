"""diffusers integration: hooks that learn layer, step, token grid and text span, and the attention interception."""

from ..stats import AttentionStats, LayerStepStats
from .api import (
    attention_sites,
    disable_sparse_attention,
    enable_sparse_attention,
    install_pipeline_methods,
    model_signature,
    sparse_attention_config,
    sparse_attention_stats,
    transformers_of,
)

__all__ = [
    "AttentionStats",
    "LayerStepStats",
    "attention_sites",
    "disable_sparse_attention",
    "enable_sparse_attention",
    "install_pipeline_methods",
    "model_signature",
    "sparse_attention_config",
    "sparse_attention_stats",
    "transformers_of",
]
