"""`sparse-dit bench kernels`: dense SDPA against the sparse path, timed in one run, on random block layouts.

With `clusters`, each case also times a variable-block plan of the same density (`clustered_plan`: uneven
query and key clusters, some empty and some single-token, in a random token order, as SVG2 plans them) and
reports its speed per computed (query, key) pair against the fixed-block plan's.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import ConfigError
from ..kernels import flex, gather, varblock
from ..plan import AttentionPlan
from .timing import interleaved_seconds


@dataclass
class KernelCase:
    """One benchmark case and its result (times in milliseconds)."""

    seq: int
    head_dim: int
    heads: int
    density: float
    block: int
    backend: str
    dtype: str
    dense_ms: float = float("nan")
    sparse_ms: float = float("nan")
    speedup: float = float("nan")
    actual_density: float = float("nan")
    bookkeeping_ms: float = float("nan")  # plan-to-kernel conversion once cached: run() minus the bare kernel
    tflops: float | None = None  # sparse path, over the computed blocks (4 * S^2 * D * H * density), on GPU
    dense_tflops: float | None = None  # dense SDPA, 4 * S^2 * D * H, on GPU
    clusters: tuple[int, int] | None = None  # (query, key) clusters of a variable-block plan timed beside; None: none
    varblock_ms: float = float("nan")  # that plan through the same backend (NaN where the backend refuses it)
    varblock_density: float = float("nan")
    varblock_build_ms: float = float("nan")  # the gather path's per-plan index (`varblock.schedule`), not in varblock_ms
    pair_ratio: float = float("nan")  # variable-block (query, key) pairs per second over the fixed-block plan's

    def to_dict(self) -> dict:
        return asdict(self)


def random_plan(seq: int, heads: int, block: int, density: float, generator: torch.Generator) -> AttentionPlan:
    """A plan keeping the same number of key blocks in every query row (the diagonal plus random others)."""
    n = -(-seq // block)
    per_row = max(1, min(n, round(density * n)))
    scores = torch.rand(1, heads, n, n, generator=generator)
    scores[..., torch.arange(n), torch.arange(n)] = 2.0  # the diagonal always wins
    keep = scores.topk(per_row, dim=-1).indices
    layout = torch.zeros(1, heads, n, n, dtype=torch.bool).scatter_(-1, keep, True)
    return AttentionPlan(seq_len=seq, layout=layout, block_size=block)


def uneven_sizes(total: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n cluster sizes summing to `total`, as uneven as k-means leaves them: long (n,).

    Log-normal shares (a spread of about 20x between the 10th and 90th percentile), with one cluster in 16 (at
    least one where n >= 4) empty and as many holding a single token.
    """
    if n == 1:
        return torch.tensor([total])
    shares = torch.randn(n, generator=generator).mul(1.2).exp()
    special = torch.randperm(n, generator=generator)[: 2 * max(1 if n >= 4 else 0, n // 16)]
    empty, single = special[: len(special) // 2], special[len(special) // 2 :]
    shares[special] = 0
    rest = total - len(single)
    sizes = (shares / shares.sum() * rest).floor().long()
    sizes[shares.argmax()] += rest - sizes.sum()  # the rounding remainder to the largest cluster
    sizes[single] = 1
    sizes[empty] = 0
    return sizes


def clustered_plan(seq: int, heads: int, q_clusters: int, k_clusters: int, density: float,
                   generator: torch.Generator) -> AttentionPlan:
    """A variable-block plan as SVG2 makes one: per head, uneven query and key clusters (`uneven_sizes`), queries
    and keys each in a random order of their own (`order`, `k_order`: the sorts by query and by key cluster label),
    and each query cluster keeping random key clusters until they hold `density * seq` tokens (at least one
    non-empty cluster). Its actual density is a little above `density`."""
    def bounds(n: int) -> torch.Tensor:
        sizes = torch.stack([uneven_sizes(seq, n, generator) for _ in range(heads)])
        return torch.nn.functional.pad(sizes.cumsum(-1), (1, 0))[None]  # (1, H, n + 1)

    q_bounds, k_bounds = bounds(q_clusters), bounds(k_clusters)
    k_len = k_bounds.diff(dim=-1)[:, :, None, :].expand(1, heads, q_clusters, k_clusters)
    pick = torch.rand(1, heads, q_clusters, k_clusters, generator=generator).argsort(dim=-1)
    held_before = k_len.gather(-1, pick).cumsum(-1) - k_len.gather(-1, pick)
    keep = held_before < max(1.0, density * seq)  # in pick order: until the kept clusters hold the target
    layout = torch.zeros(1, heads, q_clusters, k_clusters, dtype=torch.bool).scatter_(-1, pick, keep)
    order, k_order = (torch.stack([torch.randperm(seq, generator=generator) for _ in range(heads)])[None] for _ in range(2))
    return AttentionPlan(seq_len=seq, layout=layout, q_bounds=q_bounds, k_bounds=k_bounds, order=order, k_order=k_order)


def bare_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan):
    """The Triton kernel's launch alone (`block_sparse.launcher`), checked bit for bit against `kernels.run`."""
    from ..kernels.triton import block_sparse

    launch = block_sparse.launcher(q, k, v, plan)
    # It must compute what the sparse path does, or its time means nothing (plans with a token order differ).
    if not torch.equal(launch()[0].transpose(1, 2), kernels.run(q, k, v, plan, backend="triton")):
        raise RuntimeError("the bare Triton launch disagrees with kernels.run")
    return launch


def bare_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, backend: str):
    """The kernel call alone, its inputs laid out and its block structure built beforehand (None if unknown).

    The backend is the one `kernels.run` picks for the same call (`kernels.select_backend`), so "auto" times
    the kernel that actually runs.
    """
    backend = kernels.select_backend(plan, q, None, False, backend)
    if plan.q_bounds is not None or plan.k_bounds is not None:
        return None
    if backend == "triton":
        try:
            return bare_triton(q, k, v, plan)
        except Exception as exc:  # a timing aid only: without it the case reports no bookkeeping
            warnings.warn(f"no bare Triton timing: {type(exc).__name__}: {exc}")
            return None
    if backend == "gather":
        blocks, found = gather.block_rows(plan, q, k, v), gather.groups(plan, 1, q.shape[2], q.device)
        return lambda: gather.attend_blocks(*blocks, found, None)
    if backend == "flex":
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        mask, fn = flex.block_mask(plan, q.device), flex.compiled_flex_attention()
        return lambda: fn(qh, kh, vh, block_mask=mask)
    return None


def run_case(case: KernelCase, device: str, reps: int, warmup: int, seed: int = 0) -> KernelCase:
    """Time dense SDPA, the sparse path and its bare kernel on the same inputs, in interleaved rounds, in one process."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    shape = (1, case.seq, case.heads, case.head_dim)
    if torch.device(device).type == "cuda":  # drawn where they are used: on the host, 100s of MB take seconds
        dev_gen = torch.Generator(device).manual_seed(seed)
        q, k, v = (torch.randn(shape, generator=dev_gen, device=device, dtype=dtype) for _ in range(3))
    else:
        q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    plan = random_plan(case.seq, case.heads, case.block, case.density, gen)
    plan = AttentionPlan(seq_len=plan.seq_len, layout=plan.layout.to(device), block_size=plan.block_size)
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    with torch.inference_mode():
        fns = {"dense": lambda: F.scaled_dot_product_attention(qh, kh, vh),
               "sparse": lambda: kernels.run(q, k, v, plan, backend=case.backend)}
        bare = bare_kernel(q, k, v, plan, case.backend)
        if bare is not None:
            fns["bare"] = bare
        var_plan = None
        if case.clusters is not None:
            var_plan = clustered_plan(case.seq, case.heads, *case.clusters, case.density, gen)
            fields = ("layout", "q_bounds", "k_bounds", "order", "k_order")
            var_plan = dataclasses.replace(var_plan, **{f: getattr(var_plan, f).to(device) for f in fields})
            try:
                var_backend = kernels.select_backend(var_plan, q, None, False, case.backend)
            except ConfigError:  # a backend without variable blocks (flex): the case reports NaN there
                var_backend = None
            if var_backend is not None:
                fns["varblock"] = lambda: kernels.run(q, k, v, var_plan, backend=case.backend)
            if var_backend == "gather":  # its per-plan index, built once per plan (timed on a fresh copy each time)
                fns["varblock_build"] = lambda: varblock.schedule(dataclasses.replace(var_plan), 1, case.heads, q.device)
        times = interleaved_seconds(fns, reps, warmup, device)
    dense_s, sparse_s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    case.dense_ms, case.sparse_ms = dense_s * 1e3, sparse_s * 1e3
    # Per-round ratios and differences: a slow round of the shared machine hits every call of that round.
    case.speedup = statistics.median(d / s for d, s in zip(times["dense"], times["sparse"]))
    case.actual_density = plan.density
    case.bookkeeping_ms = (statistics.median(s - b for s, b in zip(times["sparse"], times["bare"])) * 1e3
                           if bare is not None else float("nan"))
    if "varblock" in times:
        case.varblock_ms = statistics.median(times["varblock"]) * 1e3
        case.varblock_density = var_plan.density
        if "varblock_build" in times:
            case.varblock_build_ms = statistics.median(times["varblock_build"]) * 1e3
        # Pairs per second, variable over fixed, per round (same density up to the plans' rounding).
        case.pair_ratio = statistics.median(case.varblock_density / v_s * s_s / plan.density
                                            for v_s, s_s in zip(times["varblock"], times["sparse"]))
    if torch.device(device).type == "cuda":
        flops = 4 * case.seq**2 * case.head_dim * case.heads
        case.tflops = flops * plan.density / sparse_s / 1e12
        case.dense_tflops = flops / dense_s / 1e12
    return case


def cases(seqs, head_dims, densities, blocks, backends, heads: int, dtype: str,
          clusters: tuple[int, int] | None = None) -> list[KernelCase]:
    """The cross product of the requested settings; with `clusters` (query, key), each also times a variable-block plan."""
    clusters = None if clusters is None else tuple(clusters)
    return [
        KernelCase(seq=s, head_dim=d, heads=heads, density=p, block=b, backend=be, dtype=dtype, clusters=clusters)
        for s, d, p, b, be in itertools.product(seqs, head_dims, densities, blocks, backends)
    ]


def format_table(results: list[KernelCase]) -> str:
    """A plain-text table of the results."""
    gpu = any(r.tflops is not None for r in results)
    ms_digits = 3 if gpu else 1  # GPU kernels take fractions of a millisecond
    head = f"{'seq':>6} {'D':>4} {'H':>3} {'block':>5} {'backend':>9} {'density':>7} {'dense ms':>9} {'sparse ms':>9} {'speedup':>7} {'bookkeep':>8}"
    head += f" {'dense TF/s':>10} {'sparse TF/s':>11}" if gpu else ""
    varblock = any(r.clusters is not None for r in results)
    head += f" {'clusters':>9} {'var dens':>8} {'var ms':>9} {'per pair':>8} {'var index ms':>12}" if varblock else ""
    lines = [head, "-" * len(head)]
    for r in results:
        line = (f"{r.seq:>6} {r.head_dim:>4} {r.heads:>3} {r.block:>5} {r.backend:>9} {r.actual_density:>7.3f} "
                f"{r.dense_ms:>9.{ms_digits}f} {r.sparse_ms:>9.{ms_digits}f} {r.speedup:>6.2f}x "
                f"{100 * r.bookkeeping_ms / r.sparse_ms:>7.1f}%")
        line += f" {r.dense_tflops:>10.1f} {r.tflops:>11.1f}" if gpu else ""
        if varblock:
            named = "-" if r.clusters is None else f"{r.clusters[0]},{r.clusters[1]}"
            line += (f" {named:>9} {r.varblock_density:>8.3f} {r.varblock_ms:>9.{ms_digits}f} {r.pair_ratio:>7.2f}x"
                     f" {r.varblock_build_ms:>12.1f}")
        lines.append(line)
    return "\n".join(lines)
