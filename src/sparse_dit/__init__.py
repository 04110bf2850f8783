"""sparse-dit: training-free sparse attention for diffusers video and image Diffusion Transformers.

    import sparse_dit                        # adds the pipeline methods below
    pipe.enable_sparse_attention("window")   # a method name or a config object
    video = pipe(prompt, ...).frames
    pipe.disable_sparse_attention()          # back to the exact dense model
"""

from .attention import SparseAttention
from .config import SparseAttentionConfig
from .errors import (
    ConfigError,
    DiffusersCompatibilityError,
    ShapeError,
    SparseDiTError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .functional import sparse_attention
from .patterns import DenseConfig, Planner, WindowConfig, list_methods, register_method, resolve_config
from .demo import load_demo_pipeline
from .pattern_file import PatternFile
from .plan import AttentionPlan, PlanContext
from .state import SiteState
from .plugin import (
    AttentionStats,
    disable_sparse_attention,
    enable_sparse_attention,
    install_pipeline_methods,
    model_signature,
    sparse_attention_config,
    sparse_attention_stats,
)

__version__ = "0.1.0"

install_pipeline_methods()

__all__ = [
    "AttentionPlan",
    "AttentionStats",
    "ConfigError",
    "DenseConfig",
    "DiffusersCompatibilityError",
    "PatternFile",
    "PlanContext",
    "Planner",
    "ShapeError",
    "SiteState",
    "SparseAttention",
    "SparseAttentionConfig",
    "SparseDiTError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "WindowConfig",
    "disable_sparse_attention",
    "enable_sparse_attention",
    "list_methods",
    "load_demo_pipeline",
    "model_signature",
    "register_method",
    "resolve_config",
    "sparse_attention",
    "sparse_attention_config",
    "sparse_attention_stats",
]
