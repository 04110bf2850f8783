"""`random`: the control every method must beat. Key blocks picked at random at a given density per head.

Paired with a method in evaluation: a density pattern (`PatternFile` with a "{site}/density" tensor of
(step buckets, H)) holds that method's measured density per (step, site, head), so the comparison isolates
*which* blocks a method picks from *how many*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Hashable

import torch

from ..config import SparseAttentionConfig
from ..errors import ConfigError
from ..pattern_file import PatternFile
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method

@dataclass(frozen=True)
class RandomConfig(SparseAttentionConfig):
    """Config of the `random` method.

    Attributes:
        density: target fraction of the attention map per head, used where the pattern file (if any) has no
            per-head density for the call.
        seed: seeds the choice together with step and layer, so a run is reproducible.
    """

    method: ClassVar[str] = "random"
    density: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density={self.density!r} is out of range: expected a fraction in (0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an int")


def check_density_pattern(pattern: PatternFile) -> None:
    """Raise unless every "{site}/density" tensor is (step buckets, H) of fractions in [0, 1] (NaN: no entry)."""
    for name, tensor in pattern.tensors.items():
        if tensor.dim() != 2 or tensor.shape[0] > len(pattern.step_buckets):
            raise ConfigError(f"pattern tensor {name!r} must be (step buckets <= {len(pattern.step_buckets)}, heads), "
                              f"got {tuple(tensor.shape)}")
        values = tensor[~tensor.isnan()]
        if bool(((values < 0) | (values > 1)).any()):
            raise ConfigError(f"pattern tensor {name!r} holds densities outside [0, 1]")


@register_method
class RandomPlanner(Planner):
    """Keeps round(density * n^2) blocks per head: the diagonal, then blocks drawn at random; text blocks on top."""

    name = "random"
    config_cls = RandomConfig
    description = "random key blocks at a given density per head: the control every method must beat"

    pattern_tensors = ("density",)  # per site, (step buckets, H): the densities of the method it is paired with

    @classmethod
    def check_pattern(cls, pattern: PatternFile) -> None:
        super().check_pattern(pattern)
        check_density_pattern(pattern)

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        bs = self.config.block_size
        n = -(-ctx.seq_len // bs)
        # Arithmetic, not hash(): hash(None) differs between processes on Python 3.11.
        step, layer = -1 if ctx.step is None else ctx.step, -1 if ctx.layer is None else ctx.layer
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + (step + 1) * 10_007 + layer + 1)
        # Drawn for all of the model's heads and cut to this call's: under Ulysses context parallelism each process
        # then keeps the blocks one process would have kept for the same heads.
        scores = torch.rand(ctx.all_heads, n * n, generator=gen)[ctx.head_slice]
        scores[:, torch.arange(n) * (n + 1)] = 2.0  # the diagonal is always among the kept blocks
        # A count per head over the whole map, not per row: matches the paired density even when n is small.
        keep = torch.tensor([max(n, min(n * n, round(d * n * n))) for d in self.pattern_values(ctx, "density") or [self.config.density] * ctx.heads])
        ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
        layout = (ranks < keep.view(-1, 1)).view(1, ctx.heads, n, n).to(ctx.device)
        layout = keep_text_and_diagonal(layout, ctx, bs)
        return AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs)

    def cache_key(self, ctx: PlanContext) -> Hashable:
        return (ctx.step, ctx.layer, ctx.site, ctx.heads, ctx.head_offset, ctx.all_heads, *ctx.layout_key)
