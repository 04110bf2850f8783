"""The planner protocol: what a method sees of one attention call, and what it must return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Hashable, Literal

import torch

from ..config import SparseAttentionConfig
from ..errors import ShapeError
from ..plan import AttentionPlan

TextPosition = Literal["prefix", "suffix", "none"]


@dataclass(frozen=True)
class PlanContext:
    """Where an attention call sits: the token layout of its sequence and its place in the model and run.

    Attributes:
        grid: (F, H, W) video token grid after patching, tokens in f-major order (F = 1 for images).
        text_len: number of non-video tokens (text, image conditioning) in the joint sequence.
        text_position: "prefix" ([text | video]), "suffix" ([video | text]) or "none".
        batch, heads: B and H of the call.
        layer: index of the self-attention layer (None outside a model).
        step, num_steps: denoising step index and count (None when unknown).
        device: where the plan's tensors should live.
    """

    grid: tuple[int, int, int]
    text_len: int = 0
    text_position: TextPosition = "none"
    batch: int = 1
    heads: int = 1
    layer: int | None = None
    step: int | None = None
    num_steps: int | None = None
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or any(int(n) < 1 for n in self.grid):
            raise ShapeError(f"grid must be three positive sizes (F, H, W), got {self.grid}")
        if self.text_len < 0:
            raise ShapeError(f"text_len must be >= 0, got {self.text_len}")
        if self.text_len > 0 and self.text_position not in ("prefix", "suffix"):
            raise ShapeError(f"text_len={self.text_len} needs text_position 'prefix' or 'suffix', got {self.text_position!r}")

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

    def text_token_mask(self) -> torch.Tensor:
        """bool (S,), True at text tokens."""
        mask = torch.zeros(self.seq_len, dtype=torch.bool, device=self.device)
        if self.text_len:
            if self.text_position == "prefix":
                mask[: self.text_len] = True
            else:
                mask[self.num_video_tokens :] = True
        return mask


class Planner:
    """Base of every method: subclasses set `name`, `config_cls` and implement `plan`.

    A planner is built once per enabled model (or per functional call) from its config, and may keep state
    across calls (k-means centroids, cached search results) keyed by layer.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[SparseAttentionConfig]]
    description: ClassVar[str] = ""

    def __init__(self, config: SparseAttentionConfig) -> None:
        self.config = config

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext) -> AttentionPlan:
        """Plan one call. q, k: (B, S, H, D) after the model's norms and RoPE."""
        raise NotImplementedError

    def cache_key(self, ctx: PlanContext) -> Hashable | None:
        """A key under which the plan may be reused across calls, or None to plan every call.

        Static methods key on the token layout only; dynamic ones return None (or key on a step bucket).
        """
        return None

    def reset(self) -> None:
        """Forget per-run state; called at the end of every pipeline call."""


def keep_text_and_diagonal(layout: torch.Tensor, ctx: PlanContext, block_size: int) -> torch.Tensor:
    """The rules every fixed-block plan obeys, applied in place of trusting each method.

    Text queries attend every key, every query attends every text key, and each query block keeps its own
    diagonal block, so no softmax row is empty. layout: bool (B', H', n, n) over blocks of `block_size`.
    """
    n = layout.shape[-1]
    layout = layout | torch.eye(n, dtype=torch.bool, device=layout.device)
    if ctx.text_len:
        text_blocks = _blocks_touching(ctx.text_token_mask(), block_size)
        layout = layout | text_blocks.view(1, 1, n, 1) | text_blocks.view(1, 1, 1, n)
    return layout


def _blocks_touching(token_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool (n,): blocks of `block_size` that contain at least one True token."""
    pad = (-token_mask.numel()) % block_size
    padded = torch.nn.functional.pad(token_mask, (0, pad))
    return padded.view(-1, block_size).any(dim=1)


_REGISTRY: dict[str, type[Planner]] = {}


def register_method(cls: type[Planner]) -> type[Planner]:
    """Class decorator that makes a planner available by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def registered_methods() -> dict[str, type[Planner]]:
    """name -> planner class, in registration order."""
    return dict(_REGISTRY)

