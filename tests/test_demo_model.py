"""The shipped demo model: loads from inside the package, follows its captions, and `sparse-dit demo` runs on it."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

import sparse_dit
from sparse_dit.cli import main
from sparse_dit.demo import WEIGHTS, load_demo_pipeline
from sparse_dit.evals.locality_report import untrained_copy
from sparse_dit.demo.clips import as_latents, parse_caption, render_with_coverage
from sparse_dit.demo.evaluate import CAPTIONS, clean_clip, motion_from_noise, predictions_by_noise, sample_sheet
from sparse_dit.demo.score import clip_passes
from sparse_dit.demo.pipeline import ShapesVideoPipeline

MAX_BYTES = 25 * 2**20


@pytest.fixture(scope="module")
def pipe():
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_weights_ship_inside_the_package_within_budget(pipe):
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert 0 < size <= MAX_BYTES
    assert isinstance(pipe, ShapesVideoPipeline) and isinstance(pipe.transformer, WanTransformer3DModel)
    assert not pipe.transformer.training
    assert sparse_dit.load_demo_pipeline is load_demo_pipeline  # the public name the README uses


def test_it_follows_its_captions(pipe):
    # `sparse-dit score-demo` scores 5 captions x 20 seeds (README); one seed each, in one batch, is what the
    # suite can afford. Seeds 1000+, never used in training, at the demo settings.
    videos = pipe(prompt=list(CAPTIONS), generator=[torch.Generator().manual_seed(1000) for _ in CAPTIONS],
                  output_type="pt").frames
    assert sum(clip_passes(video, parse_caption(c)) for video, c in zip(videos, CAPTIONS)) >= 4
    assert motion_from_noise(pipe, seeds=1) > 0.3  # it knows the direction from the caption alone, before any clip


def test_it_learned_to_denoise_its_clips(pipe):
    # From a half-noised clip it recovers the clip far better than its untrained twin.
    gen = torch.Generator().manual_seed(7)
    captions = ["a red circle moving right", "a blue square moving up and a yellow triangle staying still"]
    x0 = torch.cat([clean_clip(c, gen, 64, pipe.latent_channels) for c in captions])
    t = 0.5
    xt = (1 - t) * x0 + t * torch.randn(x0.shape, generator=gen)

    def error(model):
        with torch.no_grad():
            pred = model.predict_clean(xt, torch.full((2,), t * 1000), model.encode_prompt(captions))
        return float(((pred - x0) ** 2).mean())

    trained, untrained = error(pipe), error(untrained_copy(pipe))
    assert trained < 0.1 * untrained, (trained, untrained)


def test_generates_at_twice_the_demo_token_count(pipe):
    frames = pipe(prompt="a green square moving up", num_frames=32, height=64, width=64, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert frames.shape == (1, 32, 3, 64, 64) and torch.isfinite(frames).all()  # 32 x 16 x 16 = 8192 tokens


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--num-frames", "8", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["density"] < 1 and summary["psnr"] > 10 and summary["total_s"] > 0
    for name in ("side_by_side.mp4", "side_by_side.gif"):
        assert (tmp_path / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "density" in printed and "PSNR" in printed and "end-to-end" in printed


def test_demo_command_rejects_unknown_words(tmp_path, capsys):
    assert main(["demo", "--prompt", "a purple circle moving left", "--out", str(tmp_path)]) == 2
    assert "knows: " in capsys.readouterr().err


def test_predictions_by_noise_figure(pipe):
    image, errors = predictions_by_noise(pipe, levels=(0.3, 0.98), frames=(0, 15))
    assert image.size == (2 * (2 * 64 + 2), 2 * (3 * 64 + 2 * 2))  # 2 frames wide; the clip and 2 levels tall
    assert errors[0.3] < errors[0.98]  # the less noise, the closer the prediction


def test_sample_sheet(pipe):
    captions = CAPTIONS[:2]
    image = sample_sheet(pipe, captions, frames=(0, 3), scale=1, num_frames=4, height=32, width=32, num_inference_steps=2)
    assert image.size == (2 * 32 + 2, 2 * (14 + 32))  # 2 frames wide; a label and a clip per caption


class _Oracle:
    """A stand-in pipeline whose prediction from noise is a rendered clip of the caption, optionally played backwards
    or with the coverage channel (`latent_channels` 4)."""

    def __init__(self, backwards: bool = False, latent_channels: int = 3):
        self.backwards, self.latent_channels = backwards, latent_channels

    def encode_prompt(self, captions):
        return captions

    def predict_clean(self, latents, timestep, captions):
        clip, coverage = render_with_coverage(parse_caption(captions[0]), 16, 64, 64, torch.Generator().manual_seed(7))
        clip, coverage = (clip.flip(0), coverage.flip(0)) if self.backwards else (clip, coverage)
        return as_latents(clip, coverage if self.latent_channels > 3 else None)


@pytest.mark.parametrize("channels", [3, 4])
def test_motion_from_noise_measures_the_captioned_motion(channels):
    oracle = _Oracle(latent_channels=channels)
    assert motion_from_noise(oracle, seeds=1) == pytest.approx(1.0, abs=0.15)  # paths differ only by the jitter
    assert motion_from_noise(_Oracle(True, channels), seeds=1) == pytest.approx(-1.0, abs=0.15)


def test_attention_is_concentrated_and_the_diffuse_variant_is_not():
    from sparse_dit.search import measure_concentration

    call = {"prompt": "a red circle moving right", "num_inference_steps": 5, "output_type": "pt",
            "generator": torch.Generator().manual_seed(0)}
    medians = {}
    for variant in ("concentrated", "diffuse"):
        pipe = load_demo_pipeline(variant)
        pipe.set_progress_bar_config(disable=True)
        medians[variant] = measure_concentration(pipe, [dict(call)], steps=[2, 3]).median()
    # docs/demo_model.md: the top 20% of 64-token key blocks hold most of a query block's attention in the
    # default model, and about half of it in the diffuse one.
    assert medians["concentrated"] > 0.75 and medians["diffuse"] < 0.6, medians
