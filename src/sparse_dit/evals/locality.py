"""How local a model's attention is: the share of mass inside a 3-D window around each query."""

from __future__ import annotations

import torch

from ..patterns.geometry import token_coords
from ..search.capture import AttentionSample


def window_mass(sample: AttentionSample, window: tuple[int, int, int] = (3, 5, 5)) -> tuple[torch.Tensor, float]:
    """Mean share of attention mass on keys within `window` (frames, rows, columns of tokens) of the query.

    Returns (mass, uniform): mass is float (B, H), averaged over the sampled rows; uniform is the share the
    window would hold if attention were uniform (its key count over all keys, edges included), the
    baseline that says whether the mass is structure or just the window's size. Text keys are outside.
    """
    coords = token_coords(sample.ctx).cpu()
    query = coords[sample.rows]
    half = torch.tensor(window) // 2
    inside = ((coords[None] - query[:, None]).abs() <= half).all(dim=-1)  # (R, S)
    mass = (sample.probs * inside).sum(dim=-1).mean(dim=-1)
    uniform = float(inside.float().mean())
    return mass, uniform
