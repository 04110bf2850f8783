"""How concentrated a model's attention is at block level: the mass its heaviest key blocks hold.

Every mass-based selector (AdaSpa, XAttention, VMoBA, SVG2's clusters) keeps the key blocks it estimates
hold most of a query block's attention. If the top 20% of blocks hold half the mass, no selector can do
well and random blocks are as good; real video DiTs reach 90% of the mass with 25-30% of the blocks. This
measures it exactly, from the model's own q and k, on the steps a sparse method would run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import SparseDiTError
from ..plan import PlanContext
from ..patterns.block_mass import block_mass, top_share
from .capture import run_observed


@dataclass
class Concentration:
    """Top-block shares of every observed (layer, head, query block), and mean block-mass maps.

    shares: {layer: float (N, H, nq)}, one row per observed call and batch row: the mass each query block's
        top `fraction` of key blocks hold. maps: {layer: float (H, n, n)}, the block mass averaged over calls.
    """

    fraction: float
    block_size: int
    steps: list[int]
    shares: dict[int, torch.Tensor] = field(default_factory=dict)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)

    def median(self) -> float:
        """Median over every (layer, head, query block, call)."""
        return float(torch.cat([s.flatten() for s in self.shares.values()]).median())

    def table(self) -> list[dict]:
        """Per layer: the median and mean share, and each head's median."""
        return [{"layer": layer, "median": float(s.median()), "mean": float(s.mean()),
                 "heads": [float(s[:, h].median()) for h in range(s.shape[1])]}
                for layer, s in sorted(self.shares.items())]

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "block_size": self.block_size, "steps": self.steps, "median": self.median(),
                "layers": self.table()}

    def markdown(self) -> str:
        """The per-layer and per-head table."""
        heads = max(s.shape[1] for s in self.shares.values())
        lines = [f"Mass held by the top {self.fraction:.0%} of {self.block_size}-token key blocks of each query block "
                 f"(exact, from the model's q and k), steps {self.steps[0]}-{self.steps[-1]}. "
                 f"Median over every (layer, head, query block): **{self.median():.3f}**.", "",
                 "| layer | median | mean | " + " | ".join(f"head {h}" for h in range(heads)) + " |",
                 "|---" * (3 + heads) + "|"]
        for row in self.table():
            lines.append(f"| {row['layer']} | {row['median']:.3f} | {row['mean']:.3f} | "
                         + " | ".join(f"{v:.3f}" for v in row["heads"]) + " |")
        return "\n".join(lines) + "\n"

    def draw(self, scale: int = 4) -> Image.Image:
        """The mean block-mass map of every (layer, head): query blocks down, key blocks across, log scale."""
        from ..evals.attention_maps import DECADES, labelled_grid, magma

        panels = []
        for layer, maps in sorted(self.maps.items()):
            row = []
            for h, m in enumerate(maps):
                logm = torch.log10(m.clamp_min(1e-30))
                values = ((logm - logm.amax(dim=-1, keepdim=True) + DECADES) / DECADES).numpy()  # per row's max
                image = Image.fromarray(magma(values)).resize((m.shape[-1] * scale, m.shape[-2] * scale), Image.NEAREST)
                share = float(self.shares[layer][:, h].median())
                row.append((f"layer {layer} head {h}: top-{self.fraction:.0%} {share:.2f}", image))
            panels.append(row)
        return labelled_grid(panels)


def measure_concentration(pipe: Any, calls: Iterable[dict[str, Any]], *, steps: Iterable[int], fraction: float = 0.2,
                          block_size: int = 64) -> Concentration:
    """Run `pipe(**call)` dense for every call and measure the top-block share of the video tokens' attention.

    Args:
        pipe: a pipeline that `enable_sparse_attention` supports.
        calls: the pipeline calls' arguments (prompt, generator, sizes, ...).
        steps: denoising steps to measure (a sparse method's steps: after its dense warm-up).
        fraction: share of the key blocks counted, in (0, 1].
        block_size: tokens per block, in the raster order of the video tokens.
    """
    if not 0 < fraction <= 1:
        raise SparseDiTError(f"fraction={fraction} must be in (0, 1]")
    wanted = sorted(set(steps))
    result = Concentration(fraction, block_size, wanted)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    shares: dict[int, list[torch.Tensor]] = {}

    def observe(site, ctx: PlanContext, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
        if ctx.step not in wanted:
            return
        video = slice(ctx.video_start, ctx.video_start + ctx.num_video_tokens)
        mass = block_mass(q[:, video], k[:, video], block_size, scale).cpu()
        shares.setdefault(ctx.layer, []).append(top_share(mass, fraction))
        sums[ctx.layer] = sums.get(ctx.layer, 0) + mass.sum(dim=0)
        counts[ctx.layer] = counts.get(ctx.layer, 0) + mass.shape[0]

    for call in calls:
        run_observed(pipe, observe, **call)
    if not shares:
        raise SparseDiTError(f"no self-attention call ran at steps {wanted}; pass steps below num_inference_steps")
    result.shares = {layer: torch.cat(values) for layer, values in shares.items()}
    result.maps = {layer: sums[layer] / counts[layer] for layer in sums}
    return result


__all__ = ["Concentration", "measure_concentration"]
