"""The planner protocol: what a method sees of one attention call, and what it must return.

A method is a `Planner` subclass with a config dataclass, registered by name:

    @register_method
    class MyPlanner(Planner):
        name = "mine"
        config_cls = MyConfig          # a SparseAttentionConfig subclass with method = "mine"

        def plan(self, q, k, ctx, state):
            ...                        # -> AttentionPlan

See docs/adding_a_method.md.
"""

from __future__ import annotations

import inspect
from typing import ClassVar, Hashable

import torch

from ..config import SparseAttentionConfig
from ..errors import ConfigError
from ..pattern_file import PatternFile
from ..plan import AttentionPlan, PlanContext
from ..state import SiteState

class Planner:
    """Base of every method: subclasses set `name`, `config_cls` and implement `plan`.

    A planner is built once per enabled model (or `SparseAttention` object) from its config. What it
    remembers between calls lives in the `SiteState` it is handed, one per (site, CFG branch) and pipeline
    call, never on the planner itself: Wan 2.2's two experts and the cond and uncond branches then never
    mix, and nothing leaks into the next pipeline call.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[SparseAttentionConfig]]
    description: ClassVar[str] = ""
    # Per-site tensors this method reads from a pattern file ("{site}/{name}"); empty: it reads no files.
    pattern_tensors: ClassVar[tuple[str, ...]] = ()
    # Whether `plan` needs every head of a call at once (one mask pooled over heads): under Ulysses context
    # parallelism a process holds some of the heads, so such a method is refused there (ring keeps all heads).
    needs_all_heads: ClassVar[bool] = False

    def __init__(self, config: SparseAttentionConfig, pattern: PatternFile | None = None) -> None:
        self.config = config
        if pattern is not None:
            self.check_pattern(pattern)
        self.pattern = pattern

    @classmethod
    def check_pattern(cls, pattern: PatternFile) -> None:
        """Raise `ConfigError` if `pattern` is not a file this method reads (methods add value checks)."""
        if pattern.method != cls.name:
            raise ConfigError(f"the pattern file is for method {pattern.method!r}, not {cls.name!r}")
        if not cls.pattern_tensors:
            raise ConfigError(f"method {cls.name!r} reads no pattern file; pass its name and options instead")
        unknown = sorted({name.rsplit("/", 1)[-1] for name in pattern.tensors} - set(cls.pattern_tensors))
        if unknown:
            raise ConfigError(f"the pattern file holds tensors {unknown} that {cls.name!r} does not read; it reads "
                              f"{', '.join(cls.pattern_tensors)} per site")

    def pattern_values(self, ctx: PlanContext, name: str) -> list[float] | None:
        """Per-head values of the pattern tensor `name` at this call's site and step, or None."""
        return None if self.pattern is None else self.pattern.head_values(ctx, name)

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        """Plan one call.

        Args:
            q, k: (B, S, H, D) after the model's norms and RoPE (k may have fewer heads: GQA).
            ctx: where the call sits (grid, text span, site, CFG branch, step, timestep).
            state: this (site, branch)'s memory for the current pipeline call, from `new_state`.
        Returns:
            The plan; its tensors broadcast to (B, H) and live on `ctx.device`.
        """
        raise NotImplementedError

    def new_state(self, ctx: PlanContext) -> SiteState:
        """The empty state of a (site, branch), made at its first call in a pipeline call."""
        return SiteState()

    def cache_key(self, ctx: PlanContext) -> Hashable | None:
        """A key under which the plan may be reused across calls and pipeline calls, or None.

        Static methods key on the token layout only. Dynamic ones return None: their plan is kept in the
        site's state and remade on the steps of the re-plan schedule (`replan_every`, `replan_steps`).
        """
        return None

    def reset(self) -> None:
        """Called at the end of every pipeline call, after every site's state is dropped."""


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
    """Class decorator that makes a planner available by its `name` to `enable_sparse_attention`,
    `sparse_attention`, `SparseAttention` and `sparse-dit eval`.

    Raises:
        ConfigError: the class is not a complete planner, or another class already has its name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Planner)):
        raise ConfigError(f"register_method decorates Planner subclasses, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{cls.__name__}.name must be an identifier-like string, got {name!r}")
    config_cls = getattr(cls, "config_cls", None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, SparseAttentionConfig)) or config_cls.method != name:
        raise ConfigError(
            f"{cls.__name__}.config_cls must be a SparseAttentionConfig dataclass whose `method` is {name!r}, got {config_cls!r}"
        )
    if cls.plan is Planner.plan:
        raise ConfigError(f"{cls.__name__} must implement plan(q, k, ctx, state)")
    if len(inspect.signature(cls.plan).parameters) != 5:
        raise ConfigError(f"{cls.__name__}.plan must take (self, q, k, ctx, state), got {inspect.signature(cls.plan)}")
    existing = _REGISTRY.get(name)
    # Re-importing the defining module (a notebook cell run twice) re-registers the same class.
    if existing is not None and existing.__qualname__ + existing.__module__ != cls.__qualname__ + cls.__module__:
        raise ConfigError(f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; pick another name")
    _REGISTRY[name] = cls
    return cls


def registered_methods() -> dict[str, type[Planner]]:
    """name -> planner class, in registration order."""
    return dict(_REGISTRY)

