"""Capturing sampled attention rows from a running pipeline, window mass, and attention-map images."""

import pytest
import torch

from sparse_dit.evals.attention_maps import attention_map, labelled_grid
from sparse_dit.evals.locality_report import locality, most_local_heads, untrained_copy
from sparse_dit.errors import SparseDiTError
from sparse_dit.patterns import PlanContext
from sparse_dit.plugin.api import runtime_of
from sparse_dit.evals.locality import window_mass
from sparse_dit.search import AttentionSample, capture_attention

from tiny_models import make_pipeline


def run(pipe, kwargs):
    out = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)})
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("name", ["wan", "hunyuan_video"])
def test_capture_samples_rows_and_leaves_the_output_dense(name):
    pipe, kwargs = make_pipeline(name)
    reference = run(pipe, kwargs)
    samples = capture_attention(pipe, steps=[1], rows=5, seed=0, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert samples and {s.step for s in samples} == {1}
    layers = {s.layer for s in samples}
    assert layers == set(range(len(layers)))
    for s in samples:
        b, h, r, seq = s.probs.shape
        assert r == 5 and seq == s.ctx.seq_len and h == s.ctx.heads
        torch.testing.assert_close(s.probs.sum(-1), torch.ones(b, h, r), atol=1e-5, rtol=0)
        # Sampled rows are video queries.
        assert ((s.rows >= s.ctx.video_start) & (s.rows < s.ctx.video_start + s.ctx.num_video_tokens)).all()
    # Capture runs the model's own dense attention and removes itself afterwards.
    with pytest.raises(SparseDiTError, match="not enabled"):
        runtime_of(pipe)
    torch.testing.assert_close(run(pipe, kwargs), reference, atol=0, rtol=0)


def test_capture_rejects_steps_that_never_run():
    pipe, kwargs = make_pipeline("wan")
    with pytest.raises(SparseDiTError, match="num_inference_steps"):
        capture_attention(pipe, steps=[99], rows=2, **kwargs)


def _sample(probs_fn, grid=(3, 4, 5), text_len=2, text_position="suffix"):
    ctx = PlanContext(grid=grid, text_len=text_len, text_position=text_position, heads=2, batch=1, layer=0)
    rows = torch.tensor([0, 17, 59])
    probs = torch.stack([probs_fn(ctx, int(r)) for r in rows], dim=0)  # (R, S)
    return AttentionSample(ctx, rows, probs.expand(1, 2, *probs.shape).clone())


def test_window_mass_of_self_attention_is_one_and_of_uniform_is_the_window_share():
    onehot = _sample(lambda ctx, r: torch.nn.functional.one_hot(torch.tensor(r), ctx.seq_len).float())
    mass, uniform = window_mass(onehot, (3, 3, 3))
    torch.testing.assert_close(mass, torch.ones(1, 2))
    flat = _sample(lambda ctx, r: torch.full((ctx.seq_len,), 1 / ctx.seq_len))
    mass, uniform = window_mass(flat, (3, 3, 3))
    # Row 0 is a corner (2x2x2 keys), row 17 = (0, 3, 2) an edge (2x2x3), row 59 = (2, 3, 4) a corner.
    expected = (8 + 12 + 8) / 3 / 62
    assert uniform == pytest.approx(expected)
    torch.testing.assert_close(mass, torch.full((1, 2), expected))
    # Text keys are never inside the window.
    text = _sample(lambda ctx, r: torch.nn.functional.one_hot(torch.tensor(ctx.seq_len - 1), ctx.seq_len).float())
    assert float(window_mass(text, (3, 3, 3))[0].max()) == 0.0


def test_locality_table_ranks_heads_and_maps_draw():
    onehot = _sample(lambda ctx, r: torch.nn.functional.one_hot(torch.tensor(r), ctx.seq_len).float())
    flat = _sample(lambda ctx, r: torch.full((ctx.seq_len,), 1 / ctx.seq_len))
    table = locality([onehot], [flat], (3, 3, 3))
    assert len(table) == 1 and table[0].trained == pytest.approx(1.0) and table[0].untrained == pytest.approx(table[0].uniform)
    assert sorted(most_local_heads(table, 2)) == [(0, 0), (0, 1)]
    image = attention_map(onehot, head=0, row=1, scale=4)
    # 3 frames tile as 2 columns x 2 rows of 4x5 tokens, 4 px each, 2 px gaps.
    assert image.size == (2 * 5 * 4 + 2, 2 * 4 * 4 + 2)
    sheet = labelled_grid([[("a", image), ("b", image)]])
    assert sheet.width > 2 * image.width and sheet.height > image.height


def test_untrained_copy_reinitialises_only_the_transformer():
    pipe, _ = make_pipeline("wan")
    twin = untrained_copy(pipe, seed=123)  # the tiny model is itself a seed-0 init
    assert twin.text_encoder is pipe.text_encoder and twin.transformer is not pipe.transformer
    assert twin.transformer.config == pipe.transformer.config
    assert not torch.equal(next(twin.transformer.parameters()), next(pipe.transformer.parameters()))


@pytest.mark.parametrize("name", ["wan", "hunyuan_video"])
def test_concentration_measures_the_video_tokens_on_the_asked_steps(name, tmp_path):
    from sparse_dit.patterns.block_mass import block_mass, top_share
    from sparse_dit.search import measure_concentration, run_observed

    pipe, kwargs = make_pipeline(name)
    seen = []
    run_observed(pipe, lambda site, ctx, q, k, scale: seen.append((ctx, q.clone(), k.clone())),
                 **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    result = measure_concentration(pipe, [{**kwargs, "generator": torch.Generator().manual_seed(0)}], steps=[1],
                                   fraction=0.25, block_size=4)
    calls = [(ctx, q, k) for ctx, q, k in seen if ctx.step == 1]
    assert sorted(result.shares) == sorted({ctx.layer for ctx, _, _ in calls})
    expected = {}
    for ctx, q, k in calls:  # the same numbers as the block mass of the video span, computed here
        video = slice(ctx.video_start, ctx.video_start + ctx.num_video_tokens)
        expected.setdefault(ctx.layer, []).append(top_share(block_mass(q[:, video], k[:, video], 4), 0.25))
        n = -(-ctx.num_video_tokens // 4)
        assert result.maps[ctx.layer].shape == (ctx.heads, n, n)
    for layer, shares in expected.items():
        torch.testing.assert_close(result.shares[layer], torch.cat(shares))
    assert 0 < result.median() <= 1 and len(result.table()) == len(result.shares)
    assert "| layer | median |" in result.markdown()
    result.draw().save(tmp_path / "maps.png")
    with pytest.raises(SparseDiTError, match="no self-attention call"):
        measure_concentration(pipe, [kwargs], steps=[99])
