"""`SparseAttention`: the decision every hooked call and every functional call goes through.

Dense (short sequence, kept layer, warm-up step) or the method's plan, cached as the method allows.
"""

from __future__ import annotations

from typing import Hashable

import torch

from .config import SparseAttentionConfig
from .patterns import build_planner
from .patterns.base import PlanContext
from .plan import AttentionPlan


class SparseAttention:
    """One method with its policy, its planner and its plan cache.

    Args:
        config: the method's validated config (see `sparse_dit.patterns.resolve_config`).
    """

    def __init__(self, config: SparseAttentionConfig) -> None:
        self.config = config
        self.planner = build_planner(config)
        self._plans: dict[Hashable, AttentionPlan] = {}

    def dense_reason(self, ctx: PlanContext) -> str | None:
        """Why this call stays dense ("short", "layer", "warmup"), or None if it is planned."""
        if ctx.seq_len < self.config.min_seq_len:
            return "short"
        if ctx.layer is not None and ctx.layer in self.config.dense_layers:
            return "layer"
        if ctx.step is not None and ctx.step < self.config.dense_step_count(ctx.num_steps):
            return "warmup"
        return None

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext) -> AttentionPlan:
        """The method's plan for this call. q, k: (B, S, H, D)."""
        key = self.planner.cache_key(ctx)
        if key is not None and key in self._plans:
            return self._plans[key]
        plan = self.planner.plan(q, k, ctx)
        plan.check_rows()
        if key is not None:
            self._plans[key] = plan
        return plan

    def reset(self) -> None:
        """Drop per-run planner state; static plans stay cached across runs."""
        self.planner.reset()
