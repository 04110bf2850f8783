"""Per-enable state: the method, where the denoising loop is, the current token grid, and the stats."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..attention import SparseAttention
from ..config import SparseAttentionConfig
from ..errors import ShapeError, SparseDiTError
from ..pattern_file import PatternFile
from ..plan import AttentionPlan, PlanContext, TextPosition
from ..stats import AttentionStats


@dataclass
class ForwardState:
    """What the root hook learned before the current transformer forward."""

    grid: tuple[int, int, int]
    step: int | None
    num_steps: int | None
    timestep: float | None
    branch: str | None  # the pipeline's cache-context name: "cond", "uncond", "cond_uncond"


@dataclass(frozen=True)
class AttentionSite:
    """One hooked self-attention module.

    Attributes:
        id: unique across the pipeline: the transformer's component name and the module's name,
            "transformer.blocks.0.attn1" ("transformer_2.blocks.0.attn1" for Wan 2.2's second expert).
        name: the module's name inside its transformer.
        layer: index of the module among its transformer's self-attention modules.
        text_position: where the model puts non-video tokens in the joint sequence.
    """

    id: str
    name: str
    layer: int
    text_position: TextPosition


def _scalar(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else None
    return float(timestep)


class StepTracker:
    """Finds the denoising step index of each transformer call, shared by every transformer of a pipeline.

    Sources, most reliable first: the pipeline's cache context (`step_index`, Wan), the pipeline's current
    timestep looked up in its scheduler's timesteps (every pipeline that sets `_current_timestep`), and, for a
    bare transformer or SD3, counting timestep changes (a rising timestep starts a new run).
    """

    def __init__(self, pipeline: Any = None) -> None:
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.reset()

    def reset(self) -> None:
        self.step: int | None = None
        self._last_t: float | None = None
        self._counted = -1

    def _from_pipeline(self) -> tuple[int, int] | None:
        pipeline = self._pipeline() if self._pipeline is not None else None
        current = getattr(pipeline, "_current_timestep", None)
        timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        if current is None or not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None
        current = torch.as_tensor(current, dtype=torch.float64).flatten()[0]
        hits = torch.isclose(timesteps.detach().cpu().double(), current.cpu(), rtol=0, atol=1e-4).nonzero()
        return (int(hits[0]), timesteps.numel()) if len(hits) else None

    def observe(self, timestep: Any, context: Any) -> tuple[int | None, int | None, bool]:
        """Step index and count of this call, and whether it starts a new run."""
        num_steps = None
        if context is not None and getattr(context, "step_index", None) is not None:
            step, num_steps = context.step_index, context.num_inference_steps
        elif (found := self._from_pipeline()) is not None:
            step, num_steps = found
        else:
            t = _scalar(timestep)
            if t is None:
                step = None
            else:
                if self._last_t is None or t > self._last_t + 1e-6:
                    self._counted = 0
                elif t < self._last_t - 1e-6:
                    self._counted += 1
                self._last_t = t
                step = self._counted
        new_run = self.step is None or (step is not None and step < self.step)
        self.step = step
        return step, num_steps, new_run


class SparseAttentionRuntime:
    """Everything one `enable_sparse_attention` call set up, shared by its hooks.

    Args:
        config: the method and policy.
        pipeline: the pipeline whose scheduler tells the step index, if a pipeline was hooked.
        pattern: the pattern file the method reads, if one was enabled.
    """

    def __init__(self, config: SparseAttentionConfig, pipeline: Any = None, pattern: PatternFile | None = None) -> None:
        self.config = config
        self.engine = SparseAttention(config, pattern=pattern)
        self.attached: list[weakref.ref] = []  # the pipeline and transformers that carry this runtime
        self.models: dict[str, weakref.ref] = {}  # component name ("transformer", "transformer_2") -> transformer
        self.parallel_checked: dict[tuple, Any] = {}  # (parallel config, component) -> its checked split (plugin.parallel)
        self.steps = StepTracker(pipeline)
        self.current: ForwardState | None = None
        # Called as observer(site, ctx, q, k, scale) before every self-attention call: how offline tools
        # (sparse_dit.search.capture) read the model's real q and k without a method of their own.
        self.observers: list[Callable[[AttentionSite, PlanContext, torch.Tensor, torch.Tensor, float | None], None]] = []

    @property
    def stats(self) -> AttentionStats:
        """What the hooked attention computed in the current (or last) pipeline call."""
        return self.engine.stats

    # Python bookkeeping on scalars (the step from the scheduler's timesteps): compiled, it would break the
    # graph at every `.item()`; kept out of it, a whole-model compile breaks once, before the first block.
    @torch.compiler.disable
    def begin_forward(self, grid: tuple[int, int, int], timestep: Any, context: Any) -> None:
        """Called by the root hook before every transformer forward."""
        step, num_steps, new_run = self.steps.observe(timestep, context)
        if new_run:
            self.stats.clear()
            self.engine.reset()
        self.current = ForwardState(grid=grid, step=step, num_steps=num_steps, timestep=_scalar(timestep),
                                    branch=getattr(context, "name", None))

    def end_run(self) -> None:
        """Called when the pipeline resets stateful hooks at the end of a call."""
        self.steps.reset()
        self.engine.reset()
        self.current = None

    def attend(
        self,
        site: AttentionSite,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        dense: Callable[[], torch.Tensor],
        head_offset: int = 0,
        total_heads: int | None = None,
        gather_heads: Callable[[AttentionPlan, list[float]], list[float]] | None = None,
    ) -> torch.Tensor:
        """Run one self-attention call of `site`. q, k, v: (B, S, H, D); `dense` computes it unchanged.

        Under Ulysses context parallelism q, k, v hold the model's heads `head_offset` to `head_offset + H - 1`
        of `total_heads`, and `gather_heads` completes the per-head densities (see `SparseAttention.attend`).
        """
        ctx = self.context(site, q, head_offset=head_offset, total_heads=total_heads)
        if self.observers and ctx.all_heads != ctx.heads:
            raise SparseDiTError("attention capture (sparse_dit.search) needs every head in one process; "
                                 "run it without context parallelism")
        for observer in self.observers:
            observer(site, ctx, q, k, scale)
        return self.engine.attend(q, k, v, ctx, scale=scale, attn_mask=attn_mask, dense=dense, gather_heads=gather_heads)

    def context(self, site: AttentionSite, q: torch.Tensor, *, seq_len: int | None = None, head_offset: int = 0,
                total_heads: int | None = None) -> PlanContext:
        """The `PlanContext` of a call of `site` on q (B, S, H, D) in the current forward.

        `seq_len` is the length of the whole sequence where q holds a shard of it (ring attention); default S.
        """
        state = self.current
        if state is None:
            raise SparseDiTError(
                f"{site.name} ran outside a forward of its hooked transformer, so its token grid is unknown; "
                "call the transformer (or pipeline), not the attention module"
            )
        b, s, h, _ = q.shape
        s = s if seq_len is None else seq_len
        f, hh, ww = state.grid
        text_len = s - f * hh * ww
        if text_len < 0 or (text_len > 0 and site.text_position == "none"):
            raise ShapeError(
                f"{site.name}: attention over S={s} tokens does not fit the token grid {state.grid} "
                f"({f * hh * ww} tokens) with text {'none' if site.text_position == 'none' else site.text_position}; "
                "the model's adapter in sparse_dit.pipelines does not describe this input"
            )
        return PlanContext(
            grid=state.grid, text_len=text_len, text_position=site.text_position if text_len else "none",
            batch=b, heads=h, layer=site.layer, site=site.id, branch=state.branch, step=state.step,
            num_steps=state.num_steps, timestep=state.timestep, device=q.device, head_offset=head_offset,
            total_heads=total_heads,
        )
