"""Model adapters: how each diffusers transformer family lays out its attention sequence.

An adapter says three things about a transformer class: the (F, H, W) token grid after patching, read
from the forward's arguments; where text sits in its joint self-attention sequence; and which attention
modules are self-attention over the video (cross-attention and text-only refiners are never made sparse).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping

import torch

from ..errors import ShapeError, UnsupportedModelError
from ..plan import TextPosition

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class ModelAdapter:
    """Layout facts of one transformer family.

    Attributes:
        family: short name, e.g. "wan".
        class_names: diffusers class names this adapter describes.
        text_position: where text joins the self-attention sequence ("none" for cross-attention models).
        self_attention: regular expression that module names of video self-attention fully match.
        grid_fn: (model, bound forward arguments) -> (F, H, W).
    """

    family: str
    class_names: tuple[str, ...]
    text_position: TextPosition
    self_attention: str
    grid_fn: Callable[[torch.nn.Module, Mapping[str, Any]], Grid]

    def bind(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The forward call's arguments by parameter name."""
        return _signature(type(model)).bind_partial(model, *args, **kwargs).arguments

    def grid(self, model: torch.nn.Module, bound: Mapping[str, Any]) -> Grid:
        """The token grid of one forward call, from its bound arguments (see `bind`)."""
        grid = tuple(int(n) for n in self.grid_fn(model, bound))
        if len(grid) != 3 or min(grid) < 1:
            raise ShapeError(f"{type(model).__name__}: could not read a token grid from the inputs (got {grid})")
        return grid

    def is_self_attention(self, name: str) -> bool:
        """Whether the attention module at `name` (as in `named_modules()`) is video self-attention."""
        return re.fullmatch(self.self_attention, name) is not None


@lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _required(bound: Mapping[str, Any], name: str, model: torch.nn.Module) -> Any:
    value = bound.get(name)
    if value is None:
        raise ShapeError(f"{type(model).__name__} was called without `{name}`, which sparse-dit reads the token grid from")
    return value


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)[-2:]


def _video_5d(frames_dim: int) -> Callable[[torch.nn.Module, Mapping[str, Any]], Grid]:
    """Grid of models fed (B, C, F, H, W) (frames_dim=2) or (B, F, C, H, W) (frames_dim=1) latents."""

    def grid(model: torch.nn.Module, bound: Mapping[str, Any]) -> Grid:
        hs = _required(bound, "hidden_states", model)
        frames, height, width = hs.shape[frames_dim], hs.shape[-2], hs.shape[-1]
        cfg = model.config
        patch = cfg.patch_size
        if isinstance(patch, (tuple, list)) and len(patch) == 3:  # Wan: (pt, ph, pw)
            pt, ph, pw = patch
        else:
            (ph, pw), pt = _pair(patch), getattr(cfg, "patch_size_t", None) or 1
        return math.ceil(frames / pt), height // ph, width // pw

    return grid


def _image_4d(model: torch.nn.Module, bound: Mapping[str, Any]) -> Grid:
    hs = _required(bound, "hidden_states", model)
    ph, pw = _pair(model.config.patch_size)
    return 1, hs.shape[-2] // ph, hs.shape[-1] // pw


def _ltx(model: torch.nn.Module, bound: Mapping[str, Any]) -> Grid:
    return tuple(int(_required(bound, name, model)) for name in ("num_frames", "height", "width"))


def _flux(model: torch.nn.Module, bound: Mapping[str, Any]) -> Grid:
    ids = _required(bound, "img_ids", model)
    ids = ids[0] if ids.dim() == 3 else ids
    rows, cols = ids[:, 1], ids[:, 2]
    height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    if height * width != ids.shape[0]:
        raise ShapeError(
            f"FluxTransformer2DModel: img_ids hold {ids.shape[0]} tokens, not one {height}x{width} image; "
            "image-conditioned variants (Kontext) are not supported yet"
        )
    return 1, height, width


def _qwenimage(model: torch.nn.Module, bound: Mapping[str, Any]) -> Grid:
    shapes = _required(bound, "img_shapes", model)[0]
    if isinstance(shapes, list):
        if len(shapes) != 1:
            raise ShapeError("QwenImageTransformer2DModel: several images per sample (edit models) are not supported yet")
        shapes = shapes[0]
    return tuple(shapes)


_JOINT_BLOCKS = r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn"

ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter("wan", ("WanTransformer3DModel",), "none", r"blocks\.\d+\.attn1", _video_5d(2)),
    ModelAdapter("hunyuan_video", ("HunyuanVideoTransformer3DModel",), "suffix", _JOINT_BLOCKS, _video_5d(2)),
    ModelAdapter("hunyuan_video15", ("HunyuanVideo15Transformer3DModel",), "suffix", _JOINT_BLOCKS, _video_5d(2)),
    ModelAdapter("cogvideox", ("CogVideoXTransformer3DModel",), "prefix", r"transformer_blocks\.\d+\.attn1", _video_5d(1)),
    ModelAdapter("ltx", ("LTXVideoTransformer3DModel",), "none", r"transformer_blocks\.\d+\.attn1", _ltx),
    ModelAdapter("mochi", ("MochiTransformer3DModel",), "suffix", r"transformer_blocks\.\d+\.attn1", _video_5d(2)),
    ModelAdapter("flux", ("FluxTransformer2DModel",), "prefix", _JOINT_BLOCKS, _flux),
    ModelAdapter("sd3", ("SD3Transformer2DModel",), "suffix", r"transformer_blocks\.\d+\.attn2?", _image_4d),
    ModelAdapter("qwenimage", ("QwenImageTransformer2DModel",), "prefix", r"transformer_blocks\.\d+\.attn", _qwenimage),
)


def supported_models() -> list[str]:
    """Names of every transformer class sparse-dit can hook."""
    return [name for adapter in ADAPTERS for name in adapter.class_names]


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for `model`'s class (or a diffusers base class of it)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        # The compiled graph was traced without the hooks; hooking its inner module would retrace through them.
        raise UnsupportedModelError(
            f"this {type(model._orig_mod).__name__} was wrapped by torch.compile before sparse attention was enabled. "
            "Enable sparse attention on the uncompiled model first (`model._orig_mod`, or load it again), then "
            "compile; regional compilation (`transformer.compile_repeated_blocks()`) keeps each block's graph"
        )
    for cls in type(model).__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.class_names:
                return adapter
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported by sparse-dit; supported transformers: {', '.join(supported_models())}"
    )
