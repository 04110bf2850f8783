"""The functional core inside a model of your own: no diffusers, plain (B, S, H, D) tensors.

A `SparseAttention` object is kept by the model, so a static plan is made once per token layout and a
dynamic method keeps its state per layer (site) across the steps of a generation; `reset()` ends a generation.

    python examples/functional_custom_model.py
"""

from __future__ import annotations

import torch
from torch import nn

import sparse_dit


class VideoSelfAttention(nn.Module):
    """Self-attention over F x H x W video tokens that routes the attention itself to sparse-dit."""

    def __init__(self, dim: int, heads: int, layer: int, sparse: sparse_dit.SparseAttention) -> None:
        super().__init__()
        self.heads, self.layer, self.sparse = heads, layer, sparse
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], step: int, num_steps: int) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)  # (B, S, H, D) each
        o = self.sparse(q, k, v, grid=grid, layer=self.layer, site=f"blocks.{self.layer}", step=step, num_steps=num_steps)
        return self.out(o.reshape(b, s, d))


class TinyVideoModel(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, method: str = "window", **options) -> None:
        super().__init__()
        self.attention = sparse_dit.SparseAttention(method, **options)
        self.blocks = nn.ModuleList(VideoSelfAttention(dim, heads, i, self.attention) for i in range(layers))

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], step: int, num_steps: int) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x, grid, step, num_steps)
        return x


def main() -> None:
    torch.manual_seed(0)
    grid, steps = (4, 16, 16), 5
    model = TinyVideoModel(window=(3, 7, 7), block_size=64, dense_steps=1).eval()
    x = torch.randn(2, grid[0] * grid[1] * grid[2], 64)
    with torch.no_grad():
        for step in range(steps):
            x = model(x, grid, step, steps)
    stats = model.attention.stats
    model.attention.reset()
    print(f"{stats.calls} attention calls, density {stats.density(sparse_only=True):.3f} on the sparse ones, "
          f"{len(model.attention.plans)} plan made and reused")


if __name__ == "__main__":
    main()
