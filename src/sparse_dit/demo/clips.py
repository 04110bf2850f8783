"""Procedural clips of coloured shapes moving as their caption says, deterministic by seed.

"a red circle moving left", "a blue square moving up right and a yellow triangle staying still": 6 colours,
3 shapes, 9 motions (4 axes, 4 diagonals, resting), one or two objects over a low-saturation gradient.
A fixed set of (colour, shape, motion) combinations is held out of training for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.12, 0.78, 0.22),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "magenta": (0.90, 0.12, 0.88),
    "cyan": (0.10, 0.88, 0.90),
}
SHAPES = ("circle", "square", "triangle")
# Direction in image coordinates (x right, y down); diagonals are unit length too.
MOTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down right": (math.sqrt(0.5), math.sqrt(0.5)),
    "still": (0.0, 0.0),
}
VOCABULARY = ("a", "and", "moving", "staying", *COLOURS, *SHAPES, "left", "right", "up", "down", "still")


@dataclass(frozen=True)
class ShapeSpec:
    """One object of a clip."""

    colour: str
    shape: str
    motion: str

    @property
    def caption(self) -> str:
        verb = "staying" if self.motion == "still" else "moving"
        return f"a {self.colour} {self.shape} {verb} {self.motion}"


@dataclass(frozen=True)
class ClipSpec:
    """What a clip shows: one or two objects."""

    objects: tuple[ShapeSpec, ...]

    @property
    def caption(self) -> str:
        return " and ".join(o.caption for o in self.objects)


def _index(combo: ShapeSpec) -> int:
    return list(COLOURS).index(combo.colour) + 2 * SHAPES.index(combo.shape) + list(MOTIONS).index(combo.motion)


def is_held_out(obj: ShapeSpec) -> bool:
    """Whether this (colour, shape, motion) never appears in training: 18 of the 162, spread over every factor."""
    return _index(obj) % 9 == 0


def parse_caption(text: str) -> ClipSpec:
    """The clip a caption describes; raises `ConfigError` listing the vocabulary for words it does not know."""
    words = text.lower().replace(",", " ").split()
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise ConfigError(f"unknown caption word(s) {unknown}; the demo model knows: {' '.join(VOCABULARY)}")
    objects, parts, current = [], [], []
    for word in words + ["and"]:
        if word == "and":
            parts.append(current)
            current = []
        else:
            current.append(word)
    for part in parts:
        if len(part) < 4 or part[0] != "a" or part[1] not in COLOURS or part[2] not in SHAPES or part[3] not in ("moving", "staying"):
            raise ConfigError(
                f"cannot read {' '.join(part)!r}: captions read 'a <colour> <shape> moving <direction>' or "
                f"'a <colour> <shape> staying still', joined by 'and'; colours {list(COLOURS)}, shapes {list(SHAPES)}, "
                f"directions {[m for m in MOTIONS if m != 'still']}"
            )
        motion = " ".join(part[4:])
        if motion not in MOTIONS or (part[3] == "staying") != (motion == "still"):
            raise ConfigError(f"unknown motion {' '.join(part[3:])!r}; use 'moving' with {list(MOTIONS)[:-1]} or 'staying still'")
        objects.append(ShapeSpec(part[1], part[2], motion))
    if not 1 <= len(objects) <= 2:
        raise ConfigError("a caption describes one or two objects")
    return ClipSpec(tuple(objects))


def random_object(generator: torch.Generator, colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES,
                  motions: Sequence[str] = tuple(MOTIONS)) -> ShapeSpec:
    """One object drawn uniformly from these options (by default all of them, held-out combinations included)."""
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=generator))]  # noqa: E731
    return ShapeSpec(pick(colours), pick(shapes), pick(motions))


def sample_spec(generator: torch.Generator, held_out: bool = False, two_objects_p: float = 0.25) -> ClipSpec:
    """A random clip spec from the training combinations (or only held-out ones with `held_out=True`)."""

    def draw() -> ShapeSpec:
        while True:
            obj = random_object(generator)
            if is_held_out(obj) == held_out:
                return obj

    first = draw()
    if float(torch.rand(1, generator=generator)) < two_objects_p:
        second = draw()
        if second.colour != first.colour:
            return ClipSpec((first, second))
    return ClipSpec((first,))


def _background(h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """A low-saturation two-tone linear gradient in a random direction: (3, H, W)."""
    angle = float(torch.rand(1, generator=generator)) * 2 * math.pi
    base = 0.35 + 0.3 * torch.rand(2, 1, generator=generator)  # two grey levels
    tint = 0.08 * (torch.rand(2, 3, generator=generator) - 0.5)  # slight colour, far from the shape colours
    tones = (base + tint).clamp(0, 1)  # (2, 3)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    mix = ((math.cos(angle) * xs + math.sin(angle) * ys) / math.sqrt(2) + 1) / 2
    return tones[0].view(3, 1, 1) * (1 - mix) + tones[1].view(3, 1, 1) * mix


def _coverage(shape: str, xs: torch.Tensor, ys: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: float) -> torch.Tensor:
    """Anti-aliased (one-pixel soft edge) coverage in [0, 1] of a shape of size r centred at (cx, cy).

    xs, ys: (H, W) pixel coordinates; cx, cy: (T, 1, 1) centres per frame. Returns (T, H, W).
    """
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        dist = torch.sqrt(dx**2 + dy**2) - r
    elif shape == "square":
        dist = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    else:  # an upward triangle: the max of three half-plane distances
        s = math.sqrt(3) / 2
        dist = torch.maximum(torch.maximum(dy - 0.5 * r, -s * dx - 0.5 * dy - 0.5 * r), s * dx - 0.5 * dy - 0.5 * r) * 1.2
    return (0.5 - dist).clamp(0, 1)


JITTER = 0.02  # of the shorter side: how far a path's centre may sit from its anchor


def render_with_coverage(spec: ClipSpec, frames: int, height: int, width: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`render`, and how much of each pixel the objects cover: (T, 3, H, W) and (T, H, W), both in [0, 1]."""
    side = min(height, width)
    video = _background(height, width, generator).expand(frames, 3, height, width).clone()
    covered = torch.zeros(frames, height, width)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    anchors = [0.5] if len(spec.objects) == 1 else [1 / 3, 2 / 3]
    for obj, anchor in zip(spec.objects, anchors):
        r = side * (0.13 + 0.02 * float(torch.rand(1, generator=generator)))
        travel = side * (0.43 + 0.04 * float(torch.rand(1, generator=generator)))
        vx, vy = (travel * c for c in MOTIONS[obj.motion])
        jx, jy = (JITTER * side * (2 * float(torch.rand(1, generator=generator)) - 1) for _ in range(2))
        margin = r + 1
        # The start that centres the path on the anchor, clamped so the whole path stays inside the frame.
        lo_x, hi_x = margin + max(0.0, -vx), width - margin - max(0.0, vx)
        lo_y, hi_y = margin + max(0.0, -vy), height - margin - max(0.0, vy)
        x0 = min(max(width / 2 - vx / 2 + jx, lo_x), hi_x)
        y0 = min(max(height * anchor - vy / 2 + jy, lo_y), hi_y)
        colour = torch.tensor(COLOURS[obj.colour]).view(1, 3, 1, 1)
        f = torch.linspace(0, 1, frames).view(frames, 1, 1)
        alpha = _coverage(obj.shape, xs, ys, x0 + vx * f, y0 + vy * f, r)
        video = video * (1 - alpha[:, None]) + colour * alpha[:, None]
        covered = torch.maximum(covered, alpha)
    return video, covered


def as_latents(video: torch.Tensor, coverage: torch.Tensor | None = None) -> torch.Tensor:
    """A rendered clip (T, 3, H, W) in [0, 1] as the model reads it: (1, 3, T, H, W) in [-1, 1].

    With `coverage` (T, H, W) in [0, 1] (from `render_with_coverage`), it is a fourth channel: (1, 4, T, H, W).
    """
    if coverage is not None:
        video = torch.cat([video, coverage[:, None]], dim=1)
    return video.permute(1, 0, 2, 3)[None] * 2 - 1


def render(spec: ClipSpec, frames: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Render a clip: (T, 3, H, W) float in [0, 1].

    Objects have a size of 13-15% of the shorter side and travel 43-47% of it over the clip. Each path
    is centred on an anchor (the frame's centre for one object; the upper and lower thirds for two),
    jittered by up to JITTER of the side and kept inside the frame. Anchored paths keep the task small
    enough for a CPU-trained model: where an object is follows from its caption, up to the jitter, so the
    model learns shape, colour and motion rather than a uniform spread of positions.
    """
    return render_with_coverage(spec, frames, height, width, generator)[0]
