"""`SparseAttention`: the one place where a call is decided, planned, run and recorded.

Both the diffusers hooks and the functional core go through it: dense (short sequence, kept layer, warm-up
step) or the method's plan, cached or reused as the method and the re-plan schedule allow, executed by a
kernel backend, and recorded in `stats`. Used directly it is the stateful form of `sparse_attention`, the
way FlexAttention's `create_block_mask` is reused across `flex_attention` calls.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import kernels
from .config import SparseAttentionConfig
from .errors import ShapeError
from .pattern_file import PatternFile
from .patterns import build_planner, resolve
from .plan import AttentionPlan, Branch, PlanContext, TextPosition
from .state import PlanCache, SiteState, SiteStates, replan_due
from .stats import AttentionStats


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
         attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention on (B, S, H, D) tensors (k, v may have fewer heads), returned as (B, S, H, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


class SparseAttention:
    """One method with its policy, its planner, its per-site state, its plan cache and its stats.

    Args:
        spec: a method name, a config object, a pattern file (a path or a `PatternFile`), or None for the
            default method (see `sparse_dit.patterns.resolve`).
        pattern: a pattern file for the method of a config object `spec`.
        **overrides: the method's options, e.g. `window=(3, 7, 7), block_size=64`.

    Per-site state (`SiteState`, one per (site, CFG branch)) lasts until `reset()`: the hooks call it at the
    end of every pipeline call; a functional user calls it between independent generations. Plans a method
    declares reusable (`Planner.cache_key`) stay in a bounded cache across resets.

    Example:
        >>> attn = SparseAttention("window", window=(3, 7, 7), min_seq_len=0)
        >>> for step in range(num_steps):
        ...     out = attn(q, k, v, grid=(8, 16, 16), layer=0, step=step, num_steps=num_steps)
    """

    def __init__(self, spec: str | SparseAttentionConfig | PatternFile | os.PathLike | None = None, *,
                 pattern: PatternFile | None = None, **overrides: Any) -> None:
        self.config, found = resolve(spec, **overrides)
        self.pattern = pattern if pattern is not None else found
        self.planner = build_planner(self.config, self.pattern)
        self.states = SiteStates()
        self.plans = PlanCache()
        self.stats = AttentionStats()
        self.synchronize = False  # wait for CUDA around each call so `stats.seconds` is true wall time

    def dense_reason(self, ctx: PlanContext) -> str | None:
        """Why this call stays dense ("short", "layer", "warmup"), or None if it is planned."""
        if ctx.seq_len < self.config.min_seq_len:
            return "short"
        if ctx.layer is not None and ctx.layer in self.config.dense_layers:
            return "layer"
        if ctx.step is not None and ctx.step < self.config.dense_step_count(ctx.num_steps):
            return "warmup"
        return None

    def state(self, ctx: PlanContext) -> SiteState:
        """The planner's state at the call's (site, branch), created on first use."""
        return self.states.get(ctx, self.planner.new_state)

    def ready_plan(self, ctx: PlanContext) -> AttentionPlan | None:
        """The plan `plan` would return without calling the planner (cached, or reused by the re-plan schedule),
        or None when the call needs q and k to plan. Ring attention gathers every process's queries only then."""
        key = self.planner.cache_key(ctx)
        if key is not None:
            return self.plans.get(key)
        state = self.state(ctx)
        return None if replan_due(state, ctx, self.config.replan_every, self.config.replan_steps) else state.plan

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext) -> AttentionPlan:
        """The method's plan for this call: cached, reused per the re-plan schedule, or made now. q, k: (B, S, H, D)."""
        key = self.planner.cache_key(ctx)
        if key is not None:
            plan = self.plans.get(key)
            if plan is None:
                plan = self._checked(self.planner.plan(q, k, ctx, self.state(ctx)))
                self.plans.put(key, plan)
            return plan
        state = self.state(ctx)
        if replan_due(state, ctx, self.config.replan_every, self.config.replan_steps):
            state.plan, state.planned_step = self._checked(self.planner.plan(q, k, ctx, state)), ctx.step
        return state.plan

    @staticmethod
    def _checked(plan: AttentionPlan) -> AttentionPlan:
        plan.check_rows()
        return plan

    def _now(self, device: torch.device) -> float:
        if self.synchronize and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: PlanContext,
        *,
        scale: float | None = None,
        attn_mask: torch.Tensor | None = None,
        dense: Callable[[], torch.Tensor] | None = None,
        gather_heads: Callable[[AttentionPlan, list[float]], list[float]] | None = None,
    ) -> torch.Tensor:
        """Decide, plan, run and record one self-attention call.

        Args:
            q, k, v: (B, S, H, D) after the model's norms and RoPE; k, v may have fewer heads (GQA).
            ctx: where the call sits; `ctx.seq_len` must equal S.
            scale: softmax scale, default D ** -0.5.
            attn_mask: optional model mask (bool, True = attend, or additive), broadcastable to (B, H, S, S).
            dense: computes the call unchanged when it stays dense (the model's own attention backend);
                default `F.scaled_dot_product_attention`.
            gather_heads: where the call holds some of the model's heads (`ctx.total_heads`, Ulysses context
                parallelism), turns the plan's per-head densities of these heads into all of the model's, so
                the stats hold every head; all processes call it together.
        Returns:
            (B, S, H, D) in q's dtype.
        """
        kernels.check_inputs(q, k, v)  # the same checks on the dense path as on every kernel backend
        if ctx.seq_len != q.shape[1]:
            raise ShapeError(f"the context covers S={ctx.seq_len} tokens (grid {ctx.grid} + text {ctx.text_len}) but q has S={q.shape[1]}")
        start = planned = self._now(q.device)
        if self.dense_reason(ctx) is not None:
            out = dense() if dense is not None else sdpa(q, k, v, scale=scale, attn_mask=attn_mask)
            heads, sparse = [1.0] * ctx.all_heads, False
        else:
            plan = self.plan(q, k, ctx)
            planned = self._now(q.device)
            out = kernels.run(q, k, v, plan, backend=self.config.backend, scale=scale, attn_mask=attn_mask)
            heads, sparse = plan.mean_head_densities(ctx.heads), True
            if gather_heads is not None:
                heads = gather_heads(plan, heads)
        self.record(ctx, heads, sparse, self._now(q.device) - start, planned - start)
        return out

    def record(self, ctx: PlanContext, heads: list[float], sparse: bool, seconds: float, plan_seconds: float = 0.0) -> None:
        """Add one call to `stats`: the computed fraction of each of the model's heads, whether it ran a plan,
        its time and the part of it spent planning."""
        self.stats.record(ctx.step, ctx.layer, heads, sparse, seconds, ctx.grid, ctx.text_len, ctx.site, plan_seconds)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        grid: tuple[int, int, int] | None = None,
        text_len: int = 0,
        text_position: TextPosition = "prefix",
        layer: int | None = None,
        site: str | None = None,
        branch: Branch | None = None,
        step: int | None = None,
        num_steps: int | None = None,
        timestep: float | None = None,
        scale: float | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sparse self-attention over a video (or image) token sequence; see `sparse_dit.sparse_attention`.

        `site` (default: the layer's name) and `branch` select the per-site state a dynamic method reuses.
        """
        ctx = make_context(q, grid, text_len, text_position, layer=layer, site=site, branch=branch, step=step,
                           num_steps=num_steps, timestep=timestep)
        return self.attend(q, k, v, ctx, scale=scale, attn_mask=attn_mask)

    def reset(self) -> None:
        """End a run: drop every site's state (plans a method declared reusable stay cached)."""
        self.states.clear()
        self.planner.reset()


def make_context(
    q: torch.Tensor,
    grid: tuple[int, int, int] | None,
    text_len: int = 0,
    text_position: TextPosition = "prefix",
    **where: Any,
) -> PlanContext:
    """The `PlanContext` of a functional call on q (B, S, H, D); `where` holds layer, site, branch, step, ...

    The grid defaults to (1, 1, S - text_len), a plain 1-D sequence; an anonymous call's site is its layer.
    """
    if q.dim() != 4:
        raise ShapeError(f"q must be (B, S, H, D), got {tuple(q.shape)}")
    b, s, h, _ = q.shape
    if not 0 <= text_len < s:
        raise ShapeError(f"text_len={text_len} must be in [0, S) for a sequence of S={s} tokens")
    if where.get("site") is None and where.get("layer") is not None:
        where["site"] = f"layer{where['layer']}"
    ctx = PlanContext(
        grid=tuple(grid) if grid is not None else (1, 1, s - text_len),
        text_len=text_len,
        text_position=text_position if text_len else "none",
        batch=b,
        heads=h,
        device=q.device,
        **where,
    )
    if ctx.seq_len != s:
        raise ShapeError(f"grid {ctx.grid} ({ctx.num_video_tokens} tokens) + text_len {text_len} = {ctx.seq_len}, but S = {s}")
    return ctx
