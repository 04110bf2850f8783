"""Offline tools that read a model's real attention: capture sampled rows, measure locality."""

from .capture import AttentionSample, capture_attention
from .locality import window_mass

__all__ = ["AttentionSample", "capture_attention", "window_mass"]
