"""The plugin on every supported transformer family, built tiny from configs and called directly."""

import pytest
import torch

import sparse_dit
from sparse_dit.patterns import PlanContext, WindowPlanner, resolve_config
from sparse_dit.state import SiteState

from tiny_models import TRANSFORMER_FAMILIES, make_transformer_case

# Small blocks and no length threshold, so the tiny grids (tens of tokens) are really sparse.
WINDOW = dict(window=(1, 3, 3), block_size=8, min_seq_len=0, dense_steps=0)
DENSE = dict(block_size=8, min_seq_len=0, dense_steps=0)


def forward(case, **overrides):
    with torch.no_grad():
        out = case.model(**{**case.kwargs, **overrides})
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def module_state(model):
    """Everything enable/disable could touch: instance attributes of every module and processor."""
    state = {}
    for name, module in model.named_modules():
        state[name] = {k for k in vars(module) if not k.startswith("_") or k in ("_diffusers_hook", "forward")}
        state[name] |= {"forward"} if "forward" in vars(module) else set()
        processor = getattr(module, "processor", None)
        if processor is not None:
            state[name + ".processor"] = dict(vars(processor))
    return state


@pytest.fixture(params=TRANSFORMER_FAMILIES)
def case(request):
    return make_transformer_case(request.param)


def test_dense_reproduces_unhooked_output(case):
    reference = forward(case)
    sparse_dit.enable_sparse_attention(case.model, "dense", **DENSE)
    assert rel_err(forward(case), reference) < 1e-5
    stats = sparse_dit.sparse_attention_stats(case.model)
    assert stats.calls > 0 and stats.density() == pytest.approx(1.0)


def test_window_changes_output_and_reports_the_plans_density(case):
    reference = forward(case)
    sparse_dit.enable_sparse_attention(case.model, "window", **WINDOW)
    out = forward(case)
    assert rel_err(out, reference) > 1e-4
    stats = sparse_dit.sparse_attention_stats(case.model)
    ctx = PlanContext(grid=case.grid, text_len=case.text_len, text_position=case.text_position)
    expected = WindowPlanner(resolve_config("window", **WINDOW)).plan(None, None, ctx, SiteState()).density
    assert expected < 1.0
    for (step, layer), entry in stats.entries.items():
        assert entry.sparse_calls == entry.calls
        assert entry.density == pytest.approx(expected)


def test_grid_and_text_span_match_the_models_patching(case):
    sparse_dit.enable_sparse_attention(case.model, "dense", **DENSE)
    forward(case)
    stats = sparse_dit.sparse_attention_stats(case.model)
    assert {(e.grid, e.text_len) for e in stats.entries.values()} == {(case.grid, case.text_len)}
    layers = sorted({layer for _, layer in stats.entries})
    assert layers == list(range(len(layers))) and layers


def test_disable_restores_the_exact_model(case):
    before = module_state(case.model)
    reference = forward(case)
    sparse_dit.enable_sparse_attention(case.model, "window", **WINDOW)
    forward(case)
    sparse_dit.disable_sparse_attention(case.model)
    assert torch.equal(forward(case), reference)
    assert module_state(case.model) == before


@pytest.mark.parametrize("family", ["wan", "cogvideox", "flux", "hunyuan_video"])
def test_batch_two_and_two_resolutions_without_re_enabling(family):
    small = make_transformer_case(family, batch=2)
    f, h, w = small.grid
    raw = {"wan": (3, 12, 16), "cogvideox": (3, 12, 16), "flux": (None, 10, 12), "hunyuan_video": (3, 6, 8)}[family]
    large = make_transformer_case(family, batch=2, frames=raw[0], height=raw[1], width=raw[2])
    assert large.grid != small.grid
    expected = [forward(c) for c in (small, large)]
    sparse_dit.enable_sparse_attention(small.model, "dense", **DENSE)
    large.model = small.model  # same weights (same seed), one enabled model, two resolutions
    for c, ref in zip((small, large), expected):
        assert rel_err(forward(c), ref) < 1e-5
        grids = {e.grid for e in sparse_dit.sparse_attention_stats(small.model).entries.values()}
        assert grids == {c.grid}
