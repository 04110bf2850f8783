"""Quality metrics on constructed videos whose answers are known."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_dit.evals import metrics

T, H, W = 8, 64, 64


def texture(frames: int = T, shift: tuple[int, int] = (0, 0), h: int = H, w: int = W) -> torch.Tensor:
    """A smooth random texture whose content moves by `shift` = (dx, dy) pixels per frame: (frames, 3, h, w)."""
    dx, dy = shift
    pad = max(abs(dx), abs(dy)) * frames + 8
    noise = torch.rand(1, 3, h + 2 * pad, w + 2 * pad)
    big = metrics._separable(noise, metrics._gaussian_kernel(1.5, 4, torch.float32), "reflect")[0]
    return torch.stack([big[:, pad + t * dy:pad + t * dy + h, pad + t * dx:pad + t * dx + w] for t in range(frames)])


def blocks(frames: int = 4) -> torch.Tensor:
    """A sharp piecewise-constant image (8 x 8 blocks of random colours in [0.2, 0.8]) repeated over frames."""
    image = F.interpolate(0.2 + 0.6 * torch.rand(1, 3, H // 8, W // 8), size=(H, W), mode="nearest")
    return image.expand(frames, -1, -1, -1).clone()


def pattern(channels: int, phase: float) -> torch.Tensor:
    """A deterministic smooth pattern (3, channels, 40, 48) in [0.05, 0.95], independent of any RNG."""
    t = torch.arange(3, dtype=torch.float64).view(-1, 1, 1, 1)
    c = torch.arange(channels, dtype=torch.float64).view(1, -1, 1, 1)
    y = torch.arange(40, dtype=torch.float64).view(1, 1, -1, 1)
    x = torch.arange(48, dtype=torch.float64).view(1, 1, 1, -1)
    return (0.5 + 0.3 * torch.sin(0.37 * x + 0.23 * y + phase + c + 0.5 * t) * torch.cos(0.11 * y - 0.07 * x * c)
            + 0.15 * torch.sin(1.9 * x * y / 48 + phase))


# -- PSNR ------------------------------------------------------------------------------------------

def test_psnr_identical_is_inf():
    video = torch.rand(T, 3, H, W)
    assert metrics.psnr(video, video.clone()) == math.inf


def test_psnr_caps_identical_frames_when_others_differ():
    reference = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    video = reference.clone()
    video[1] += 0.1  # mse 1e-2: 20 dB
    assert metrics.psnr(video, reference) == pytest.approx((metrics.PSNR_CAP_DB + 20.0) / 2, abs=1e-9)


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.1])
def test_psnr_of_gaussian_noise(sigma):
    reference = torch.full((T, 3, H, W), 0.5)  # unclamped noise: no clipping distorts the variance
    video = reference + sigma * torch.randn_like(reference)
    assert metrics.psnr(video, reference) == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.2)


def test_psnr_accepts_channels_last():
    reference = torch.rand(T, 3, H, W)
    video = reference + 0.05 * torch.randn_like(reference)
    assert metrics.psnr(video.permute(0, 2, 3, 1), reference.permute(0, 2, 3, 1)) == pytest.approx(
        metrics.psnr(video, reference))


# -- SSIM ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_identical_is_one(channels):
    video = torch.rand(T, channels, H, W)
    assert metrics.ssim(video, video.clone()) == pytest.approx(1.0, abs=1e-6)


def test_ssim_decreases_with_noise():
    reference = texture()
    scores = [metrics.ssim(reference + s * torch.randn_like(reference), reference) for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 0.9 and scores[-1] < 0.3


@pytest.mark.parametrize(("channels", "expected"), [(3, 0.9118941033), (1, 0.9113008733)])
def test_ssim_matches_skimage(channels, expected):
    # Expected: mean over frames of skimage 0.26.0 structural_similarity(frame, ref, gaussian_weights=True,
    # sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0 for RGB) on these same patterns.
    assert metrics.ssim(pattern(channels, 0.0), pattern(channels, 0.4)) == pytest.approx(expected, abs=1e-4)


def test_ssim_needs_an_11_pixel_window():
    with pytest.raises(ValueError, match="11 x 11"):
        metrics.ssim(torch.rand(2, 3, 10, 32), torch.rand(2, 3, 10, 32))


def test_reference_scores_and_absent_lpips():
    reference = texture()
    video = reference + 0.05 * torch.randn_like(reference)
    scores = metrics.reference_scores(video, reference)
    assert set(scores) == {"psnr", "ssim", "lpips"}
    assert scores["lpips"] is None and metrics.lpips(video, reference) is None
    assert scores["psnr"] == pytest.approx(26.0, abs=0.2) and 0 < scores["ssim"] < 1


def test_mismatched_or_malformed_videos_are_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.ssim(torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        metrics.temporal_flickering(torch.rand(4, 16, 16, 3))
    with pytest.raises(ValueError, match="at least 3 frames"):
        metrics.motion_smoothness(torch.rand(2, 3, 16, 16))


# -- temporal flickering ---------------------------------------------------------------------------

def test_temporal_flickering_by_hand():
    # Pairs differ by 51 grey levels everywhere, then by 0: MAEs 51 and 0, so (255 - 51 + 255 - 0) / 2 / 255 = 0.9.
    video = torch.tensor([0.0, 51 / 255, 51 / 255]).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    assert metrics.temporal_flickering(video) == pytest.approx(0.9, abs=1e-12)


def test_temporal_flickering_static_is_one_and_noise_is_lower():
    assert metrics.temporal_flickering(texture()[:1].expand(T, -1, -1, -1)) == 1.0
    assert metrics.temporal_flickering(torch.rand(T, 3, H, W)) < 0.75  # E|U - U'| = 1/3 of the range


# -- optical flow, motion magnitude, dynamic degree ------------------------------------------------

@pytest.mark.parametrize("shift", [(1, 0), (0, 2), (1, 1), (2, -1), (-2, -2)])
def test_flow_recovers_a_known_shift(shift):
    dx, dy = shift
    video = texture(shift=shift)
    assert metrics.motion_magnitude(video) == pytest.approx(math.hypot(dx, dy), rel=0.2)
    # Content moving by (dx, dy) means first(x) = second(x - (dx, dy)).
    mean_flow = metrics.optical_flow(video[:-1], video[1:]).mean(dim=(0, 2, 3))
    assert mean_flow.tolist() == pytest.approx([-dx, -dy], abs=0.2)


def test_flow_of_a_static_video_is_zero():
    video = texture()[:1].expand(T, -1, -1, -1)
    assert metrics.motion_magnitude(video) < 0.01
    assert metrics.dynamic_degree(video) == 0.0


def test_dynamic_degree_threshold_scales_with_resolution():
    # The threshold at 64 x 64 is 6 * 64 / 256 = 1.5 px per frame.
    assert metrics.dynamic_degree(texture(shift=(1, 0))) == 0.0
    assert metrics.dynamic_degree(texture(shift=(3, 0))) == 1.0


# -- motion smoothness -----------------------------------------------------------------------------

def test_motion_smoothness_prefers_linear_motion_to_shuffled_frames():
    video = texture(shift=(1, 1))
    smooth = metrics.motion_smoothness(video)
    shuffled = metrics.motion_smoothness(video[torch.tensor([3, 0, 6, 2, 7, 1, 5, 4])])
    assert smooth > 0.99 and smooth > shuffled + 0.02
    assert metrics.motion_smoothness(video[:1].expand(T, -1, -1, -1)) == pytest.approx(1.0, abs=1e-6)


# -- subject and background consistency ------------------------------------------------------------

@pytest.mark.parametrize("name", ["subject_consistency", "background_consistency"])
def test_consistency(name):
    score = getattr(metrics, name)
    static = texture()[:1].expand(T, -1, -1, -1)
    assert score(static) == pytest.approx(1.0, abs=1e-9)
    assert score(torch.full((T, 1, H, W), 0.3)) == pytest.approx(1.0, abs=1e-9)  # featureless, still constant
    slow, noise = score(texture(shift=(1, 0))), score(torch.rand(T, 3, H, W))
    assert 0 <= noise < slow - 0.2 and slow <= 1


def test_subject_and_background_look_at_different_regions():
    video = texture()[:1].expand(T, -1, -1, -1).clone()
    video[:, :, H // 4:-H // 4, W // 4:-W // 4] = torch.rand(T, 3, H // 2, W // 2)  # only the centre changes
    assert metrics.background_consistency(video) == pytest.approx(1.0, abs=1e-9)
    assert metrics.subject_consistency(video) < 0.8


# -- imaging quality -------------------------------------------------------------------------------

def test_imaging_quality_drops_with_blur_and_noise():
    sharp = blocks()
    blurred = metrics._separable(sharp, metrics._gaussian_kernel(2.0, 6, torch.float32), "replicate")
    noisy = sharp + 0.1 * torch.randn_like(sharp)
    scores = [metrics.imaging_quality(v) for v in (sharp, blurred, noisy)]
    assert 0 <= min(scores) and max(scores) < 1
    assert scores[0] > scores[1] + 0.2 and scores[0] > scores[2] + 0.2, scores


# -- VBench summary --------------------------------------------------------------------------------

def test_vbench_scores():
    scores = metrics.vbench_scores(texture(shift=(1, 0)))
    assert list(scores) == ["temporal_flickering", "motion_smoothness", "subject_consistency",
                            "background_consistency", "dynamic_degree", "imaging_quality"]
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in scores.values()), scores
