"""Multi-dimensional tiles over the (F, H, W) token grid, and block layouts of separable neighbourhoods.

A plan computes whole blocks of consecutive tokens in its `order`. In the raster (f-major) order a block of 64
tokens is a strip of rows, so a compact 3-D neighbourhood touches many blocks only partly. Reordering the
video tokens tile by tile (every tile a small (tf, th, tw) box, its tokens f-major inside it) makes each
block a box, and when the boxes divide the neighbourhood the blocks are wholly inside or wholly outside it:
the "perfect block sparsity" of GNA and STA.

Neighbourhoods here are separable: a key is a neighbour of a query iff it is one on every axis, so one bool
(L, L) matrix per axis describes them (`axis_masks`). Block layouts then follow without the S x S mask.
"""

from __future__ import annotations

import itertools
import math

import torch

Grid = tuple[int, int, int]


def tile_positions(grid: Grid, tile: Grid, device: torch.device | str | None = None) -> torch.Tensor:
    """Where each video token goes in the tiled order: long (N,), indexed by the token's raster (f-major) index.

    Tiles are visited in raster order of the tile grid and tokens f-major inside each tile; tiles at the far
    edge of an axis that `tile` does not divide are short, so every position is used exactly once.
    """
    f, h, w = grid
    tf, th, tw = tile
    coords = torch.stack(torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij"), dim=-1).view(-1, 3)
    t = torch.tensor(tile, device=device)
    tile_idx, inner = coords // t, coords % t
    # Length of the tile along each axis (the last tile of an axis may be short).
    ext = torch.minimum(t, torch.tensor(grid, device=device) - tile_idx * t)
    # Tokens before this tile: whole tile slabs before it along F, then along H within its F slab, then W.
    before_f = tile_idx[:, 0] * tf * h * w
    before_h = tile_idx[:, 1] * th * ext[:, 0] * w
    before_w = tile_idx[:, 2] * tw * ext[:, 0] * ext[:, 1]
    within = (inner[:, 0] * ext[:, 1] + inner[:, 1]) * ext[:, 2] + inner[:, 2]
    return before_f + before_h + before_w + within


def tile_shapes(block_size: int) -> list[Grid]:
    """Every (tf, th, tw) of positive ints whose product is `block_size`."""
    divisors = [d for d in range(1, block_size + 1) if block_size % d == 0]
    return [(a, b, block_size // (a * b)) for a, b in itertools.product(divisors, divisors) if block_size % (a * b) == 0]


def axis_tile_cost(mask: torch.Tensor, tile: int) -> int:
    """Query-key token pairs computed along one axis when it is cut into tiles of `tile` tokens.

    mask: bool (L, L), the axis's neighbourhood. A tile pair is computed whole if any of its pairs is in it.
    """
    length = mask.shape[0]
    n = -(-length // tile)
    pad = n * tile - length
    padded = torch.nn.functional.pad(mask, (0, pad, 0, pad))
    kept = padded.view(n, tile, n, tile).any(dim=3).any(dim=1)
    sizes = torch.full((n,), tile, dtype=torch.long)
    sizes[-1] = length - (n - 1) * tile
    return int((kept.long() * sizes[:, None] * sizes[None, :]).sum())


def rank_tiles(grid: Grid, masks: list[torch.Tensor], block_size: int) -> list[Grid]:
    """Tile shapes of `block_size` tokens, the one estimated to compute the least work for these per-axis
    neighbourhoods first.

    Shapes that divide every axis come first: only then is each block exactly one tile, and the estimate (the
    product of the per-axis costs) exact; the others follow by the same estimate, which ignores that their
    blocks straddle tiles. Ties go to the longer W side, which keeps the gather contiguous.
    """
    def score(tile: Grid) -> tuple:
        uneven = any(n % t != 0 for n, t in zip(grid, tile))
        cost = math.prod(axis_tile_cost(m, min(t, n)) for m, t, n in zip(masks, tile, grid))
        return uneven, cost, -tile[2], -tile[1]

    return sorted(tile_shapes(block_size), key=score)


def choose_tile(grid: Grid, masks: list[torch.Tensor], block_size: int) -> Grid:
    """The first of `rank_tiles`."""
    return rank_tiles(grid, masks, block_size)[0]


def tiles_are_blocks(grid: Grid, tile: Grid, block_size: int) -> bool:
    """Whether, with video first in the tiled order, every block of `block_size` tokens is exactly one tile."""
    return math.prod(tile) == block_size and all(n % t == 0 for n, t in zip(grid, tile))


def kron_layout(masks: list[torch.Tensor], tile: Grid) -> torch.Tensor:
    """Block layout of a separable neighbourhood when every block is one whole tile: bool (nb, nb).

    Blocks are numbered in the tiled order (tile grid raster order). A tile pair is computed iff it is on
    every axis, so the layout is the Kronecker product of the per-axis tile layouts.
    """
    per_axis = []
    for m, t in zip(masks, tile):
        n = m.shape[0] // t
        per_axis.append(m.view(n, t, n, t).any(dim=3).any(dim=1))
    kf, kh, kw = per_axis
    layout = kf[:, None, None, :, None, None] & kh[None, :, None, None, :, None] & kw[None, None, :, None, None, :]
    nb = kf.shape[0] * kh.shape[0] * kw.shape[0]
    return layout.reshape(nb, nb)


def token_block_layout(masks: list[torch.Tensor], block_of: torch.Tensor, num_blocks: int, chunk: int = 256) -> torch.Tensor:
    """Block layout of a separable neighbourhood for any assignment of video tokens to blocks: bool (nb, nb).

    Args:
        masks: bool (L_a, L_a) per axis (F, H, W).
        block_of: long (N,), the block of every video token, indexed by raster (f-major) index.
        num_blocks: nb, the number of blocks of the sequence (text blocks included; they get no video pairs).
    Block pair (i, j) is True iff some video query in i has a neighbour in j. Computed without the N x N mask:
    the one-hot key-block membership (F, H, W, nb) is multiplied by the per-axis matrices in turn, giving for
    every query token the number of its neighbours in each key block (cost N * nb * (F + H + W)).
    """
    f, h, w = (m.shape[0] for m in masks)
    mf, mh, mw = (m.to(torch.float32) for m in masks)
    layout = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=block_of.device)
    tokens = torch.arange(block_of.numel(), device=block_of.device)
    for start in range(0, num_blocks, chunk):
        cols = min(chunk, num_blocks - start)
        inside = (block_of >= start) & (block_of < start + cols)
        member = torch.zeros(f * h * w, cols, dtype=torch.float32, device=block_of.device)
        member[tokens[inside], block_of[inside] - start] = 1.0
        counts = torch.einsum("cw,fhwn->fhcn", mw, member.view(f, h, w, cols))  # over key w
        counts = torch.einsum("bh,fhcn->fbcn", mh, counts)  # over key h
        counts = torch.einsum("af,fbcn->abcn", mf, counts)  # over key f: (f, h, w, n) neighbours per key block
        hit = (counts.reshape(-1, cols) > 0).to(torch.float32)
        rows = torch.zeros(num_blocks, cols, dtype=torch.float32, device=block_of.device).index_add_(0, block_of, hit)
        layout[:, start : start + cols] = rows > 0
    return layout
