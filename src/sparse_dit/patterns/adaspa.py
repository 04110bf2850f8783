"""`adaspa`: AdaSpa (arXiv 2502.21079), exact block mass searched at a few steps with a cached LSE, reused between.

AdaSpa observes that the block-sparse pattern of a video DiT's attention, and the log-sum-exp (LSE) of its rows,
depend on the input, layer and head but hardly on the denoising step. So instead of estimating a pattern at every
step, it runs a *precise* search at a few steps and reuses the chosen key blocks in between:

1. **Search** (at the first sparse step): compute the LSE of dense attention once and cache it
   (`SiteState.lse`; on CPU found on the way of the mass pass), and the exact attention mass of every
   (query block, key block) pair,
   mass[i, j] = sum over rows r of block i, keys c of block j of exp(q_r . k_c * scale - lse_r)
   (`ops.block_attention_mass`, a Triton kernel on CUDA), the paper's "fused LSE-cached search".
2. **Select** per query block ("row-wise", §4.3): the key blocks in descending mass until a cumulative threshold
   is met (`threshold`), or a fixed share of them (`density`, the paper's 1 - sparsity). Budgets are
   head-adaptive (see `head_budgets`): concentrated heads give blocks to flat ones.
3. **Reuse** the indices until the next search step; later searches read the cached LSE instead of recomputing it
   (one pass over Q·K instead of two). The paper's schedule (50 steps, steps 0-9 dense, searches at 10 and 30) is
   `search_steps=(0.6,)`: the first sparse step and 60% of the run. The default searches once, at the first sparse
   step (`search_steps=()`), the paper's own ablation "T_s = {10}" (28.96 dB against 29.07 for {10, 30}).

The schedule trades search cost against density. On CPU the first search is one pass over Q·K that finds each
row's LSE on the way (`block_attention_mass(..., return_lse=True)`), about 1.4 dense attention calls at its site
(8192 tokens, 2 cores; a separate flash LSE pass first made it 2.5); a re-search reads the cached LSE and costs
about the same. On CUDA the LSE pass runs first and the Triton mass kernel reads it, so there the cache saves a
pass at every re-search. Attention sharpens along the run, so a later search keeps fewer blocks. On the demo model at
32 frames (8192 tokens, 20 steps, 3 prompts, `sparse-dit eval`), threshold 0.8: one search keeps 0.216 of the map
at 37.4 dB PSNR against dense (random blocks at that density: 30.3), the paper's two searches 0.186 at 36.7 dB
(random: 30.0), planning taking 34% and 44% of the attention time. The search at step 12 costs 1.5 dense calls
per site and saves about 0.06 of density on each of the 8 steps after it, about 0.5 dense calls: it does not pay
for itself in time, and it buys no quality here (36.7 against 37.4 dB, and 6.7 against 7.1 dB above random).
The default threshold 0.7 with one search keeps 0.172 of the map at 34.8 dB (random: 29.1, +5.7 dB); the paper's
0.9 with two searches kept 0.253 at 40.1 dB (random: 31.3) and ran only 1.48x faster than dense end to end.

How far the pattern moves (`scripts/block_stability.py --num-frames 32`: threshold 0.7, a search at every sparse
step, one prompt): consecutive searches overlap by Jaccard 0.875 (0.82-0.91 per layer) and the previous step's
blocks hold 0.78 of a step's exact mass; against the first search the overlap falls to 0.55 and the first
search's blocks hold 0.70 of the mass, at the last step too. The blocks drift, but the mass they hold does not
fall along the run, which is why one search is enough here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import SparseAttentionConfig, is_number
from ..errors import ConfigError
from ..ops import CHUNK_ROWS, block_attention_mass, top_p_select
from ..plan import AttentionPlan
from ..state import SiteState, SiteStates
from .base import PlanContext, Planner, keep_text_and_diagonal, register_method

# Most elements of one chunk of scores in `dense_lse`: 32 M floats, 128 MB in fp32, whatever S and the head count.
LSE_CHUNK_ELEMENTS = 1 << 25


def _fraction(value: Any, *, open_low: bool = True) -> bool:
    return is_number(value) and (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0)


def check_budget(method: str, threshold: Any, density: Any) -> None:
    """Raise `ConfigError` unless at most one of a cumulative `threshold` and a `density` is set, each in (0, 1]."""
    if threshold is not None and density is not None:
        raise ConfigError(f"{method}: pass either threshold (a cumulative share of each query block's attention) or "
                          f"density (a share of its key blocks), not both; got threshold={threshold!r}, density={density!r}")
    if threshold is not None and not _fraction(threshold):
        raise ConfigError(f"{method}: threshold={threshold!r} is out of range: expected a cumulative share in (0, 1] "
                          "(1.0 keeps every block)")
    if density is not None and not _fraction(density):
        raise ConfigError(f"{method}: density={density!r} is out of range: expected a share of the key blocks in (0, 1]")


def check_scale(method: str, scale: Any) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ConfigError(f"{method}: scale={scale!r} must be None (D ** -0.5) or a positive number")


class ThresholdOrDensity:
    """The budget rule of the configs whose methods keep blocks up to a cumulative `threshold` or a `density`
    (`adaspa`, `xattention`); mixed into a `SparseAttentionConfig` with those two fields and a class attribute
    `default_threshold`."""

    default_threshold: ClassVar[float]

    @property
    def effective_threshold(self) -> float | None:
        """The cumulative threshold in use: `threshold`, `default_threshold` when neither it nor `density` is set,
        else None."""
        if self.density is not None:
            return None
        return self.default_threshold if self.threshold is None else float(self.threshold)


@dataclass(frozen=True)
class AdaSpaConfig(SparseAttentionConfig, ThresholdOrDensity):
    """Config of the `adaspa` method.

    Attributes:
        threshold: each query block keeps the fewest key blocks, in descending exact mass, whose cumulative share
            of its attention reaches this value (per head, moved by `head_adaptive`); 1.0 keeps every block.
            None with `density` None means `default_threshold`, 0.7: on the demo model at 8192 tokens it keeps
            0.172 of the map, 5.7 dB closer to dense than random blocks at that density (module docstring),
            where the paper's 0.9 kept 0.253 and missed 1.5x end to end.
        density: instead of a threshold, each query block keeps max(1, round(d * n)) of its n key blocks, its
            diagonal block among them, d this share per head (moved by `head_adaptive`): the paper's 1 - sparsity
            (its default is 0.2, sparsity 0.8). Pass either `threshold` or `density`, not both.
        head_adaptive: the paper's head-adaptive hierarchical budget (`head_budgets`); False gives every head the
            same threshold or density.
        recall_split: a head whose top blocks (at the reference density) hold more than this share of its attention
            counts as concentrated (the paper's 0.8).
        recall_density: the share of key blocks at which a head's recall is measured in threshold mode (in density
            mode it is `density` itself, as in the paper); 0.2, the paper's base sparsity of 0.8.
        search_steps: when to search again after the first sparse step: floats in (0, 1) are fractions of the run's
            steps (floor(f * num_steps)), ints are step indices. The default () searches once, at the first sparse
            step (the paper's ablation T_s = {10}); the paper's {10, 30} of 50 steps is (0.6,) with
            `dense_steps=0.2`, which on the demo model lowers the density by 0.03 for 1.5 dense calls per site
            (module docstring). A call re-searches once a search step has passed since its last search.
            None: search at every call the shared schedule (`replan_every`, `replan_steps`) makes, which is then
            the search schedule; otherwise those two must stay at their defaults.
        compare_first: also keep the first search's layout per site (one more bool (B, H, n, n) per site and CFG
            branch, as large as the plan) and record each later search's overlap with it; for measurements
            (`scripts/block_stability.py`), off by default.
        scale: the softmax scale of the model's attention, default D ** -0.5.
    """

    method: ClassVar[str] = "adaspa"
    default_threshold: ClassVar[float] = 0.7
    threshold: float | None = None
    density: float | None = None
    head_adaptive: bool = True
    recall_split: float = 0.8
    recall_density: float = 0.2
    search_steps: tuple[float | int, ...] | None = ()
    compare_first: bool = False
    scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget("adaspa", self.threshold, self.density)
        check_scale("adaspa", self.scale)
        for name in ("head_adaptive", "compare_first"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"adaspa: {name}={getattr(self, name)!r} must be True or False")
        if not _fraction(self.recall_split) or self.recall_split >= 1.0:
            raise ConfigError(f"adaspa: recall_split={self.recall_split!r} is out of range: expected a share in (0, 1)")
        if not _fraction(self.recall_density):
            raise ConfigError(f"adaspa: recall_density={self.recall_density!r} is out of range: expected a share in (0, 1]")
        steps = self.search_steps
        if steps is not None:
            steps = (steps,) if isinstance(steps, (int, float)) and not isinstance(steps, bool) else steps
            ok = isinstance(steps, (tuple, list)) and all(
                not isinstance(s, bool) and ((isinstance(s, int) and s >= 0) or (isinstance(s, float) and 0.0 < s < 1.0))
                for s in steps)
            if not ok:
                raise ConfigError(f"adaspa: search_steps={self.search_steps!r} must be None or step indices (ints >= 0) "
                                  "and fractions of the run (floats in (0, 1)), e.g. (0.6,)")
            object.__setattr__(self, "search_steps", tuple(steps))
            if self.replan_every != 1 or self.replan_steps is not None:
                raise ConfigError("adaspa schedules its searches with search_steps (default (): once, at the first "
                                  "sparse step; (0.6,) adds the paper's search at 60% of the run); to schedule them "
                                  "with replan_every or replan_steps instead, pass search_steps=None")


def dense_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, *, chunk_rows: int | None = None) -> torch.Tensor:
    """Log-sum-exp of every row of dense attention's scaled scores, chunk by chunk of query rows.

    Args:
        q, k: (B, S, H, D); k may have fewer heads (grouped-query attention), each serving H / H_k heads.
        scale: softmax scale, default D ** -0.5.
        chunk_rows: query rows per chunk of the torch path; default: on CPU PyTorch's flash kernel (no chunks), elsewhere
            as many rows as keep one chunk at LSE_CHUNK_ELEMENTS floats.
    Returns:
        float32 (B, H, S), natural log, as `kernels.run(..., return_lse=True)` returns it.
    """
    b, s, h, d = q.shape
    if k.shape[2] != h:
        k = k.repeat_interleave(h // k.shape[2], dim=2)
    scale = d**-0.5 if scale is None else scale
    qh, kh = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    if chunk_rows is None and q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        # PyTorch's CPU flash kernel returns the LSE beside the output: half the time of the chunks below (the
        # paper's pass A is such a dense FlashAttention). fp32 inputs, so the LSE matches the fp32 mass pass.
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, kh, scale=scale)[1].float()
    rows = chunk_rows or max(1, min(CHUNK_ROWS, LSE_CHUNK_ELEMENTS // max(1, b * h * s)))
    kt = kh.transpose(-1, -2)
    out = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    for start in range(0, s, rows):
        out[:, :, start : start + rows] = (qh[:, :, start : start + rows] @ kt).mul_(scale).logsumexp(dim=-1)
    return out


def block_row_counts(seq_len: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Tokens in every block of `block_size` (the last may be short): float32 (n,)."""
    starts = torch.arange(0, seq_len, block_size, device=device)
    return (torch.clamp(starts + block_size, max=seq_len) - starts).float()


def select_by_threshold(mass: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
    """Per query block, the fewest key blocks, in descending mass, whose cumulative share of the row reaches its
    threshold: a block is kept when the blocks ranked above it hold less than the threshold. The top block is
    always kept; a threshold of 1.0 (or more) keeps every block, even those whose mass rounds to 0.

    Args:
        mass: float (B, H, nq, nk), non-negative; rows need not sum to 1 (each is divided by its total).
        thresholds: a float, or float (B', H') per head with B' in {1, B}, H' in {1, H}.
    Returns:
        bool (B, H, nq, nk).
    """
    p = torch.as_tensor(thresholds, dtype=torch.float64, device=mass.device)
    p = p.view(*p.shape, 1, 1) if p.dim() == 2 else p
    # In float64, as the per-head budgets are; a threshold of 1 keeps the blocks whose mass rounds to 0 too.
    return top_p_select(mass.double(), p) | (p >= 1.0)


def select_by_count(mass: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per query block, its diagonal block and the key blocks of highest mass, `counts` blocks in all.

    Args:
        mass: float (B, H, n, n), non-negative.
        counts: long (B', H') blocks kept per query block in each head, each in [1, n].
    Returns:
        bool (B, H, n, n).
    """
    n = mass.shape[-1]
    rows = mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    # Shares are at most 1, so +2 ranks the diagonal first without reordering the rest.
    ranks = (rows + 2.0 * torch.eye(n, device=mass.device)).argsort(dim=-1, descending=True).argsort(dim=-1)
    return ranks < counts.to(mass.device).view(*counts.shape, 1, 1)


def head_recall(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Share of a head's attention its row-wise top max(1, round(density * n)) key blocks hold.

    recall = sum of the kept blocks' mass / sum of all mass, over every query block of the head (the paper's
    sum over selected Wsum / sum over all Wsum). mass: float (B, H, n, n) of summed (not averaged) probabilities.
    Returns float (B, H).
    """
    count = max(1, min(mass.shape[-1], round(density * mass.shape[-1])))
    kept = mass.topk(count, dim=-1).values.sum(dim=(-1, -2))
    return kept / mass.sum(dim=(-1, -2)).clamp_min(torch.finfo(mass.dtype).tiny)


def head_budgets(recall: torch.Tensor, base: float, recall_split: float) -> torch.Tensor:
    """AdaSpa's head-adaptive hierarchical budget (§4.2), per batch row.

    With m the number of heads whose recall exceeds `recall_split` (at most floor(H / 2)), the m heads of highest
    recall are concentrated and the m of lowest recall flat. In the paper's sparsity terms, base sparsity s,
    concentrated heads run at s' = (1 + s) / 2 and flat heads at s' = (3s - 1) / 2 (s = 0.8: 0.9 and 0.7), so the
    mean over heads stays s. As a kept share x (density 1 - s, or a cumulative mass threshold) that is

        x_concentrated = x - delta,   x_flat = x + delta,   delta = min(x, 1 - x) / 2,

    which is the paper's formula (delta = (1 - s) / 2 = x / 2) wherever the paper's stays in [0, 1], and keeps x
    in [0, 1] with the mean unchanged where it would not (x > 1/2 would give flat heads more than everything).
    For a threshold the same rule moves the share of mass kept; at x = 1 (dense) nothing moves.

    Args:
        recall: float (B, H), each head's recall at the reference density (`head_recall`).
        base: x, the configured density or threshold.
        recall_split: a head is concentrated when its recall exceeds this.
    Returns:
        float64 (B, H): each head's density or threshold.
    """
    b, h = recall.shape
    delta = min(base, 1.0 - base) / 2.0
    m = ((recall > recall_split).sum(dim=1)).clamp(max=h // 2)  # (B,)
    ranks = recall.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = highest recall
    concentrated = ranks < m[:, None]
    flat = ranks >= h - m[:, None]
    out = torch.full((b, h), float(base), dtype=torch.float64, device=recall.device)
    return out - delta * concentrated.double() + delta * flat.double()


def selection_overlap(before: torch.Tensor, after: torch.Tensor, mass: torch.Tensor) -> dict[str, list[float]]:
    """How far a new search's choice of blocks moved from an older one, per head (averaged over batch rows).

    Args:
        before, after: bool (B, H, n, n), the blocks two searches' plans compute.
        mass: float (B, H, n, n), the new search's mass.
    Returns:
        {"jaccard": |before & after| / |before | after|, "mass_recall": the share of the new search's mass that the
        old blocks hold, i.e. what reusing the old indices would have kept}, each a list of H floats.
    """
    inter = (before & after).sum(dim=(-1, -2)).double()
    union = (before | after).sum(dim=(-1, -2)).double().clamp_min(1.0)
    held = (mass * before).sum(dim=(-1, -2)).double() / mass.sum(dim=(-1, -2)).double().clamp_min(1e-30)
    return {"jaccard": (inter / union).mean(dim=0).tolist(), "mass_recall": held.mean(dim=0).tolist()}


def count_selection(state: SiteState) -> None:
    """Count the selections a site ran in `state.extra["selections"]`; their time is in `AttentionStats.plan_seconds`."""
    state.extra["selections"] = state.extra.get("selections", 0) + 1


def search_log(states: SiteStates) -> dict[tuple[str | None, str | None], list[dict[str, Any]]]:
    """The search records of every (site, CFG branch) that searched, from a `SparseAttention`'s `states`.

    Read them before the pipeline call ends (a `callback_on_step_end` at the last step): the states are dropped with
    it. Each record is what `AdaSpaPlanner.plan` appends to `SiteState.extra["searches"]`.
    """
    def missing(ctx: PlanContext) -> SiteState:  # never called: every key holds a state
        raise KeyError(ctx.state_key)

    log = {}
    for site, branch in states.keys():
        state = states.get(PlanContext(grid=(1, 1, 1), site=site, branch=branch), missing)
        if state.extra.get("searches"):
            log[(site, branch)] = list(state.extra["searches"])
    return log


@register_method
class AdaSpaPlanner(Planner):
    """Exact block mass at a few search steps (dense LSE once, then cached), head-adaptive selection, reused between."""

    name = "adaspa"
    config_cls = AdaSpaConfig
    description = "AdaSpa: exact block mass searched at a few steps with a cached LSE, head-adaptive budgets, reused between"

    def search_points(self, ctx: PlanContext) -> list[int]:
        """The step indices of `search_steps` for this run (fractions resolved against the step count)."""
        points = []
        for value in self.config.search_steps or ():
            if isinstance(value, float):
                total = ctx.num_steps if ctx.num_steps is not None else self.config.num_inference_steps
                if total is None:
                    raise ConfigError(
                        f"adaspa: search_steps holds the fraction {value} but the number of denoising steps is unknown: "
                        "pass num_steps=N to SparseAttention calls, num_inference_steps=N in the config, or step indices")
                value = math.floor(value * total + 1e-9)
            points.append(value)
        return points

    def _fits(self, plan: AttentionPlan | None, ctx: PlanContext) -> bool:
        if plan is None:
            return False
        pb, ph = plan.layout.shape[:2]
        return plan.seq_len == ctx.seq_len and pb == ctx.batch and ph == ctx.heads and plan.layout.device == ctx.device

    def search_due(self, ctx: PlanContext, state: SiteState) -> bool:
        """Whether this call searches (True) or reuses the blocks of the last search."""
        last = state.extra.get("search_step")
        if not self._fits(state.extra.get("search_plan"), ctx) or ctx.step is None or last is None or ctx.step < last:
            return True
        if self.config.search_steps is None:
            return True
        return any(last < point <= ctx.step for point in self.search_points(ctx))

    def search_mass(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> tuple[torch.Tensor, bool]:
        """The summed block mass of this call under the site's LSE (computed now and cached if it has none that
        fits, or if the cached one no longer bounds a row): float32 (B, H, n, n), and whether the LSE is fresh."""
        bs, scale = self.config.block_size, self.config.scale
        b, s, h, _ = q.shape
        if state.lse is not None and tuple(state.lse.shape) == (b, h, s) and state.lse.device == q.device:
            mass = block_attention_mass(q, k, state.lse, bs, scale)
            rows = mass.sum(dim=-1)
            if bool((torch.isfinite(rows) & (rows > 0)).all()):
                return mass, False
        if q.device.type == "cpu":
            # One pass over Q·K that finds the LSE on the way: about 1.4 dense calls, where a flash LSE pass and
            # then the mass pass took 2.5 (8192 tokens, 2 cores). On CUDA the Triton mass kernel reads a given LSE.
            mass, state.lse = block_attention_mass(q, k, None, bs, scale, return_lse=True)
        else:
            state.lse = dense_lse(q, k, scale)
            mass = block_attention_mass(q, k, state.lse, bs, scale)
        return mass, True

    def select(self, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks kept per query block and each head's budget (threshold or density), float64 (B, H).

        mass: float (B, H, n, n) of summed probabilities, from `search_mass`.
        """
        config = self.config
        b, h, n, _ = mass.shape
        threshold = config.effective_threshold
        base = threshold if threshold is not None else float(config.density)
        if config.head_adaptive and h > 1:
            recall = head_recall(mass, config.recall_density if threshold is not None else base)
            budgets = head_budgets(recall, base, config.recall_split)
        else:
            budgets = torch.full((b, h), base, dtype=torch.float64, device=mass.device)
        if threshold is not None:
            return select_by_threshold(mass, budgets), budgets
        counts = (budgets * n).round().clamp(1, n).long()
        return select_by_count(mass, counts), budgets

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        """Search and select (at search steps), or return the last search's plan unchanged.

        A search appends to `state.extra["searches"]` a dict with: step; lse ("fresh" or "cached"); budgets (each
        head's threshold or density, averaged over batch rows); density (the plan's, per head); from the second
        search on, vs_previous, the `selection_overlap` of the previous search's plan layout with this one's (the
        blocks each computes, text and diagonal included), and with `compare_first` vs_first, the same against
        the first search's. `state.extra["selections"]` counts the searches.
        """
        if not self.search_due(ctx, state):
            return state.extra["search_plan"]
        bs = self.config.block_size
        mass, fresh = self.search_mass(q, k, ctx, state)
        selected, budgets = self.select(mass)
        layout = keep_text_and_diagonal(selected, ctx, bs)
        plan = AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs)
        record: dict[str, Any] = {"step": ctx.step, "lse": "fresh" if fresh else "cached",
                                  "budgets": budgets.mean(dim=0).tolist(),
                                  "density": plan.head_densities().mean(dim=0).tolist()}
        previous, first = state.extra.get("search_plan"), state.masks.get("first")
        if previous is not None and previous.layout.shape == layout.shape:
            record["vs_previous"] = selection_overlap(previous.layout, layout, mass)
        if self.config.compare_first:
            if first is not None and first.shape == layout.shape:
                record["vs_first"] = selection_overlap(first, layout, mass)
            else:
                state.masks["first"] = layout
        state.extra.setdefault("searches", []).append(record)
        state.extra["search_plan"], state.extra["search_step"] = plan, ctx.step
        count_selection(state)
        return plan


__all__ = ["AdaSpaConfig", "AdaSpaPlanner", "ThresholdOrDensity", "count_selection", "dense_lse", "head_budgets",
           "head_recall", "search_log", "select_by_count", "select_by_threshold", "selection_overlap"]
