"""Model adapters for the supported diffusers transformers (and, later, the shipped demo model)."""

from .adapters import ADAPTERS, ModelAdapter, get_adapter, supported_models

__all__ = ["ADAPTERS", "ModelAdapter", "get_adapter", "supported_models"]
