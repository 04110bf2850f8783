"""Per (step, layer) record of what the hooked attention computed."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field


@dataclass
class LayerStepStats:
    """Calls of one self-attention layer at one denoising step.

    Attributes:
        calls: attention calls (a CFG pair counts two).
        sparse_calls: calls that ran a plan (the rest stayed dense: warm-up, kept layer, short sequence).
        density_sum: sum over calls of the fraction of the attention map computed (1.0 for dense calls).
        head_density_sum: per head, the sum over calls of its computed fraction (dense calls: 1.0).
        seconds: wall time spent inside attention (on CUDA only meaningful with the runtime's
            `synchronize` on).
        sparse_seconds: the part of `seconds` spent in calls that ran a plan.
        plan_seconds: the part of `sparse_seconds` spent getting the plan (the method's selection work: scoring,
            pooling, clustering, mass; near zero when a cached plan is reused).
        grid: last (F, H, W) token grid seen; text_len: last number of text tokens seen.
        site: the call site (unique across a pipeline's transformers; None for anonymous functional calls).
    """

    calls: int = 0
    sparse_calls: int = 0
    density_sum: float = 0.0
    seconds: float = 0.0
    sparse_seconds: float = 0.0
    plan_seconds: float = 0.0
    head_density_sum: list[float] = field(default_factory=list)
    grid: tuple[int, int, int] | None = None
    text_len: int = 0
    site: str | None = None

    @property
    def density(self) -> float:
        """Mean computed fraction of the attention map over the calls."""
        return self.density_sum / self.calls if self.calls else 1.0

    @property
    def head_densities(self) -> list[float]:
        """Mean computed fraction per head over the calls."""
        return [d / self.calls for d in self.head_density_sum]


class AttentionStats:
    """What the hooked self-attention computed during the last run, keyed by (step, layer).

    `step` is None where the denoising step is unknown (a bare transformer called outside a pipeline loop).
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[int | None, int], LayerStepStats] = {}

    def record(
        self, step: int | None, layer: int, head_densities: list[float], sparse: bool, seconds: float,
        grid: tuple[int, int, int], text_len: int, site: str | None = None, plan_seconds: float = 0.0,
    ) -> None:
        """Add one call, given the computed fraction of each head (averaged over the batch) and, for a sparse
        call, the part of `seconds` spent planning."""
        entry = self.entries.setdefault((step, layer), LayerStepStats())
        if len(entry.head_density_sum) != len(head_densities):
            entry.head_density_sum = [0.0] * len(head_densities)
        entry.head_density_sum = [a + b for a, b in zip(entry.head_density_sum, head_densities)]
        density = sum(head_densities) / len(head_densities)
        entry.calls += 1
        entry.seconds += seconds
        entry.sparse_seconds += seconds if sparse else 0.0
        entry.plan_seconds += plan_seconds
        entry.sparse_calls += int(sparse)
        entry.density_sum += density
        entry.grid, entry.text_len, entry.site = grid, text_len, site

    def clear(self) -> None:
        """Forget every call."""
        self.entries.clear()

    def __getitem__(self, key: tuple[int | None, int]) -> LayerStepStats:
        return self.entries[key]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def calls(self) -> int:
        """Total attention calls."""
        return sum(e.calls for e in self.entries.values())

    @property
    def seconds(self) -> float:
        """Total wall time inside attention."""
        return sum(e.seconds for e in self.entries.values())

    @property
    def plan_share(self) -> float | None:
        """Time spent planning as a share of the time of the calls that ran a plan; None if none did."""
        sparse = sum(e.sparse_seconds for e in self.entries.values())
        return sum(e.plan_seconds for e in self.entries.values()) / sparse if sparse > 0 else None

    def density(self, sparse_only: bool = False) -> float | None:
        """Mean computed fraction over calls (all of them, or only those that ran a plan); None if none."""
        if sparse_only:
            calls = sum(e.sparse_calls for e in self.entries.values())
            total = sum(e.density_sum - (e.calls - e.sparse_calls) for e in self.entries.values())
        else:
            calls = self.calls
            total = sum(e.density_sum for e in self.entries.values())
        return total / calls if calls else None

    def as_records(self) -> list[dict]:
        """One JSON-friendly dict per (step, layer), sorted, with the mean `density`."""
        key = lambda item: (-1 if item[0][0] is None else item[0][0], item[0][1])  # noqa: E731
        return [{"step": s, "layer": l, **asdict(e), "density": e.density, "head_densities": e.head_densities} for (s, l), e in sorted(self.entries.items(), key=key)]

    def snapshot(self) -> "AttentionStats":
        """An independent copy."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return f"AttentionStats(calls={self.calls}, entries={len(self)}, density={self.density()})"
