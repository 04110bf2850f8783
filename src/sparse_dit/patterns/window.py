"""`window`: a static 3-D local window of blocks over the (F, H, W) token grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Hashable

import torch

from ..config import SparseAttentionConfig, check_int_tuple
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method
from .geometry import block_boxes, box_gaps, token_coords


@dataclass(frozen=True)
class WindowConfig(SparseAttentionConfig):
    """Config of the `window` method.

    Attributes:
        window: extent (F, H, W) of the neighbourhood in tokens, an int for all three axes, -1 for a whole
            axis. A key block is kept when the bounding boxes of its video tokens and the query block's are
            within `window // 2` tokens of each other on every axis.
    """

    method: ClassVar[str] = "window"
    window: tuple[int, int, int] = (3, 9, 9)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "window", check_int_tuple("window", self.window, 3, minimum=1, allow_full=True))


@register_method
class WindowPlanner(Planner):
    """Keeps, for every query block, the key blocks inside a 3-D neighbourhood; the same for all layers and steps."""

    name = "window"
    config_cls = WindowConfig
    description = "static 3-D local window of blocks over the token grid"

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        bs = self.config.block_size
        lo, hi = block_boxes(token_coords(ctx), bs)
        radius = torch.tensor(
            [(n if w == -1 else w // 2) for w, n in zip(self.config.window, ctx.grid)], device=ctx.device
        )
        layout = (box_gaps(lo, hi) <= radius).all(dim=-1)[None, None]
        layout = keep_text_and_diagonal(layout, ctx, bs)
        return AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs)

    def cache_key(self, ctx: PlanContext) -> Hashable:
        return ctx.layout_key
