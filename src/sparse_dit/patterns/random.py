"""`random`: the control every method must beat. Key blocks picked at random at a given density per head.

Paired with a method in evaluation: its `density_table` holds that method's measured density per
(step, layer, head), so the comparison isolates *which* blocks a method picks from *how many*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Hashable

import torch

from ..config import SparseAttentionConfig
from ..errors import ConfigError
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method

DensityTable = tuple[tuple[int, int, tuple[float, ...]], ...]


@dataclass(frozen=True)
class RandomConfig(SparseAttentionConfig):
    """Config of the `random` method.

    Attributes:
        density: target fraction of key blocks per query row, used where `density_table` has no entry.
        density_table: ((step, layer, (density of head 0, head 1, ...)), ...), usually the measured densities
            of the method this control is paired with.
        seed: seeds the choice together with step and layer, so a run is reproducible.
    """

    method: ClassVar[str] = "random"
    density: float = 0.2
    density_table: DensityTable = ()
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density={self.density!r} is out of range: expected a fraction in (0, 1]")
        object.__setattr__(self, "density_table", check_density_table(self.density_table))


def check_density_table(table) -> DensityTable:
    """Normalise ((step, layer, per-head densities), ...) to ints and floats; raise on a density outside [0, 1]."""
    table = tuple((int(s), int(l), tuple(float(d) for d in ds)) for s, l, ds in table)
    if any(not 0.0 <= d <= 1.0 for _, _, ds in table for d in ds):
        raise ConfigError("density_table densities must be fractions in [0, 1]")
    return table


def head_densities(table: dict[tuple[int, int], tuple[float, ...]], ctx: PlanContext, default: float) -> list[float]:
    """The densities `table` ({(step, layer): per-head densities}) gives this call, else `default` for every head."""
    per_head = table.get((ctx.step, ctx.layer))
    if per_head is None or len(per_head) != ctx.heads:
        return [default] * ctx.heads
    return list(per_head)


@register_method
class RandomPlanner(Planner):
    """Keeps round(density * n^2) blocks per head: the diagonal, then blocks drawn at random; text blocks on top."""

    name = "random"
    config_cls = RandomConfig
    description = "random key blocks at a given density per head: the control every method must beat"

    def __init__(self, config: RandomConfig) -> None:
        super().__init__(config)
        self._table = {(s, l): ds for s, l, ds in config.density_table}

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        bs = self.config.block_size
        n = -(-ctx.seq_len // bs)
        # Arithmetic, not hash(): hash(None) differs between processes on Python 3.11.
        step, layer = -1 if ctx.step is None else ctx.step, -1 if ctx.layer is None else ctx.layer
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + (step + 1) * 10_007 + layer + 1)
        scores = torch.rand(ctx.heads, n * n, generator=gen)
        scores[:, torch.arange(n) * (n + 1)] = 2.0  # the diagonal is always among the kept blocks
        # A count per head over the whole map, not per row: matches the paired density even when n is small.
        keep = torch.tensor([max(n, min(n * n, round(d * n * n))) for d in head_densities(self._table, ctx, self.config.density)])
        ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
        layout = (ranks < keep.view(-1, 1)).view(1, ctx.heads, n, n).to(ctx.device)
        layout = keep_text_and_diagonal(layout, ctx, bs)
        return AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs)

    def cache_key(self, ctx: PlanContext) -> Hashable:
        return (ctx.step, ctx.layer, ctx.heads, ctx.grid, ctx.text_len, ctx.text_position, ctx.device)
