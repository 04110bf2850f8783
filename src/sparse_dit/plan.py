"""`PlanContext` and `AttentionPlan`: what a method sees of one attention call, and what it decides.

Methods *plan*, kernels *execute*: a plan holds, per batch row and head, an optional token order, block
boundaries, the set of (query block, key block) pairs to compute, a per-head mode and the Q·K arithmetic.
Leading dimensions of every tensor field are (B', H') with B' in {1, B} and H' in {1, H}, so a static plan
shared by every batch row and head is stored once and broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch

from .errors import ShapeError

TextPosition = Literal["prefix", "suffix", "none"]
# The classifier-free-guidance branch of a call, as diffusers pipelines name their cache contexts: "cond" and
# "uncond" for one branch per call (Wan, Flux, HunyuanVideo, QwenImage), "cond_uncond" for both in one batch
# (CogVideoX, LTX, Mochi: rows [uncond..., cond...]), None when unknown (no CFG, SD3, a bare transformer).
Branch = Literal["cond", "uncond", "cond_uncond"]

HEAD_DENSE = 0
HEAD_SPARSE = 1
HEAD_SKIP = 2  # Sparse-vDiT: a skipped head outputs zeros
QUANT_MODES = ("none", "int8", "int4")


@dataclass(frozen=True)
class AttentionPlan:
    """The sparse attention of one call.

    Attributes:
        seq_len: S, the number of tokens (text included) the plan covers.
        layout: bool (B', H', nq, nk); True where query block i computes against key block j.
        block_size: fixed block size in tokens for queries and keys (the last block may be short). Ignored
            along an axis whose variable boundaries are given.
        q_bounds: optional long (B', H', nq + 1), variable query-block boundaries in [0, S], starting at 0 and
            ending at S (SVG2's cluster sizes).
        k_bounds: optional long (B', H', nk + 1), the same for key blocks.
        order: optional long (B', H', S), a permutation applied to queries, keys and values before the block
            layout is read; the output is returned in the original order.
        k_order: optional long (B', H', S), the permutation of keys and values where it differs from the
            queries' (SVG2 clusters queries and keys apart, so a query cluster and a key cluster are each one
            contiguous block); `order` then permutes the queries alone (None: queries stay in place). Attention
            is a sum over keys, so the keys' order changes nothing but which block each key falls in.
        head_mode: optional int8 (B', H'): HEAD_DENSE, HEAD_SPARSE or HEAD_SKIP; None means every head sparse.
        quant: Q·K arithmetic: "none", "int8" or "int4" (per-block scales); P·V stays in the input dtype.
        cache: what kernels derive from the plan (block masks, indices), kept with it so a cached plan
            is never converted twice.
    """

    seq_len: int
    layout: torch.Tensor
    block_size: int = 64
    q_bounds: torch.Tensor | None = None
    k_bounds: torch.Tensor | None = None
    order: torch.Tensor | None = None
    k_order: torch.Tensor | None = None
    head_mode: torch.Tensor | None = None
    quant: Literal["none", "int8", "int4"] = "none"
    # Backend-derived data (a FlexAttention BlockMask, a CSR index) built once per plan and device. Not an init
    # field, so `dataclasses.replace` gives the new plan an empty cache instead of the old plan's block groups.
    cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layout.dtype != torch.bool or self.layout.dim() != 4:
            raise ShapeError(f"plan layout must be a bool (B, H, nq, nk) tensor, got {self.layout.dtype} {tuple(self.layout.shape)}")
        if self.quant not in QUANT_MODES:
            raise ShapeError(f"plan quant must be one of {QUANT_MODES}, got {self.quant!r}")
        nq, nk = self.layout.shape[-2:]
        for name, bounds, n in (("q_bounds", self.q_bounds, nq), ("k_bounds", self.k_bounds, nk)):
            if bounds is None:
                expected = -(-self.seq_len // self.block_size)
                if n != expected:
                    raise ShapeError(
                        f"plan layout has {n} blocks along one axis but S={self.seq_len} in blocks of "
                        f"{self.block_size} needs {expected}; pass {name} for variable blocks"
                    )
            elif bounds.shape[-1] != n + 1:
                raise ShapeError(f"{name} must have nblocks + 1 = {n + 1} entries, got {bounds.shape[-1]}")
        for name, order in (("order", self.order), ("k_order", self.k_order)):
            if order is not None and order.shape[-1] != self.seq_len:
                raise ShapeError(f"plan {name} must have S={self.seq_len} entries, got {order.shape[-1]}")

    @property
    def key_order(self) -> torch.Tensor | None:
        """The permutation applied to keys and values: `k_order`, else `order`; long (B', H', S) or None."""
        return self.k_order if self.k_order is not None else self.order

    @property
    def num_blocks(self) -> tuple[int, int]:
        """(nq, nk), the number of query and key blocks."""
        return self.layout.shape[-2], self.layout.shape[-1]

    def block_lengths(self, axis: Literal["q", "k"]) -> torch.Tensor:
        """Token count of every block along `axis`: long (B', H', n) or (1, 1, n) for fixed blocks."""
        bounds = self.q_bounds if axis == "q" else self.k_bounds
        if bounds is not None:
            return bounds.diff(dim=-1)
        starts = torch.arange(0, self.seq_len, self.block_size, device=self.layout.device)
        return (torch.clamp(starts + self.block_size, max=self.seq_len) - starts).view(1, 1, -1)

    def token_block_index(self, axis: Literal["q", "k"]) -> torch.Tensor:
        """Block index of every (permuted) token position along `axis`: long (B', H', S) or (1, 1, S).

        Positions are in the axis's own order: `order` for queries, `k_order` (or `order`) for keys."""
        bounds = self.q_bounds if axis == "q" else self.k_bounds
        positions = torch.arange(self.seq_len, device=self.layout.device)
        if bounds is None:
            return (positions // self.block_size).view(1, 1, -1)
        inner = bounds[..., 1:-1].contiguous()
        return torch.searchsorted(inner, positions.expand(*inner.shape[:-1], -1).contiguous(), right=True)

    def head_densities(self) -> torch.Tensor:
        """Fraction of the S x S attention map computed, per (batch row, head): float (B', H')."""
        lq = self.block_lengths("q").to(torch.float64)
        lk = self.block_lengths("k").to(torch.float64)
        computed = torch.einsum("bhqk,bhq,bhk->bh", self.layout.to(torch.float64), lq.expand(*self.layout.shape[:2], -1), lk.expand(*self.layout.shape[:2], -1))
        density = computed / float(self.seq_len) ** 2
        if self.head_mode is not None:
            mode = self.head_mode.to(density.device)
            density = torch.where(mode == HEAD_DENSE, torch.ones_like(density), density)
            density = torch.where(mode == HEAD_SKIP, torch.zeros_like(density), density)
        return density

    @cached_property
    def density(self) -> float:
        """The fraction of the full attention map this plan computes, averaged over batch rows and heads."""
        return float(self.head_densities().mean())

    def mean_head_densities(self, heads: int) -> list[float]:
        """Computed fraction per head, averaged over batch rows, broadcast to `heads` heads (cached)."""
        key = ("mean_head_densities", heads)
        if key not in self.cache:
            self.cache[key] = self.head_densities().mean(dim=0).expand(heads).tolist()
        return self.cache[key]

    def check_rows(self) -> None:
        """Raise if a sparse head has a query block with no key block (its softmax would be empty)."""
        empty = ~self.layout.any(dim=-1)
        # Not in place: the bounds and head modes may be per head where the layout is shared (H' = 1).
        if self.q_bounds is not None:
            empty = empty & (self.block_lengths("q") > 0)  # zero-length padding blocks may be empty
        if self.head_mode is not None:
            empty = empty & (self.head_mode == HEAD_SPARSE).to(empty.device)[..., None]
        if bool(empty.any()):
            raise ShapeError("plan has a query block that attends no key block; every query block must keep one")

    @classmethod
    def full(cls, seq_len: int, block_size: int, device: torch.device | str | None = None) -> "AttentionPlan":
        """A plan that computes every block: density 1.0."""
        n = -(-seq_len // block_size)
        return cls(seq_len=seq_len, layout=torch.ones(1, 1, n, n, dtype=torch.bool, device=device), block_size=block_size)


@dataclass(frozen=True)
class PlanContext:
    """Where an attention call sits: the token layout of its sequence and its place in the model and run.

    Attributes:
        grid: (F, H, W) video token grid after patching, tokens in f-major order (F = 1 for images).
        text_len: number of non-video tokens (text, image conditioning) in the joint sequence.
        text_position: "prefix" ([text | video]), "suffix" ([video | text]) or "none".
        batch, heads: B and H of the call.
        layer: index of the self-attention layer within its transformer (None outside a model); what the
            `dense_layers` policy reads.
        site: the call site, unique across every transformer of a pipeline ("transformer.blocks.0.attn1",
            "transformer_2.blocks.0.attn1" for Wan 2.2's second expert); None for an anonymous functional call.
            Per-site planner state and pattern files key on it.
        branch: the classifier-free-guidance branch ("cond", "uncond", "cond_uncond"), None when unknown.
        step, num_steps: denoising step index and count (None when unknown).
        timestep: the scheduler's timestep of the call (None when unknown).
        device: where the plan's tensors should live.
        head_offset: global index of the call's first head. Under Ulysses context parallelism a process holds
            `heads` of the model's `total_heads` heads, from this index on; whatever a method keys on a head
            (a random draw, a pattern file's per-head values) uses the global index, so every process plans its
            heads as one process planning all of them would.
        total_heads: the model's heads across processes; None: `heads` (one process holds them all).
    """

    grid: tuple[int, int, int]
    text_len: int = 0
    text_position: TextPosition = "none"
    batch: int = 1
    heads: int = 1
    layer: int | None = None
    site: str | None = None
    branch: Branch | None = None
    step: int | None = None
    num_steps: int | None = None
    timestep: float | None = None
    device: torch.device = torch.device("cpu")
    head_offset: int = 0
    total_heads: int | None = None

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.grid):
            raise ShapeError(f"grid must be three positive ints (F, H, W), got {self.grid}")
        if self.text_len < 0:
            raise ShapeError(f"text_len must be >= 0, got {self.text_len}")
        if self.text_len > 0 and self.text_position not in ("prefix", "suffix"):
            raise ShapeError(f"text_len={self.text_len} needs text_position 'prefix' or 'suffix', got {self.text_position!r}")
        if self.head_offset < 0 or self.head_offset + self.heads > self.all_heads:
            raise ShapeError(f"heads {self.head_offset}..{self.head_offset + self.heads - 1} are not among the model's "
                             f"{self.all_heads} heads (head_offset={self.head_offset}, heads={self.heads})")

    @property
    def all_heads(self) -> int:
        """The model's heads across processes: `total_heads`, else `heads`."""
        return self.heads if self.total_heads is None else self.total_heads

    @property
    def head_slice(self) -> slice:
        """This call's heads among the model's `all_heads`."""
        return slice(self.head_offset, self.head_offset + self.heads)

    @property
    def num_video_tokens(self) -> int:
        """N = F * H * W."""
        f, h, w = self.grid
        return f * h * w

    @property
    def seq_len(self) -> int:
        """S = N + text_len."""
        return self.num_video_tokens + self.text_len

    @property
    def video_start(self) -> int:
        """Index of the first video token in the sequence."""
        return self.text_len if self.text_position == "prefix" else 0

    @property
    def layout_key(self) -> tuple:
        """(grid, text_len, text_position, device): what a plan that depends on the token layout alone keys on."""
        return self.grid, self.text_len, self.text_position, self.device

    @property
    def state_key(self) -> tuple[str | None, str | None]:
        """(site, branch): what per-site planner state is kept under."""
        return self.site, self.branch

    def row_branches(self) -> tuple[str | None, ...]:
        """The CFG branch of every batch row: (B,) labels. Under "cond_uncond" the first half of the rows is
        uncond and the second cond, the order every diffusers pipeline concatenates them in."""
        if self.branch == "cond_uncond" and self.batch % 2 == 0:
            half = self.batch // 2
            return ("uncond",) * half + ("cond",) * half
        return (self.branch,) * self.batch

    def text_token_mask(self) -> torch.Tensor:
        """bool (S,), True at text tokens."""
        mask = torch.zeros(self.seq_len, dtype=torch.bool, device=self.device)
        if self.text_len:
            if self.text_position == "prefix":
                mask[: self.text_len] = True
            else:
                mask[self.num_video_tokens :] = True
        return mask
