"""Offline tools that read a model's real attention: capture sampled rows and measure their concentration."""

from .capture import AttentionSample, capture_attention, run_observed
from .concentration import Concentration, measure_concentration

__all__ = ["AttentionSample", "Concentration", "capture_attention", "measure_concentration", "run_observed"]
