"""The policy every method shares, as the base of every method's config dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError
from .kernels import BACKENDS


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{name}={value!r} is out of range: expected {expected}")


def _triton_usable() -> bool:
    """CUDA and triton present, or triton's CPU interpreter switched on (how its kernels are tested here)."""
    import importlib.util
    import os

    import torch

    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def is_int(value: Any) -> bool:
    """An int and not a bool: bool is an int to Python, and block_size=True is a mistake, not a block of 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_fraction(value: Any) -> bool:
    """A float in (0, 1]: a size given as a share of an axis, where an int is a size in tokens."""
    return isinstance(value, float) and 0.0 < value <= 1.0


def check_int_tuple(name: str, value: Any, length: int, minimum: int, allow_full: bool = False) -> tuple[int, ...]:
    """Normalise an int or a sequence of ints to a tuple of `length`; -1 means "the whole axis" if allowed."""
    values = (value,) * length if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    ok = len(values) == length and all(is_int(v) and (v >= minimum or (allow_full and v == -1))
                                       for v in values)
    expected = f"an int or {length} ints, each >= {minimum}" + (" or -1 (whole axis)" if allow_full else "")
    _check(ok, name, value, expected)
    return values


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Options every method accepts (keyword overrides to `enable_sparse_attention` land here).

    Attributes:
        dense_steps: leading denoising steps kept dense, as a fraction of the steps (float in [0, 1]) or a
            count (int >= 0). The anchors keep 10-20% (SVG2 20% on Wan, Radial and STA 12 of 50).
        dense_layers: indices of self-attention layers kept dense.
        min_seq_len: attention over fewer tokens than this stays dense; sparse kernels do not pay below it.
        block_size: tokens per query and key block of the plan.
        backend: kernel backend, see `sparse_dit.kernels.run`.
        num_inference_steps: total denoising steps, needed only to turn a fractional `dense_steps` into a
            count when a bare transformer (no pipeline) is hooked.
        replan_every: a dynamic method (one whose plan depends on q and k) plans at its first sparse step and
            then every `replan_every` steps, reusing its plan per (site, CFG branch) in between. 1 plans every
            step. Static methods ignore it.
        replan_steps: the exact steps a dynamic method plans at, instead of `replan_every` (it also plans
            whenever it has no plan that fits the call).
    """

    method: ClassVar[str] = ""

    dense_steps: float | int = 0.2
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    min_seq_len: int = 1024
    block_size: int = 64
    backend: str = "auto"
    num_inference_steps: int | None = None
    replan_every: int = 1
    replan_steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        steps = self.dense_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, float)):
            raise ConfigError(f"dense_steps={steps!r} must be a fraction (float in [0, 1]) or a step count (int >= 0)")
        if isinstance(steps, float):
            _check(0.0 <= steps <= 1.0, "dense_steps", steps, "a fraction in [0, 1] or an int count >= 0")
        else:
            _check(steps >= 0, "dense_steps", steps, "an int count >= 0 or a fraction in [0, 1]")
        layers = self.dense_layers
        layers = (layers,) if is_int(layers) else tuple(layers) if isinstance(layers, (tuple, list, range)) else None
        _check(layers is not None and all(is_int(i) and i >= 0 for i in layers), "dense_layers", self.dense_layers,
               "an int or a sequence of layer indices >= 0")
        object.__setattr__(self, "dense_layers", layers)
        _check(is_int(self.min_seq_len) and self.min_seq_len >= 0, "min_seq_len", self.min_seq_len, "an int >= 0")
        _check(is_int(self.block_size) and self.block_size >= 1, "block_size", self.block_size, "an int >= 1 (64 or 128 on GPU)")
        _check(isinstance(self.backend, str) and self.backend in BACKENDS, "backend", self.backend, f"one of {BACKENDS}")
        if self.backend == "triton" and not _triton_usable():
            raise ConfigError("backend='triton' needs a CUDA GPU and the triton package, and this machine lacks one of them; "
                              "use backend='auto', which picks the fastest backend this machine has")
        n = self.num_inference_steps
        _check(n is None or (is_int(n) and n >= 1), "num_inference_steps", n, "None or an int >= 1")
        _check(is_int(self.replan_every) and self.replan_every >= 1, "replan_every", self.replan_every, "an int >= 1")
        if self.replan_steps is not None:
            steps = (self.replan_steps,) if is_int(self.replan_steps) else self.replan_steps
            ok = isinstance(steps, (tuple, list)) and all(is_int(i) and i >= 0 for i in steps)
            _check(ok, "replan_steps", self.replan_steps, "None or step indices >= 0")
            object.__setattr__(self, "replan_steps", tuple(sorted(set(steps))))

    @classmethod
    def option_names(cls) -> list[str]:
        """Names of every keyword this config accepts."""
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **overrides: Any) -> "SparseAttentionConfig":
        """A copy with `overrides` applied; unknown names raise `ConfigError` listing the valid ones."""
        unknown = sorted(set(overrides) - set(self.option_names()))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for method {self.method!r}; valid options: {', '.join(self.option_names())}"
            )
        return dataclasses.replace(self, **overrides)

    def dense_step_count(self, num_steps: int | None) -> int:
        """How many leading steps stay dense, given the run's total step count (None if unknown)."""
        if isinstance(self.dense_steps, int):
            return self.dense_steps
        if self.dense_steps == 0.0:
            return 0
        total = num_steps if num_steps is not None else self.num_inference_steps
        if total is None:
            raise ConfigError(
                f"dense_steps={self.dense_steps} is a fraction but the number of denoising steps is unknown: pass "
                "num_steps=N to sparse_attention / SparseAttention calls, num_inference_steps=N in the config when "
                "a bare transformer is hooked, or an int count of dense steps"
            )
        # floor, as SVG does: 20% of 50 steps is 10, of 3 steps is 0.
        return math.floor(self.dense_steps * total + 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view, with the method name."""
        return {"method": self.method, **dataclasses.asdict(self)}

