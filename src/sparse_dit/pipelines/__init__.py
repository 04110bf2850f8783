"""Model adapters for the supported diffusers transformers, and loading a pipeline by name."""

from .adapters import ADAPTERS, ModelAdapter, get_adapter, supported_models
from .loading import load_pipeline

__all__ = ["ADAPTERS", "ModelAdapter", "get_adapter", "load_pipeline", "supported_models"]
