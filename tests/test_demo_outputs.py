"""The demo pipeline's call options as diffusers defines them: output types, half precision, several videos per prompt."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch

from sparse_dit import ConfigError
from sparse_dit.demo import load_demo_pipeline

PROMPTS = ["a red circle moving left", "a blue square moving up"]
SMALL = dict(num_frames=4, height=32, width=32, num_inference_steps=3)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_output_types(pipe):
    np_frames = pipe(PROMPTS[0], **SMALL, generator=seeded()).frames  # "np" is the default
    pil = pipe(PROMPTS[0], **SMALL, generator=seeded(), output_type="pil").frames
    assert isinstance(pil, list) and len(pil) == 1 and len(pil[0]) == 4
    assert all(isinstance(im, PIL.Image.Image) and im.mode == "RGB" and im.size == (32, 32) for im in pil[0])
    assert np.array_equal(np.stack([np.asarray(im) for im in pil[0]]), (np_frames[0] * 255).round().astype(np.uint8))

    latents = pipe(PROMPTS[0], **SMALL, generator=seeded(), output_type="latent").frames
    assert latents.shape == (1, pipe.latent_channels, 4, 32, 32) and latents.dtype == torch.float32
    pt = pipe(PROMPTS[0], **SMALL, generator=seeded(), output_type="pt").frames
    assert torch.equal(pt, ((latents[:, :3].clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4))


def test_unknown_output_type_is_refused(pipe):
    with pytest.raises(ConfigError, match="'np', 'pt', 'pil', 'latent'"):
        pipe(PROMPTS[0], **SMALL, output_type="pill")


# Largest and mean absolute difference from float32 frames in [0, 1], 3 steps at 4x32x32. Measured: bf16 0.010 and
# 0.0010, fp16 0.0030 and 0.00025 (0.027 and 0.0022 for bf16 with guidance 3).
TOLERANCE = {torch.bfloat16: (0.03, 0.003), torch.float16: (0.01, 0.001)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_close_to_float32(pipe, dtype):
    reference = pipe(PROMPTS, **SMALL, generator=[seeded(0), seeded(1)], output_type="pt").frames
    half = copy.deepcopy(pipe).to(dtype)  # a copy: casting back to float32 would leave rounded weights
    assert half.transformer.dtype == dtype
    frames = half(PROMPTS, **SMALL, generator=[seeded(0), seeded(1)], output_type="pt").frames
    assert frames.dtype == torch.float32
    largest, mean = TOLERANCE[dtype]
    diff = (frames - reference).abs()
    assert float(diff.max()) < largest and float(diff.mean()) < mean
    assert half(PROMPTS[0], **SMALL, guidance_scale=3.0, generator=seeded(), output_type="np").frames.shape == (1, 4, 32, 32, 3)


def test_num_videos_per_prompt(pipe):
    generators = [seeded(i) for i in range(4)]
    videos = pipe(PROMPTS, **SMALL, num_videos_per_prompt=2, generator=generators, output_type="pt").frames
    assert videos.shape == (4, 4, 3, 32, 32)
    # Each prompt's videos together, as diffusers orders them; with a generator per video, each is the clip that
    # generator gives alone (up to float rounding of the batched matmuls).
    for i in range(4):
        alone = pipe(PROMPTS[i // 2], **SMALL, generator=seeded(i), output_type="pt").frames
        torch.testing.assert_close(videos[i], alone[0], atol=1e-5, rtol=0)
    # One generator for all: the videos of one prompt differ.
    pair = pipe(PROMPTS[0], **SMALL, num_videos_per_prompt=2, generator=seeded(), output_type="pt").frames
    assert float((pair[0] - pair[1]).abs().max()) > 0.05
    guided = pipe(PROMPTS, negative_prompt=["", "a red circle moving left"], **SMALL, guidance_scale=2.0,
                  num_videos_per_prompt=3, generator=seeded(), output_type="pt").frames
    assert guided.shape == (6, 4, 3, 32, 32)


def test_bad_batch_arguments_are_refused(pipe):
    with pytest.raises(ConfigError, match="3 generators for 4 videos"):
        pipe(PROMPTS, **SMALL, num_videos_per_prompt=2, generator=[seeded()] * 3)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="num_videos_per_prompt"):
            pipe(PROMPTS[0], **SMALL, num_videos_per_prompt=bad)
    with pytest.raises(ConfigError, match="negative prompts"):
        pipe(PROMPTS, negative_prompt=["", "", ""], **SMALL)
