"""Offline tools that read a model's real attention: capture sampled rows, measure locality and concentration."""

from .capture import AttentionSample, capture_attention, run_observed
from .concentration import Concentration, measure_concentration
from .locality import window_mass

__all__ = ["AttentionSample", "Concentration", "capture_attention", "measure_concentration", "run_observed", "window_mass"]
