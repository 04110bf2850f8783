"""Context parallelism: sparse attention while diffusers splits each clip's tokens over processes.

`transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))` (or `ring_degree=N`) hands every
attention call of a model with a `_cp_plan` one shard of the token sequence per process. sparse-dit's dispatcher
backend is registered as one that takes part (`supports_context_parallel`) and sends those calls here.

- Ulysses: diffusers' templated attention (`_templated_context_parallel_attention`) trades sequence shards for
  heads with an all-to-all, so its `forward_op` sees the whole sequence, in order, for H/P of the heads. The call
  is planned and run as one process would run those heads: `PlanContext.head_offset` gives every method the global
  head index (random draws, per-head pattern-file values), and the per-head densities are gathered so that the
  stats on every process hold all heads.
- Ring: each process keeps its queries and walks the key shards, merging partial outputs by their log-sum-exp.
  sparse-dit runs this loop itself rather than through diffusers' `TemplatedRingAttention`: planning needs the
  whole q and k (gathered, q only on calls that plan), a plan's key blocks are mapped onto each shard by the
  shards' global offsets (`kernels.lse.shard_attention`), a shard holding no kept block of this process's queries
  is skipped without a kernel call, and the merge takes queries that keep no key of the first shards visited
  (LSE -inf), where diffusers' merge would compute -inf - -inf.

Refused, each with a message that says what to do instead: a model without a `_cp_plan`, a model whose
self-attention joins text to the split video tokens, ring and Ulysses together, Ulysses with a method that plans
from all heads at once (`Planner.needs_all_heads`), ring with a kernel backend that returns no LSE, a model
attention mask under ring, and gradients.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist

from ..attention import sdpa
from ..config import SparseAttentionConfig
from ..errors import ConfigError, SparseDiTError, UnsupportedModelError
from ..kernels import lse as lse_kernels
from ..kernels.capabilities import BACKENDS, backend_capabilities
from ..plan import AttentionPlan
from . import compat
from .runtime import AttentionSite, SparseAttentionRuntime


@dataclass(frozen=True)
class Split:
    """How diffusers splits attention calls over processes, seen from this process.

    Attributes:
        mode: "ulysses" (every process gets all tokens of some heads) or "ring" (some tokens, all heads).
        degree: processes sharing one call.
        rank: this process's index among them.
        group: their process group.
        uneven: `ulysses_anything` / `ring_anything`: heads and tokens need not divide evenly over the processes.
    """

    mode: Literal["ulysses", "ring"]
    degree: int
    rank: int
    group: Any
    uneven: bool


def split_of(parallel_config: Any) -> Split | None:
    """The `Split` of a diffusers `ParallelConfig` (or `ContextParallelConfig`), None without context parallelism.

    Raises:
        ConfigError: ring and Ulysses together (diffusers' unified attention), which sparse-dit does not run.
    """
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    ring, ulysses = getattr(cp, "ring_degree", 1) or 1, getattr(cp, "ulysses_degree", 1) or 1
    if ring == 1 and ulysses == 1:
        return None
    if ring > 1 and ulysses > 1:
        raise ConfigError(
            f"sparse attention under context parallelism takes ring_degree or ulysses_degree, not both (got ring_degree="
            f"{ring}, ulysses_degree={ulysses}); use ContextParallelConfig(ulysses_degree={ring * ulysses}), or "
            f"ring_degree={ring * ulysses}"
        )
    if ulysses > 1:
        mesh, rank, uneven = cp._ulysses_mesh, cp._ulysses_local_rank, cp.ulysses_anything
    else:
        mesh, rank, uneven = cp._ring_mesh, cp._ring_local_rank, cp.ring_anything
    return Split("ulysses" if ulysses > 1 else "ring", max(ring, ulysses), rank,
                 None if mesh is None else mesh.get_group(), bool(uneven))


def _degrees(parallel_config: Any) -> tuple[int, int]:
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    return getattr(cp, "ring_degree", 1) or 1, getattr(cp, "ulysses_degree", 1) or 1


def ring_backends(device: torch.device | str) -> list[str]:
    """The kernel backends that can compute ring attention's key shards on `device` (they return the LSE)."""
    kind = torch.device(device).type
    able = []
    for backend in BACKENDS:
        row = None if backend == "auto" else backend_capabilities(backend, kind)
        # Shards cut blocks at their edges, so a shard's plan has variable blocks and must return its LSE.
        if backend == "auto" or (row is not None and row.lse and row.variable_blocks):
            able.append(backend)
    return able


def supported_models() -> list[str]:
    """Transformer classes sparse attention runs under diffusers' context parallelism: those diffusers gives a
    `_cp_plan` whose self-attention is over the video tokens alone."""
    import diffusers

    from ..pipelines.adapters import ADAPTERS

    return [name for adapter in ADAPTERS if adapter.text_position == "none" for name in adapter.class_names
            if getattr(getattr(diffusers, name, None), "_cp_plan", None) is not None]


def check(config: SparseAttentionConfig, model: torch.nn.Module, parallel_config: Any,
          device: torch.device | str | None = None) -> Split | None:
    """Raise if `config` cannot run on `model` under `parallel_config`; returns the split (None: no context
    parallelism). Checked when sparse attention is enabled on a parallel model and at its first parallel call.

    Raises:
        UnsupportedModelError: the model has no `_cp_plan`, or its self-attention joins text to the video.
        ConfigError: the method or the kernel backend cannot run under this split.
    """
    import diffusers

    from ..patterns import registered_methods
    from ..pipelines.adapters import get_adapter

    ring, ulysses = _degrees(parallel_config)
    if ring == 1 and ulysses == 1:
        return None
    name = type(model).__name__
    if getattr(type(model), "_cp_plan", None) is None:
        raise UnsupportedModelError(
            f"{name} has no `_cp_plan` in diffusers {diffusers.__version__}, so neither diffusers nor sparse-dit "
            "knows how its token sequence is split over processes; sparse attention under context parallelism runs "
            f"on {', '.join(supported_models())}. Run this model on one process per clip"
        )
    if get_adapter(model).text_position != "none":
        raise UnsupportedModelError(
            f"{name}'s self-attention joins text tokens to the video tokens; under context parallelism each "
            "process's text shard lands between video shards, a layout sparse-dit's plans do not describe. "
            f"Sparse attention under context parallelism runs on {', '.join(supported_models())}"
        )
    split = split_of(parallel_config)
    method = registered_methods()[config.method]
    if split.mode == "ulysses" and method.needs_all_heads:
        raise ConfigError(
            f"method {config.method!r} plans from all heads at once, and under Ulysses each process holds "
            f"1/{split.degree} of them; use ContextParallelConfig(ring_degree={split.degree}) instead"
        )
    if split.mode == "ring" and device is not None and config.backend not in ring_backends(device):
        raise ConfigError(
            f"ring attention merges key shards by their log-sum-exp (LSE), which backend {config.backend!r} does not "
            f"return for a shard's blocks on {torch.device(device).type}; use backend="
            f"{' or '.join(repr(b) for b in ring_backends(device))}, or ulysses_degree instead of ring_degree"
        )
    return split


def _model_of(runtime: SparseAttentionRuntime, site: AttentionSite) -> torch.nn.Module | None:
    ref = runtime.models.get(site.id[: -len(site.name) - 1])
    return None if ref is None else ref()


def _checked(runtime: SparseAttentionRuntime, site: AttentionSite, parallel_config: Any, device: torch.device) -> Split:
    """`check` once per (runtime, parallel config, site's model); the split of this call."""
    key = (id(parallel_config), site.id[: -len(site.name) - 1])
    split = runtime.parallel_checked.get(key)
    if split is None:
        model = _model_of(runtime, site)
        if model is None:
            raise SparseDiTError(f"{site.id} is hooked by a runtime that no longer holds its transformer; enable again")
        split = runtime.parallel_checked[key] = check(runtime.config, model, parallel_config, device)
    return split


def _forward_only(*args: Any, **kwargs: Any) -> None:
    raise SparseDiTError("sparse attention under context parallelism computes the forward pass only (inference); "
                         "train with sparse attention on one process, or disable it")


@torch.compiler.disable  # collectives and per-call Python bookkeeping: run eagerly, a graph break for compile
def attend(
    runtime: SparseAttentionRuntime,
    site: AttentionSite,
    dense_backend: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    parallel_config: Any,
) -> torch.Tensor:
    """One self-attention call of `site` under context parallelism. query, key, value: (B, S/P, H, D), this
    process's shard as diffusers split it; returns this process's (B, S/P, H, D) output."""
    split = _checked(runtime, site, parallel_config, query.device)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        _forward_only()
    if runtime.observers:
        raise SparseDiTError("attention capture (sparse_dit.search) needs whole calls in one process; run it "
                             "without context parallelism")
    if split.mode == "ulysses":
        return _ulysses(runtime, site, split, dense_backend, query, key, value, attn_mask, scale, parallel_config)
    return _ring(runtime, site, split, query, key, value, attn_mask, scale)


def head_layout(total: int, split: Split) -> list[int]:
    """Heads per process under Ulysses, as diffusers deals them out: an even share, or with `ulysses_anything`
    the heads padded to a multiple of the degree, the padding taken from the last process."""
    if split.uneven:
        padding = -total % split.degree
        share = (total + padding) // split.degree
        return [share] * (split.degree - 1) + [share - padding]
    if total % split.degree:
        raise ConfigError(f"{total} heads do not split evenly over ulysses_degree={split.degree}; pick a degree that "
                          "divides the heads, or ContextParallelConfig(..., ulysses_anything=True)")
    return [total // split.degree] * split.degree


def _head_gatherer(split: Split, counts: list[int]) -> Callable[[AttentionPlan, list[float]], list[float]]:
    """Per-head densities of this process's heads -> all heads, in head order; every process calls it together.

    The result is kept on the plan. Every process makes and reuses plans on the same calls (one program, the same
    steps, layers and cache keys), so they reach the collective together or all skip it.
    """
    width = max(counts)
    key = ("ulysses_head_densities", split.rank, tuple(counts))

    def gather(plan: AttentionPlan, local: list[float]) -> list[float]:
        found = plan.cache.get(key)
        if found is None:
            buffer = torch.zeros(width, dtype=torch.float64, device=plan.layout.device)
            buffer[: len(local)] = torch.tensor(local, dtype=torch.float64)
            parts = [torch.empty_like(buffer) for _ in counts]
            dist.all_gather(parts, buffer, group=split.group)
            found = plan.cache[key] = [v for part, n in zip(parts, counts) for v in part[:n].tolist()]
        return found

    return gather


def _ulysses(runtime: SparseAttentionRuntime, site: AttentionSite, split: Split, dense_backend: Any,
             query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
             scale: float | None, parallel_config: Any) -> torch.Tensor:
    total = query.shape[2]
    counts = head_layout(total, split)
    offset, mine = sum(counts[: split.rank]), counts[split.rank]
    gather = _head_gatherer(split, counts)
    dispatch = compat.load().dispatch_attention_fn

    def forward_op(ctx, q, k, v, mask, dropout_p, is_causal, op_scale, enable_gqa, return_lse, _save_ctx=True,
                   _parallel_config=None):
        if q.shape[2] != mine:
            raise SparseDiTError(f"diffusers' Ulysses all-to-all gave this process {q.shape[2]} heads where sparse-dit "
                                 f"expected {mine} of {total}; this diffusers version deals heads differently")

        def dense() -> torch.Tensor:  # the model's own backend, on the heads this process holds
            return dispatch(q, k, v, attn_mask=mask, scale=op_scale, backend=dense_backend)

        return runtime.attend(site, q, k, v, attn_mask=mask, scale=op_scale, dense=dense, head_offset=offset,
                              total_heads=total, gather_heads=gather)

    return compat.context_parallel().templated_attention(
        query, key, value, attn_mask, 0.0, False, scale, False, False, forward_op=forward_op,
        backward_op=_forward_only, _parallel_config=parallel_config,
    )


def _gather_tokens(x: torch.Tensor, sizes: list[int], split: Split) -> torch.Tensor:
    """Every process's (B, S_r, ...) shard, concatenated along the tokens: (B, sum(sizes), ...). Shards are padded
    to the longest for the collective and cut back after, so padding never enters the sequence."""
    longest = max(sizes)
    padded = torch.nn.functional.pad(x, (0,) * (2 * (x.dim() - 2)) + (0, longest - x.shape[1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=split.group)
    return torch.cat([part[:, :n] for part, n in zip(parts, sizes)], dim=1)


def _shard_sizes(length: int, split: Split, device: torch.device) -> list[int]:
    if not split.uneven:
        return [length] * split.degree
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(split.degree)]
    dist.all_gather(sizes, torch.tensor([length], dtype=torch.long, device=device), group=split.group)
    return [int(s) for s in sizes]


def _ring(runtime: SparseAttentionRuntime, site: AttentionSite, split: Split, query: torch.Tensor, key: torch.Tensor,
          value: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    if attn_mask is not None:
        raise SparseDiTError("sparse ring attention takes no model attention mask; use ulysses_degree instead of ring_degree")
    engine = runtime.engine
    start = engine._now(query.device)
    sizes = _shard_sizes(query.shape[1], split, query.device)
    starts = [0, *itertools.accumulate(sizes)]
    # K and V of every shard at once, as diffusers' ring ("allgather" rotation) holds them; one collective.
    kv = _gather_tokens(torch.cat([key, value], dim=-1), sizes, split)
    keys, values = kv[..., : key.shape[-1]], kv[..., key.shape[-1] :]
    ctx = runtime.context(site, query, seq_len=starts[-1])
    heads = query.shape[2]
    if engine.dense_reason(ctx) is not None:
        out = sdpa(query, keys, values, scale=scale)
        engine.record(ctx, [1.0] * heads, False, engine._now(query.device) - start)
        return out
    planning = engine._now(query.device)
    plan = engine.ready_plan(ctx)
    if plan is None:  # the method plans this call: it reads the whole q and k, as on one process
        plan = engine.plan(_gather_tokens(query, sizes, split), keys, ctx)
    planned = engine._now(query.device)
    backend, me = runtime.config.backend, split.rank
    parts = []
    for shard in [(me + i) % split.degree for i in range(split.degree)]:  # this process's own shard first
        lo, hi = starts[shard], starts[shard + 1]
        part = lse_kernels.shard_attention(plan, query, keys[:, lo:hi], values[:, lo:hi], starts[me], lo,
                                           backend=backend, scale=scale)
        if part is not None:
            parts.append(part)
    out, _ = lse_kernels.merge(parts)
    engine.record(ctx, plan.mean_head_densities(heads), True, engine._now(query.device) - start, planned - planning)
    return out.to(query.dtype)
