"""What a method keeps between attention calls: per-site state for one pipeline call, and a bounded plan cache.

Dynamic methods (SVG2's centroids, AdaSpa's searched masks, XAttention's last LSE) need memory per call site
and CFG branch, and must not leak it into the next pipeline call; static methods (a window) reuse one plan
for as long as the token layout holds. The orchestrator (`sparse_dit.attention.SparseAttention`) owns one of
each per enabled model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from .plan import AttentionPlan, PlanContext


@dataclass
class SiteState:
    """A planner's memory at one (site, branch) during one pipeline call.

    Attributes:
        plan: the plan made at `planned_step`, reused by the re-plan schedule until the next re-plan.
        planned_step: the step `plan` was made at (None when the step is unknown).
        centroids: k-means centroids to warm-start the next clustering, e.g. float (B, H, C, D).
        masks: cached block masks or search results, by whatever key the method chooses.
        lse: the log-sum-exp of the method's last search, float (B, H, S).
        extra: anything else the method keeps.
    """

    plan: AttentionPlan | None = None
    planned_step: int | None = None
    centroids: torch.Tensor | None = None
    masks: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    lse: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SiteStates:
    """One `SiteState` per (site, branch), created on first use and dropped together by `clear()`."""

    def __init__(self) -> None:
        self._states: dict[tuple[str | None, str | None], SiteState] = {}

    def get(self, ctx: PlanContext, factory: Callable[[PlanContext], SiteState]) -> SiteState:
        """The state of the call's (site, branch), made by `factory(ctx)` the first time."""
        state = self._states.get(ctx.state_key)
        if state is None:
            state = self._states[ctx.state_key] = factory(ctx)
        return state

    def keys(self) -> list[tuple[str | None, str | None]]:
        """The (site, branch) pairs that hold state."""
        return list(self._states)

    def clear(self) -> None:
        """Forget every site's state (the end of a pipeline call)."""
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)


class PlanCache:
    """Least-recently-used plans by the planner's cache key, at most `capacity` of them.

    Bounded because a key holds the token layout: every new resolution, batch size or device adds entries, and
    a long-lived server would otherwise keep every plan it ever made (and the kernel indices cached on them).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._plans: OrderedDict[Hashable, AttentionPlan] = OrderedDict()

    def get(self, key: Hashable) -> AttentionPlan | None:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key: Hashable, plan: AttentionPlan) -> None:
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self.capacity:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


def replan_due(state: SiteState, ctx: PlanContext, replan_every: int, replan_steps: tuple[int, ...] | None) -> bool:
    """Whether a dynamic method plans this call, or reuses the plan its site made last.

    It plans when it has no plan yet, when the plan no longer fits the call (another sequence, batch, head
    count or device), when the step is unknown, and otherwise on the steps the schedule names: every
    `replan_every` steps since the last plan, or exactly `replan_steps`.
    """
    plan = state.plan
    if plan is None or ctx.step is None or state.planned_step is None:
        return True
    pb, ph = plan.layout.shape[:2]
    if plan.seq_len != ctx.seq_len or pb not in (1, ctx.batch) or ph not in (1, ctx.heads) or plan.layout.device != ctx.device:
        return True
    if replan_steps is not None:
        return ctx.step in replan_steps
    return ctx.step - state.planned_step >= replan_every
