"""torch.compile: the sparse call is one custom op, so compiled graphs do not break around it."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import sparse_dit
from sparse_dit.errors import UnsupportedModelError

from tiny_models import make_pipeline, make_transformer_case

WINDOW = dict(window=(1, 3, 3), block_size=8, min_seq_len=0, dense_steps=0)


def test_regional_compilation_of_an_enabled_model_does_not_break_its_graphs():
    """Before the custom op: 6 compiled frames and 14 graph breaks on this 2-block Wan (time.perf_counter,
    ContextVar, Tensor.item inside the sparse call); after: 2 frames, no break, the same output."""
    case = make_transformer_case("wan")
    sparse_dit.enable_sparse_attention(case.model, "window", **WINDOW)
    with torch.no_grad():
        eager = case.model(**case.kwargs)[0]
    torch._dynamo.reset()
    counters.clear()
    frames = CompileCounter()
    case.model.compile_repeated_blocks(backend=frames)
    with torch.no_grad():
        compiled = case.model(**case.kwargs)[0]
    assert sum(counters["graph_break"].values()) == 0
    assert frames.frame_count <= 2
    assert torch.equal(compiled, eager)
    stats = sparse_dit.sparse_attention_stats(case.model)
    assert stats.density(sparse_only=True) < 1.0  # the op really ran the sparse path


def test_whole_model_compilation_is_one_graph():
    case = make_transformer_case("wan")
    sparse_dit.enable_sparse_attention(case.model, "window", **WINDOW)
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(case.model)(**case.kwargs)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0)  # before: 10 graphs, 9 breaks


def test_a_model_compiled_before_enabling_is_refused_with_what_to_do():
    pipe, _ = make_pipeline("wan")
    pipe.transformer = torch.compile(pipe.transformer)
    with pytest.raises(UnsupportedModelError, match="Enable sparse attention on the uncompiled model first"):
        pipe.enable_sparse_attention("window")


def test_gradients_still_flow_outside_the_op():
    """The op has no backward; a call that needs gradients runs the same path eagerly (reference backend)."""
    case = make_transformer_case("wan")
    sparse_dit.enable_sparse_attention(case.model, "dense", block_size=8, min_seq_len=0, dense_steps=0, backend="reference")
    out = case.model(**case.kwargs)[0]
    out.sum().backward()
    assert all(p.grad is not None for p in case.model.parameters() if p.requires_grad)
