"""`oracle`: the key blocks of highest exact attention mass, the best any mass-based selector can pick.

A yardstick for evaluation, never a fast path: it computes full attention's probabilities (O(S^2)) to plan.
Paired with a method in evaluation at that method's measured density per (step, site, head), beside
`random`, it shows where the method sits between random blocks and the ideal choice of the same number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import SparseAttentionConfig
from ..errors import ConfigError
from ..ops import top_p_select
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method
from .block_mass import block_mass
from .random import check_density_pattern


@dataclass(frozen=True)
class OracleConfig(SparseAttentionConfig):
    """Config of the `oracle` method.

    Attributes:
        density: share of the key blocks each query block keeps (max(1, round(density * n)) blocks, its
            diagonal block among them), used where the pattern file (if any) has no per-head density.
        mass: if set, each query block instead keeps the fewest key blocks whose exact mass reaches this
            cumulative share (the diagonal block is added if it is not among them); `density` is then unused.
        scale: the softmax scale of the model's attention, default D ** -0.5 (every supported model's).
    """

    method: ClassVar[str] = "oracle"
    density: float = 0.2
    mass: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density={self.density!r} is out of range: expected a fraction in (0, 1]")
        if self.mass is not None and (isinstance(self.mass, bool) or not isinstance(self.mass, (int, float))
                                      or not 0.0 < self.mass <= 1.0):
            raise ConfigError(f"mass={self.mass!r} is out of range: expected None or a cumulative share in (0, 1]")
        if self.scale is not None and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale <= 0):
            raise ConfigError(f"scale={self.scale!r} must be None or a positive number")


def select_top_blocks(mass: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per query block, its own diagonal block and the key blocks of highest mass, `counts` blocks in all.

    Args:
        mass: float (B, H, n, n), rows of block mass.
        counts: long (H,), blocks kept per query block in each head (at least 1).
    Returns:
        bool (B, H, n, n).
    """
    n = mass.shape[-1]
    # Mass is at most 1, so +2 ranks the diagonal first without reordering the rest.
    scores = mass + 2.0 * torch.eye(n, device=mass.device)
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return ranks < counts.to(mass.device).view(1, -1, 1, 1)


def select_by_mass(mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per query block, the fewest key blocks whose mass reaches `threshold`, plus its diagonal block.

    Args:
        mass: float (B, H, n, n), rows summing to 1.
    Returns:
        bool (B, H, n, n).
    """
    return top_p_select(mass, threshold) | torch.eye(mass.shape[-1], dtype=torch.bool, device=mass.device)


@register_method
class OraclePlanner(Planner):
    """Plans from the exact block mass of every call: a yardstick that costs more than dense attention."""

    name = "oracle"
    config_cls = OracleConfig
    description = "key blocks of highest exact attention mass (a yardstick for evaluation, slower than dense)"

    pattern_tensors = ("density",)  # per site, (step buckets, H): the densities of the method it is paired with

    def __init__(self, config: OracleConfig, pattern=None) -> None:
        super().__init__(config, pattern)
        if config.mass is not None and pattern is not None:
            raise ConfigError("pass either mass (a cumulative threshold) or a density pattern (block counts), not both")

    @classmethod
    def check_pattern(cls, pattern) -> None:
        super().check_pattern(pattern)
        check_density_pattern(pattern)

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        bs = self.config.block_size
        mass = block_mass(q, k, bs, self.config.scale)
        if self.config.mass is not None:
            layout = select_by_mass(mass, self.config.mass)
        else:
            n = mass.shape[-1]
            counts = torch.tensor([max(1, min(n, round(d * n))) for d in self.pattern_values(ctx, "density") or [self.config.density] * ctx.heads])
            layout = select_top_blocks(mass, counts)
        layout = keep_text_and_diagonal(layout, ctx, bs)
        return AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs)
