"""Register a sparse attention method of your own and run it through a pipeline.

The method here, `band`, keeps for every query block the first `sinks` key blocks (the "attention sink"
the StreamingLLM line of work found) and the `width` key blocks on each side of its own, in token order.
It needs nothing of q and k, so it declares its plan reusable for a token layout (`cache_key`).

    python examples/custom_method.py                          # the demo model, dense and `band`
    sparse-dit --import examples/custom_method.py eval --methods dense,band --prompts prompts.txt
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import sparse_dit
from sparse_dit import AttentionPlan, PlanContext, Planner, SiteState, SparseAttentionConfig, register_method
from sparse_dit.patterns import keep_text_and_diagonal


@dataclass(frozen=True)
class BandConfig(SparseAttentionConfig):
    """Options of `band`, on top of the shared policy (dense_steps, block_size, ...).

    Attributes:
        sinks: leading key blocks every query block keeps.
        width: key blocks kept on each side of a query block's own.
    """

    method: ClassVar[str] = "band"
    sinks: int = 1
    width: int = 2


@register_method
class BandPlanner(Planner):
    name = "band"
    config_cls = BandConfig
    description = "attention sinks plus a band of blocks around the diagonal (an example of a user method)"

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        bs = self.config.block_size
        n = -(-ctx.seq_len // bs)
        i = torch.arange(n, device=ctx.device)
        layout = ((i[:, None] - i[None, :]).abs() <= self.config.width) | (i[None, :] < self.config.sinks)
        layout = keep_text_and_diagonal(layout[None, None], ctx, bs)  # text rows and columns stay dense
        return AttentionPlan(seq_len=ctx.seq_len, layout=layout, block_size=bs)

    def cache_key(self, ctx: PlanContext):
        return ctx.layout_key


def main() -> None:
    pipe = sparse_dit.load_demo_pipeline()
    call = dict(prompt="a red circle moving right", num_frames=8, height=32, width=32, num_inference_steps=10, output_type="pt")
    dense = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    pipe.enable_sparse_attention("band", width=3, min_seq_len=0)
    sparse = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    stats = pipe.sparse_attention_stats()
    pipe.disable_sparse_attention()
    print(f"band: density {stats.density(sparse_only=True):.3f}, max abs difference to dense {float((sparse - dense).abs().max()):.4f}")


if __name__ == "__main__":
    main()
