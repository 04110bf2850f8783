"""`svg2`: Sparse VideoGen2's semantic-aware permutation (arXiv 2505.18875, the anchor's "SAP" pattern).

Per (batch row, head), at every plan (every `replan_every` steps) it does:

1. k-means (Euclidean) on the video queries into `Cq` clusters and, separately, on the video keys into `Ck`
   clusters. The first sparse step of a site starts from random tokens and runs `kmeans_iter_init`
   iterations; later steps start from the site's cached centroids and run `kmeans_iter_step`.
2. Centroid attention: query cluster i's estimated share of mass in key cluster j. SVG2 (its Eq. 1-2,
   `estimate="centroids"`) scores the query centroid against the key centroids, a softmax weighted by the key
   clusters' sizes: P[i, j] = |K_j| exp(c_q,i . c_k,j * scale) / sum_l |K_l| exp(c_q,i . c_k,l * scale). The
   default (`estimate="queries"`) takes that softmax for every query of cluster i and averages it over the
   cluster (`query_probabilities`): the softmax of the mean query is not the mean of the queries' softmaxes,
   and on a trained model the centroid estimate is far too confident (see `Svg2Config.estimate`).
3. Per query cluster, the key clusters in descending P until they hold `top_p` of it (the top one always,
   at least `min_kc_ratio` of the clusters); or, with `density`, until they hold that share of the video keys.
4. Queries are permuted so that each query cluster is one contiguous block (`plan.order`, `plan.q_bounds`),
   keys and values so that each key cluster is one (`plan.k_order`, `plan.k_bounds`); the layout holds the
   kept (query cluster, key cluster) pairs. Blocks are the clusters themselves, unpadded. Kernels un-permute
   the output.

Why two orders. A plan with one token order for queries and keys can make either the query clusters or the
key clusters contiguous, not both: sorting by (query cluster, key cluster) is exact but cuts keys into up to
Cq x Ck pieces (about one token each at the anchor's 300 x 1000 clusters on 75k tokens), which no block
kernel runs fast; clustering queries and keys alike (one partition) is what SVG2's App. D.3 measures as
clearly worse. Attention sums over keys, so permuting keys apart from queries changes nothing but which block
a key falls in; `AttentionPlan.k_order` carries it, and every backend applies it in `kernels.layout.permute`.

Text (joint attention) is one block of its own on both axes, kept in its place (first for a prefix, last for
a suffix): its row and column are always computed, as every plan keeps them. Clustering sees video tokens only.

Cluster counts scale with the video tokens N unless given: Cq = round(N / q_cluster_tokens) and
Ck = round(N / k_cluster_tokens), 256 and 75 tokens per cluster by default, the anchor's 300 query and 1000
key clusters on Wan 2.1's 720p grid (21 x 45 x 80 = 75,600 tokens: 252 and 75.6 tokens each); HunyuanVideo's
720p (33 x 45 x 80) then gets 464 and 1584, the demo's 16 x 16 x 16 gets 16 and 55. Clusters are capped at N.

Unlike the anchor (which asserts one CFG row), batches of any size work: every row and head clusters on its own,
and the state is per (site, CFG branch), so cond and uncond keep their own centroids.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from ..config import SparseAttentionConfig, is_int, is_number
from ..errors import ConfigError
from ..ops import kmeans_assign, kmeans_update, top_p_select
from ..plan import AttentionPlan
from ..state import SiteState
from .base import PlanContext, Planner, register_method

# Tokens per cluster behind the default counts: the anchor's Wan 2.1 720p script (qc 300, kc 1000 on 75,600).
Q_CLUSTER_TOKENS = 256
K_CLUSTER_TOKENS = 75
# How a query cluster's mass per key cluster is estimated (`Svg2Config.estimate`).
ESTIMATES = ("queries", "centroids")


@dataclass(frozen=True)
class Svg2Config(SparseAttentionConfig):
    """Config of the `svg2` method. `block_size` is unused: the blocks are the clusters.

    Attributes:
        num_q_centroids: query clusters per (row, head); None: round(N / q_cluster_tokens) for N video tokens.
        num_k_centroids: key clusters per (row, head); None: round(N / k_cluster_tokens).
        q_cluster_tokens: mean tokens per query cluster when num_q_centroids is None (the anchor's Wan 720p
            300 clusters are 252 tokens each; SVG2 App. D: at least 64 per query cluster).
        k_cluster_tokens: mean tokens per key cluster when num_k_centroids is None (Wan 720p: 1000 clusters,
            75.6 tokens each).
        top_p: each query cluster keeps the key clusters of highest estimated mass until they hold this share
            of it; 1.0 keeps every key cluster (dense).
        density: if set, each query cluster instead keeps the key clusters of highest estimated mass until
            they hold this share of the video keys (the top one always); `top_p` is then unused. Text is on top.
        min_kc_ratio: at least ceil(min_kc_ratio * Ck) key clusters per query cluster (the anchor: 0.10).
        estimate: how a query cluster's mass per key cluster is estimated. "queries" (default): the size-weighted
            softmax over the key centroids taken for every query and averaged over its cluster
            (`query_probabilities`). "centroids": SVG2's Eq. 1-2, taken once at the query centroid
            (`centroid_probabilities`), what the anchor computes. On the demo model at 32 frames (8,192 tokens) the
            centroid estimate believes its top-p 0.9 choice holds 0.90-0.99 of each head's mass where the exact
            attention keeps 0.46-0.85 (first sparse step, every layer and head), most of all in the concentrated
            heads whose query clusters mix queries that attend different places; it then computes 0.170 of the map
            at 28.0 dB PSNR against dense, 2.5 dB below random blocks at that density. Averaged over the queries it
            computes 0.244 at 35.9 dB, 3.7 dB above random (3 prompts, 20 steps). It costs N x Ck x D per head,
            the price of one k-means assignment of the keys.
        kmeans_iter_init: k-means iterations at a site's first plan, from random tokens. 10, not the anchor's 50:
            warm starts refine the centroids at every later plan, and on the demo model at 32 frames the 50
            iterations alone cost a third of the sparse attention time; no PSNR is lost at 10 (36.2-36.5 dB against
            35.9 at 50).
        kmeans_iter_step: k-means iterations at later plans, from the site's cached centroids. 1, not the
            anchor's 2, and plans every `replan_every` = 2 steps, not every step (SVG2 plans every step): on the
            demo model at 32 frames each halves the planning cost at no loss of PSNR, and with 10 initial
            iterations clustering and planning take 14% of the sparse attention time (39% at the anchor's 50, 2 and
            every step). At these defaults (3 prompts, 20 steps, 8,192 tokens), PSNR against dense and against
            random blocks at the same density: top_p 0.8 -> density 0.186, 33.5 dB (random 30.8); 0.9 -> 0.250,
            36.5 dB (random 32.4); 0.95 -> 0.312, 39.5 dB (random 33.7).
        scale: the softmax scale of the centroid scores, default D ** -0.5 (the model's attention scale).
        seed: seeds the random initial centroids, together with the call site.
    """

    method: ClassVar[str] = "svg2"
    num_q_centroids: int | None = None
    num_k_centroids: int | None = None
    q_cluster_tokens: int = Q_CLUSTER_TOKENS
    k_cluster_tokens: int = K_CLUSTER_TOKENS
    top_p: float = 0.9
    density: float | None = None
    min_kc_ratio: float = 0.10
    estimate: str = "queries"
    kmeans_iter_init: int = 10
    kmeans_iter_step: int = 1
    replan_every: int = 2
    scale: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_q_centroids", "num_k_centroids"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                raise ConfigError(f"{name}={value!r} is out of range: expected None (scaled to the video tokens) or an int >= 1")
        for name in ("q_cluster_tokens", "k_cluster_tokens", "kmeans_iter_init", "kmeans_iter_step"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise ConfigError(f"{name}={value!r} is out of range: expected an int >= 1")
        if not (is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p={self.top_p!r} is out of range: expected a cumulative share in (0, 1] (1.0 keeps every key cluster)")
        if self.density is not None and not (is_number(self.density) and 0.0 < self.density <= 1.0):
            raise ConfigError(f"density={self.density!r} is out of range: expected None (use top_p) or a fraction of the video keys in (0, 1]")
        if not (is_number(self.min_kc_ratio) and 0.0 <= self.min_kc_ratio <= 1.0):
            raise ConfigError(f"min_kc_ratio={self.min_kc_ratio!r} is out of range: expected a fraction of the key clusters in [0, 1]")
        if self.estimate not in ESTIMATES:
            raise ConfigError(f"estimate={self.estimate!r} is not one of {', '.join(map(repr, ESTIMATES))}: 'queries' "
                              "averages every query's estimate over its cluster, 'centroids' is SVG2's estimate at the "
                              "query centroid")
        if self.scale is not None and not (is_number(self.scale) and self.scale > 0):
            raise ConfigError(f"scale={self.scale!r} must be None (D ** -0.5) or a positive number")
        if not is_int(self.seed):
            raise ConfigError(f"seed={self.seed!r} must be an int")

    def cluster_counts(self, num_video_tokens: int) -> tuple[int, int]:
        """(Cq, Ck) for N video tokens: the given counts or N / tokens-per-cluster, each in [1, N]."""
        n = num_video_tokens
        cq = self.num_q_centroids if self.num_q_centroids is not None else round(n / self.q_cluster_tokens)
        ck = self.num_k_centroids if self.num_k_centroids is not None else round(n / self.k_cluster_tokens)
        return min(max(1, cq), n), min(max(1, ck), n)


class Clusters(NamedTuple):
    """A k-means result over BH independent rows.

    labels: long (BH, N), each point's cluster; centroids: float32 (BH, C, D), the means of the clusters
    `labels` define (an empty cluster keeps its previous centroid); sizes: long (BH, C), points per cluster.
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    sizes: torch.Tensor


def random_centroids(x: torch.Tensor, count: int, generator: torch.Generator, *, heads: int | None = None,
                     heads_of: tuple[int, int] | None = None) -> torch.Tensor:
    """`count` distinct points of every row, drawn at random: x (BH, N, D) -> float32 (BH, count, D).

    With `heads`, rows b * heads + h take the points at the same positions for every b, so a batch row starts
    from the same positions whatever else is in its batch (a prompt alone or beside others, cond beside uncond).
    `heads_of` = (first, total): the rows' heads are heads first.. of a model with `total` heads (a process's
    share under Ulysses context parallelism); every head's points are drawn and the share kept, so head h starts
    from the same points whichever process holds it.
    """
    bh, n, d = x.shape
    draws = bh if heads is None else heads
    first, total = heads_of if heads_of is not None else (0, draws)
    # Drawn on the CPU so that a seed gives the same points on every device.
    picks = torch.rand(total, n, generator=generator).topk(count, dim=-1).indices[first : first + draws].to(x.device)
    picks = picks.repeat(bh // draws, 1)
    return x.gather(1, picks[..., None].expand(bh, count, d)).float()


def kmeans(x: torch.Tensor, centroids: torch.Tensor, iterations: int) -> Clusters:
    """Batched Euclidean k-means (Lloyd): `iterations` rounds of assignment and centroid update.

    Assignment is `ops.kmeans_assign` (Triton on CUDA where it takes the head dim and dtype, else torch), the
    update `ops.kmeans_update` (a scatter-add on every device).

    Args:
        x: (BH, N, D) points, any float dtype.
        centroids: (BH, C, D) starting centroids (kept in float32).
        iterations: >= 1.
    Returns:
        The last assignment, the centroids it gives (each cluster's mean) and the cluster sizes.
    """
    if iterations < 1:
        raise ConfigError(f"k-means needs at least one iteration, got {iterations}")
    centroids = centroids.float()
    for _ in range(iterations):
        # The Triton kernel takes centroids in the points' dtype; the torch path computes in float32 either way.
        labels = kmeans_assign(x, centroids.to(x.dtype)).long()
        centroids = kmeans_update(x, labels, centroids)
    sizes = torch.zeros(centroids.shape[:2], dtype=torch.long, device=x.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    return Clusters(labels, centroids, sizes)


def centroid_probabilities(q_centroids: torch.Tensor, k_centroids: torch.Tensor, k_sizes: torch.Tensor, scale: float) -> torch.Tensor:
    """SVG2's estimate of each query cluster's attention mass per key cluster (its Eq. 1-2).

    P[i, j] = |K_j| exp(c_q,i . c_k,j * scale) / sum_l |K_l| exp(c_q,i . c_k,l * scale); an empty key cluster gets 0.

    Args:
        q_centroids: float (..., Cq, D); k_centroids: float (..., Ck, D); k_sizes: integer (..., Ck).
    Returns:
        float32 (..., Cq, Ck), rows summing to 1.
    """
    scores = q_centroids.float() @ k_centroids.float().transpose(-1, -2) * scale
    # log |K_j| inside the softmax is the size weighting; log 0 = -inf drops empty clusters exactly.
    return (scores + k_sizes.float().log()[..., None, :]).softmax(dim=-1)


def query_probabilities(queries: torch.Tensor, q_labels: torch.Tensor, q_sizes: torch.Tensor, k_centroids: torch.Tensor,
                        k_sizes: torch.Tensor, scale: float, *, budget: int | None = None) -> torch.Tensor:
    """Each query cluster's mass per key cluster, estimated per query and averaged over the query cluster.

    P[i, j] = mean over queries q of cluster i of |K_j| exp(q . c_k,j * scale) / sum_l |K_l| exp(q . c_k,l * scale):
    SVG2's size-weighted softmax over the key centroids (`centroid_probabilities`), taken for every query and
    averaged, instead of taken once at the query centroid. softmax(mean q) is not the mean of softmax(q): a query
    cluster of queries that each attend a few different key clusters (local attention over a cluster spread
    across the frame) looks, at its centroid, as if all of it attended the few clusters its mean query prefers,
    so the top-p choice keeps far less mass than it believes. Costs N x Ck x D per head, as much as one k-means
    assignment of the keys: about 1 / (tokens per key cluster x density) of the sparse attention's Q.K work,
    5% at the default 75 tokens and density 0.25. An empty query cluster gets a row of zeros.

    Args:
        queries: float (BH, N, D), the video queries; q_labels: long (BH, N); q_sizes: integer (BH, Cq);
        k_centroids: float (BH, Ck, D); k_sizes: integer (BH, Ck).
        budget: (query, key cluster) scores held at once, rows taken in chunks under it; default 4M floats on
            the CPU (cache-sized), 64M on other devices.
    Returns:
        float32 (BH, Cq, Ck), rows summing to 1 (0 for an empty cluster).
    """
    bh, n, _ = queries.shape
    cq, ck = q_sizes.shape[-1], k_centroids.shape[-2]
    log_sizes = k_sizes.float().log()[:, None, :].expand(bh, 1, ck)
    keys_t = k_centroids.float().transpose(-1, -2)
    total = torch.zeros(bh, cq, ck, dtype=torch.float32, device=queries.device)
    if budget is None:
        budget = 1 << 22 if queries.device.type == "cpu" else 1 << 26
    step = max(1, budget // max(1, bh * ck))
    for start in range(0, n, step):
        part = queries[:, start : start + step].float()
        probs = torch.baddbmm(log_sizes, part, keys_t, alpha=scale).softmax(dim=-1)  # (BH, n', Ck)
        labels = q_labels[:, start : start + step]
        total.scatter_add_(1, labels[..., None].expand(-1, -1, ck), probs)
    return total / q_sizes.clamp(min=1).float()[..., None]


def select_key_clusters(probs: torch.Tensor, top_p: float, min_kc_ratio: float = 0.0, *,
                        k_sizes: torch.Tensor | None = None, density: float | None = None) -> torch.Tensor:
    """The key clusters each query cluster keeps.

    Ranked by `probs`, a query cluster keeps the fewest key clusters whose probabilities reach `top_p` (all of
    them at 1.0), or with `density` the fewest whose sizes reach that share of the keys; the top cluster always,
    and at least ceil(min_kc_ratio * Ck) clusters. Ties are ranked by index.

    Args:
        probs: float (..., Cq, Ck), rows summing to 1 (`centroid_probabilities`).
        k_sizes: integer (..., Ck), needed with `density`.
    Returns:
        bool (..., Cq, Ck).
    """
    ck = probs.shape[-1]
    if density is not None:
        if k_sizes is None:
            raise ConfigError("selecting key clusters by density needs the key cluster sizes (k_sizes)")
        index = probs.argsort(dim=-1, descending=True, stable=True)
        sizes = k_sizes[..., None, :].expand(probs.shape).gather(-1, index).double()
        before = sizes.cumsum(dim=-1) - sizes  # keys in the clusters ranked above each one
        keep_sorted = before < density * k_sizes.sum(dim=-1, keepdim=True)[..., None].double() - 1e-9
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, index, keep_sorted)
    elif top_p >= 1.0:
        # Every cluster, not "those whose probabilities reach 1": an underflowed probability would drop one.
        keep = torch.ones(probs.shape, dtype=torch.bool, device=probs.device)
    else:
        keep = top_p_select(probs, top_p)
    forced = math.ceil(min_kc_ratio * ck - 1e-9)
    if forced > 1:
        top = probs.argsort(dim=-1, descending=True, stable=True)[..., :forced]
        keep = keep.scatter(-1, top, True)
    return keep


def cluster_order(labels: torch.Tensor, sizes: torch.Tensor, ctx: PlanContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The token order that makes every cluster contiguous, and the block boundaries in it.

    Video tokens are sorted by cluster (stably, so a cluster keeps raster order); text, if any, is one block
    in its own place: first for a prefix, last for a suffix.

    Args:
        labels: long (B, H, N), each video token's cluster; sizes: long (B, H, C).
    Returns:
        order: long (B, H, S), the token at every permuted position; bounds: long (B, H, C + 1), or C + 2 with
        text, from 0 to S.
    """
    b, h, n = labels.shape
    device, text = labels.device, ctx.text_len
    video = labels.argsort(dim=-1, stable=True) + ctx.video_start
    zero = torch.zeros(b, h, 1, dtype=torch.long, device=device)
    ends = sizes.cumsum(dim=-1)
    if not text:
        return video, torch.cat([zero, ends], dim=-1)
    text_tokens = torch.arange(text, device=device).expand(b, h, text)
    if ctx.text_position == "prefix":
        return torch.cat([text_tokens, video], dim=-1), torch.cat([zero, zero + text, ends + text], dim=-1)
    return torch.cat([video, text_tokens + n], dim=-1), torch.cat([zero, ends, ends[..., -1:] + text], dim=-1)


def cluster_layout(keep: torch.Tensor, ctx: PlanContext) -> torch.Tensor:
    """The block layout of the cluster pairs: bool (B, H, Cq, Ck) -> (B, H, nq, nk), with the text block's row
    and column (placed as `cluster_order` places it) always on."""
    if not ctx.text_len:
        return keep
    pad = (1, 0, 1, 0) if ctx.text_position == "prefix" else (0, 1, 0, 1)
    return torch.nn.functional.pad(keep, pad, value=True)


def _init_generator(seed: int, ctx: PlanContext) -> torch.Generator:
    # crc32, not hash(): str hashes differ between processes.
    where = zlib.crc32(f"{ctx.site}|{ctx.layer}".encode())
    return torch.Generator().manual_seed(seed * 1_000_003 + where)


def _heads_rows(x: torch.Tensor, ctx: PlanContext) -> torch.Tensor:
    """The video tokens of x (B, S, H', D) as (B * H', N, D) rows, one per (batch row, head)."""
    b, _, h, d = x.shape
    start = ctx.video_start
    video = x[:, start : start + ctx.num_video_tokens]
    return video.transpose(1, 2).reshape(b * h, ctx.num_video_tokens, d)


def _warm(cached: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> bool:
    return cached is not None and tuple(cached.shape) == shape and cached.device == device


@register_method
class Svg2Planner(Planner):
    """Clusters queries and keys per (row, head) every plan, keeps the key clusters of highest centroid mass,
    and runs attention on the cluster blocks; centroids are warm-started per (site, CFG branch)."""

    name = "svg2"
    config_cls = Svg2Config
    description = ("Sparse VideoGen2: per-head k-means of queries and keys, top-p key clusters by centroid "
                   "attention, attention on the permuted cluster blocks")

    def cluster(self, x: torch.Tensor, count: int, cached: torch.Tensor | None, ctx: PlanContext) -> Clusters:
        """k-means of the video tokens of x (B, S, H', D) into `count` clusters per (row, head), warm-started
        from `cached` (B, H', count, D) when it fits. Returns Clusters over (B, H') with the leading dims kept."""
        b, _, h, d = x.shape
        rows = _heads_rows(x, ctx)
        if _warm(cached, (b, h, count, d), x.device):
            found = kmeans(rows, cached.reshape(b * h, count, d), self.config.kmeans_iter_step)
        else:
            group = ctx.heads // h  # > 1 for the keys of grouped-query attention
            heads_of = (ctx.head_offset // group, ctx.all_heads // group)
            start = random_centroids(rows, count, _init_generator(self.config.seed, ctx), heads=h, heads_of=heads_of)
            found = kmeans(rows, start, self.config.kmeans_iter_init)
        return Clusters(found.labels.view(b, h, -1), found.centroids.view(b, h, count, d), found.sizes.view(b, h, count))

    def decide(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> tuple[Clusters, Clusters, torch.Tensor]:
        """Cluster queries and keys (warm-started from, and cached into, `state`) and choose the kept pairs.

        Args:
            q: (B, S, H, D); k: (B, S, Hk, D) with H a multiple of Hk.
        Returns:
            the query clusters over (B, H), the key clusters over (B, H) (a key head's shared by its query
            heads), and keep: bool (B, H, Cq, Ck), the kept (query cluster, key cluster) pairs.
        """
        config = self.config
        cq, ck = config.cluster_counts(ctx.num_video_tokens)
        with torch.no_grad():
            qc = self.cluster(q, cq, state.centroids, ctx)
            kc = self.cluster(k, ck, state.extra.get("k_centroids"), ctx)
            state.centroids, state.extra["k_centroids"] = qc.centroids, kc.centroids
            group = q.shape[2] // k.shape[2]
            if group > 1:  # grouped-query attention: each key head's clusters serve its query heads
                kc = Clusters(*(x.repeat_interleave(group, dim=1) for x in kc))
            scale = config.scale if config.scale is not None else q.shape[-1] ** -0.5
            if config.estimate == "centroids":
                probs = centroid_probabilities(qc.centroids, kc.centroids, kc.sizes, scale)
            else:
                probs = query_probabilities(_heads_rows(q, ctx), qc.labels.flatten(0, 1), qc.sizes.flatten(0, 1),
                                            kc.centroids.flatten(0, 1), kc.sizes.flatten(0, 1), scale)
                probs = probs.view(*qc.sizes.shape, -1)
            keep = select_key_clusters(probs, config.top_p, config.min_kc_ratio, k_sizes=kc.sizes, density=config.density)
        return qc, kc, keep

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        qc, kc, keep = self.decide(q, k, ctx, state)
        return cluster_plan(qc, kc, keep, ctx, self.config.block_size)


def cluster_plan(q_clusters: Clusters, k_clusters: Clusters, keep: torch.Tensor, ctx: PlanContext,
                 block_size: int = 64) -> AttentionPlan:
    """The plan of kept cluster pairs: queries and keys each permuted into contiguous clusters, one block per
    cluster (zero-length for an empty one) plus one text block, the layout `keep` plus text's row and column.

    Args:
        q_clusters, k_clusters: labels (B, H, N) and sizes (B, H, C) of the video queries and keys.
        keep: bool (B, H, Cq, Ck).
    """
    order, q_bounds = cluster_order(q_clusters.labels, q_clusters.sizes, ctx)
    k_order, k_bounds = cluster_order(k_clusters.labels, k_clusters.sizes, ctx)
    return AttentionPlan(seq_len=ctx.seq_len, layout=cluster_layout(keep, ctx), block_size=block_size,
                         q_bounds=q_bounds, k_bounds=k_bounds, order=order, k_order=k_order)


__all__ = [
    "Clusters", "ESTIMATES", "Svg2Config", "Svg2Planner", "centroid_probabilities", "cluster_layout", "cluster_order",
    "cluster_plan", "kmeans", "query_probabilities",
    "random_centroids", "select_key_clusters",
]
