"""`dense`: every block computed (density 1.0). The control that proves the sparse path is exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Hashable

import torch

from ..config import SparseAttentionConfig
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, register_method


@dataclass(frozen=True)
class DenseConfig(SparseAttentionConfig):
    """Config of the `dense` method: the shared policy only."""

    method: ClassVar[str] = "dense"


@register_method
class DensePlanner(Planner):
    """Plans every (query block, key block) pair, through the same kernels as the sparse methods."""

    name = "dense"
    config_cls = DenseConfig
    description = "every block computed (density 1.0), through the sparse path"

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        return AttentionPlan.full(ctx.seq_len, self.config.block_size, device=ctx.device)

    def cache_key(self, ctx: PlanContext) -> Hashable:
        return (ctx.seq_len, ctx.device)
