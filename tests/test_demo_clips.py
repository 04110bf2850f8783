"""The procedural clips of the demo model and the pixel scorer that judges generated clips."""

import pytest
import torch

from sparse_dit import ConfigError
from sparse_dit.demo.clips import COLOURS, MOTIONS, SHAPES, ClipSpec, ShapeSpec, is_held_out, parse_caption, render, render_with_coverage, sample_spec
from sparse_dit.demo.score import clip_passes


def test_rendering_is_deterministic_and_in_range():
    spec = parse_caption("a red circle moving left")
    a = render(spec, 16, 64, 64, torch.Generator().manual_seed(1))
    b = render(spec, 16, 64, 64, torch.Generator().manual_seed(1))
    assert a.shape == (16, 3, 64, 64) and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_coverage_marks_the_object_pixels():
    spec = parse_caption("a red circle moving left and a blue square staying still")
    video, cover = render_with_coverage(spec, 16, 64, 64, torch.Generator().manual_seed(1))
    assert torch.equal(video, render(spec, 16, 64, 64, torch.Generator().manual_seed(1)))
    assert cover.shape == (16, 64, 64) and 0 <= float(cover.min()) and float(cover.max()) == 1
    red, blue = (torch.tensor(COLOURS[c]).view(1, 3, 1, 1) for c in ("red", "blue"))
    near = lambda colour: ((video - colour).norm(dim=1) < 0.05)  # noqa: E731
    assert bool((cover[near(red) | near(blue)] > 0.9).all())
    assert 0.04 < float((cover > 0.5).float().mean()) < 0.2  # two objects of 13-15% of the side


def test_scorer_passes_ground_truth_and_fails_wrong_captions():
    gen = torch.Generator().manual_seed(0)
    passed = 0
    for _ in range(40):
        spec = sample_spec(gen, two_objects_p=0.0)
        video = render(spec, 16, 64, 64, gen)
        passed += clip_passes(video, spec)
        obj = spec.objects[0]
        if obj.motion != "still":  # the same clip read backwards moves the opposite way
            assert not clip_passes(video.flip(0), spec)
        wrong_colour = next(c for c in COLOURS if c != obj.colour)
        assert not clip_passes(video, ClipSpec((ShapeSpec(wrong_colour, obj.shape, obj.motion),)))
    assert passed == 40


def test_held_out_combinations_cover_every_factor():
    held = [ShapeSpec(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS if is_held_out(ShapeSpec(c, s, m))]
    assert len(held) == 18
    assert {o.colour for o in held} == set(COLOURS) and {o.shape for o in held} == set(SHAPES)
    assert {o.motion for o in held} == set(MOTIONS)
    gen = torch.Generator().manual_seed(0)
    assert not any(is_held_out(o) for _ in range(200) for o in sample_spec(gen).objects)
    assert all(is_held_out(o) for _ in range(20) for o in sample_spec(gen, held_out=True).objects)


def test_captions_round_trip_and_bad_words_list_the_vocabulary():
    text = "a blue square moving up right and a yellow triangle staying still"
    assert parse_caption(text).caption == text
    with pytest.raises(ConfigError, match="knows: .*circle"):
        parse_caption("a purple circle moving left")
    with pytest.raises(ConfigError, match="captions read"):
        parse_caption("a circle red moving left")


def test_evaluation_caption_sets_respect_the_hold_out():
    from sparse_dit.demo.evaluate import CAPTIONS, HELD_OUT_CAPTIONS

    assert not any(is_held_out(o) for c in CAPTIONS for o in parse_caption(c).objects)
    assert all(is_held_out(o) for c in HELD_OUT_CAPTIONS for o in parse_caption(c).objects)
