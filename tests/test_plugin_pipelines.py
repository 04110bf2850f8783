"""The plugin through whole tiny pipelines: Wan 2.1 and 2.2, HunyuanVideo, CogVideoX, Flux, LTX."""

import pytest
import torch

import sparse_dit
from sparse_dit.patterns import PlanContext, WindowPlanner, resolve_config
from sparse_dit.pipelines import get_adapter
from sparse_dit.state import SiteState

from tiny_models import PIPELINE_FAMILIES, make_pipeline, make_wan22_pipeline

FAMILIES = (*PIPELINE_FAMILIES, "wan22")
WINDOW = dict(window=(1, 3, 3), block_size=8, min_seq_len=0)


def build(name):
    pipe, kwargs = make_wan22_pipeline() if name == "wan22" else make_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def run(pipe, kwargs, **overrides):
    out = pipe(**{**kwargs, **overrides, "generator": torch.Generator().manual_seed(0)})
    return out.frames if hasattr(out, "frames") else out.images


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def plan_density(pipe, entry):
    position = get_adapter(pipe.transformer).text_position
    ctx = PlanContext(grid=entry.grid, text_len=entry.text_len, text_position=position if entry.text_len else "none")
    return WindowPlanner(resolve_config("window", **WINDOW)).plan(None, None, ctx, SiteState()).density


@pytest.mark.parametrize("name", FAMILIES)
def test_dense_reproduces_the_unhooked_pipeline(name):
    pipe, kwargs = build(name)
    reference = run(pipe, kwargs)
    pipe.enable_sparse_attention("dense", block_size=8, min_seq_len=0, dense_steps=0)
    assert rel_err(run(pipe, kwargs), reference) < 1e-5
    steps = {step for step, _ in pipe.sparse_attention_stats().entries}
    assert steps == {0, 1, 2}


@pytest.mark.parametrize("name", FAMILIES)
def test_window_with_dense_warm_up_then_disable(name):
    pipe, kwargs = build(name)
    reference = run(pipe, kwargs)
    pipe.enable_sparse_attention("window", dense_steps=1, **WINDOW)
    out = run(pipe, kwargs)
    assert rel_err(out, reference) > 1e-4
    stats = pipe.sparse_attention_stats()
    assert {step for step, _ in stats.entries} == {0, 1, 2}
    for (step, layer), entry in stats.entries.items():
        if step == 0:  # warm-up: dense
            assert entry.sparse_calls == 0 and entry.density == 1.0
        else:
            assert entry.sparse_calls == entry.calls
            assert entry.density == pytest.approx(plan_density(pipe, entry))
            assert entry.density < 1.0
    pipe.disable_sparse_attention()
    assert torch.equal(run(pipe, kwargs), reference)


def test_fractional_warm_up_follows_the_pipelines_step_count():
    pipe, kwargs = build("wan")
    pipe.enable_sparse_attention("window", dense_steps=0.5, **WINDOW)
    run(pipe, kwargs, num_inference_steps=4)
    stats = pipe.sparse_attention_stats()
    dense_steps = sorted({s for (s, _), e in stats.entries.items() if e.sparse_calls == 0})
    assert dense_steps == [0, 1] and len({s for s, _ in stats.entries}) == 4


def test_wan22_hooks_both_experts():
    pipe, kwargs = build("wan22")
    pipe.enable_sparse_attention("window", dense_steps=0, **WINDOW)
    run(pipe, kwargs)
    for model in (pipe.transformer, pipe.transformer_2):
        assert model._diffusers_hook.get_hook("sparse_dit_root") is not None
    # Steps 0-1 run on the high-noise expert, step 2 on the low-noise one; every step is recorded.
    assert {s for s, _ in pipe.sparse_attention_stats().entries} == {0, 1, 2}


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_batch_two_with_classifier_free_guidance(name):
    pipe, kwargs = build(name)
    prompts = dict(prompt=["a red circle", "a blue square"], negative_prompt=["blurry", "blurry"])
    reference = run(pipe, kwargs, **prompts)
    assert reference.shape[0] == 2
    pipe.enable_sparse_attention("dense", block_size=8, min_seq_len=0, dense_steps=0)
    assert rel_err(run(pipe, kwargs, **prompts), reference) < 1e-5
    pipe.enable_sparse_attention("window", dense_steps=0, **WINDOW)
    sparse = run(pipe, kwargs, **prompts)
    assert sparse.shape == reference.shape and torch.isfinite(sparse).all()
    # CFG doubles the attention batch: one call of B=4 (CogVideoX) or two of B=2 (Wan) per (step, layer).
    assert {e.calls for e in pipe.sparse_attention_stats().entries.values()} == ({2} if name == "wan" else {1})


def test_two_resolutions_without_re_enabling():
    pipe, kwargs = build("wan")
    sizes = [dict(height=64, width=96), dict(height=96, width=64, num_frames=5)]
    references = [run(pipe, kwargs, **size) for size in sizes]
    pipe.enable_sparse_attention("dense", block_size=8, min_seq_len=0, dense_steps=0)
    grids = []
    for size, reference in zip(sizes, references):
        assert rel_err(run(pipe, kwargs, **size), reference) < 1e-5
        grids.append({e.grid for e in pipe.sparse_attention_stats().entries.values()})
    assert grids == [{(3, 4, 6)}, {(2, 6, 4)}]
