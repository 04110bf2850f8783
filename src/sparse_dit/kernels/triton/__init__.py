"""The GPU path: block-sparse attention kernels and planner helpers in Triton.

`supports` says whether a call can run here; `triton_attention` runs it. Importing this package needs
triton; set TRITON_INTERPRET=1 before importing it to run the kernels on CPU tensors (tests only: the
interpreter is about 100x slower than dense attention).
"""

from __future__ import annotations

import torch

from ...plan import AttentionPlan
from ..capabilities import Call, honours
from .block_sparse import accepts, block_sparse_attention, is_interpreted
from .csr import plan_csr
from .helpers import block_attention_mass, block_mean_pool, kmeans_assign

__all__ = [
    "accepts", "block_attention_mass", "block_mean_pool", "block_sparse_attention", "is_interpreted", "kmeans_assign",
    "plan_csr", "supports", "triton_attention",
]


def supports(plan: AttentionPlan, q: torch.Tensor, attn_mask: torch.Tensor | None, return_lse: bool) -> bool:
    """Whether the Triton kernel honours this call (its rows of `capabilities.TABLE`): q (B, S, H, D) on CUDA
    (on CPU under the interpreter) with a head dim and dtype it `accepts`, no model mask and no gradient (the
    kernel is forward only). Any plan runs; the LSE is always computed, so `return_lse` does not matter."""
    return honours("triton", Call.of(plan, q, attn_mask, return_lse))


# The one entry point runs every variant: fixed or variable blocks and int8/int4 Q·K follow from the plan
# (`block_sparse.launch_config`).
triton_attention = block_sparse_attention
