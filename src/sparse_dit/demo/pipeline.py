"""`ShapesVideoPipeline`: the embedded demo model, a diffusers `DiffusionPipeline` over `WanTransformer3DModel`.

Pixel space (no VAE): a clip of F frames of H x W pixels is the (C, F, H, W) latent the transformer denoises, patched
(1, 4, 4), so the default 16 x 64 x 64 clip is 16 x 16 x 16 = 4096 video tokens. C is 4: RGB, and the objects'
coverage of each pixel (a colour-free mask that the renderer draws for training and generation drops from the
frames). Text is a T5 encoder with no layers over a word-level tokenizer of the caption vocabulary, so each caption
token is its own word's embedding; both are built in code and saved with the pipeline.

Departures from a stock Wan model, all because a 4-layer model trained in under an hour on 2 CPU cores needs them
(docs/demo_model.md has the experiments): the transformer also reads coordinate planes (x, y and time in [-1, 1],
with their sines and cosines at 4 frequencies: 27 channels), so a token knows where in the clip it sits without
inferring it from RoPE; it predicts the clean clip x0 (`ShapesVideoPipeline.predict_clean`) rather than the
velocity, and `ShapesVideoPipeline.velocity` converts, so the scheduler sees the usual flow-matching velocity; and
the coverage channel, without which the model learns where an object is only through its colour times its mask,
one colour at a time, and learns the captioned direction slowly or not at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..errors import ConfigError
from .text import tiny_t5_config, word_tokenizer
from .clips import VOCABULARY, parse_caption

MAX_TOKENS = 12  # "a red circle moving up left and a blue square staying still" is 12 words
PATCH = (1, 4, 4)
CHANNELS = 3  # RGB; a model may denoise a coverage channel too, and it reads the coordinate planes
SHIFT = 2.0  # the scheduler's timestep shift, and the shift of the noise levels training draws
MIN_SIGMA = 0.05  # v = (x_t - x0) / t is taken with t at least this, where x0 predictions make v blow up
# An x0-predicting model draws compact objects without guidance, and guidance above ~3 swells them
# (docs/demo_model.md); without it a step costs half as much.
DEFAULT_GUIDANCE = 1.0


def coordinate_planes(times: torch.Tensor, height: int, width: int, frequencies: int = 0) -> torch.Tensor:
    """x, y and time planes in [-1, 1], then sin and cos of pi 2^k times each for k < `frequencies`.

    Returns (3 + 6 * frequencies, F, H, W) for `times` (F,), or (B, 3 + 6 * frequencies, F, H, W) for (B, F).
    """
    ys, xs = torch.linspace(-1, 1, height, device=times.device), torch.linspace(-1, 1, width, device=times.device)
    shape = (*times.shape, height, width)
    planes = torch.stack([xs.view(1, width).expand(shape), ys.view(height, 1).expand(shape),
                          times[..., None, None].expand(shape)])
    # Fourier features: an MLP over raw coordinates learns smooth functions of position first (spectral bias),
    # and a sharp shape at a caption-given place is not one.
    waves = [f(math.pi * 2**k * planes) for k in range(frequencies) for f in (torch.sin, torch.cos)]
    return torch.cat([planes, *waves]).movedim(0, -4)


OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class ShapesVideoPipelineOutput(BaseOutput):
    """frames, for each output_type: "np" a (B, F, H, W, 3) float array in [0, 1]; "pt" a (B, F, 3, H, W) float
    tensor in [0, 1]; "pil" a list of B videos, each a list of F RGB images; "latent" the denoised (B, C, F, H, W)
    float32 latents in [-1, 1] (RGB, then the coverage channel where the model has one), unclamped."""

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


def build_components(heads: int = 2, head_dim: int = 64, layers: int = 4, frequencies: int = 4, seed: int = 0,
                     text_layers: int = 0, coverage: bool = True) -> dict[str, Any]:
    """Untrained components of the demo pipeline; the transformer reads `coordinate_planes(..., frequencies)`.

    `text_layers`: T5 encoder layers; 0 leaves each caption token its word embedding, unmixed with the others.
    `coverage`: the transformer also denoises a fourth channel, how much of each pixel the objects cover (a
    colour-free object mask; training renders it, generation drops it).
    """
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    config = tiny_t5_config()
    config.num_layers, config.vocab_size = text_layers, len(VOCABULARY) + 4
    text_encoder = T5EncoderModel(config).eval()
    transformer = WanTransformer3DModel(
        patch_size=PATCH, num_attention_heads=heads, attention_head_dim=head_dim, in_channels=CHANNELS + coverage + 3 + 6 * frequencies, out_channels=CHANNELS + coverage,
        text_dim=config.d_model, freq_dim=256, ffn_dim=4 * heads * head_dim, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    )
    return {
        "tokenizer": word_tokenizer(VOCABULARY, model_max_length=MAX_TOKENS),
        "text_encoder": text_encoder,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=SHIFT),
    }


class ShapesVideoPipeline(DiffusionPipeline):
    """Text-to-video for captions like "a red circle moving left", with diffusers' calling conventions."""

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, tokenizer, text_encoder, transformer: WanTransformer3DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Caption embeddings (B, MAX_TOKENS, d); an empty caption is the unconditional one."""
        for prompt in prompts:
            if prompt:
                parse_caption(prompt)  # unknown words raise, listing the vocabulary
        tokens = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.text_encoder.device)
        mask = tokens.attention_mask.to(ids.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return hidden * mask[..., None]  # padding contributes nothing, as in Wan's zero-padded text

    def predict_clean(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                      times: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's prediction of the clean clip x0 (B, C, F, H, W) from noisy clips `latents` (B, C, F, H, W),
        C = `latent_channels`.

        timestep: (B,) in [0, 1000], the noise level t times 1000; text: (B, MAX_TOKENS, d) from `encode_prompt`;
        times: the clip time of each frame in [-1, 1], (F,) or (B, F) (default: evenly spaced, the whole clip).
        """
        b, _, f, h, w = latents.shape
        if times is None:
            times = torch.linspace(-1, 1, f, device=latents.device)
        frequencies = (self.transformer.config.in_channels - self.latent_channels - 3) // 6
        planes = coordinate_planes(times.to(latents.device, latents.dtype), h, w, frequencies)
        # The transformer runs in its own dtype (bf16 or fp16 after `pipe.to(dtype)`), the caller in its own.
        dtype = self.transformer.dtype
        hidden = torch.cat([latents, planes.expand(b, -1, f, h, w)], dim=1).to(dtype)
        clean = self.transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text.to(dtype),
                                 return_dict=False)[0]
        return clean.to(latents.dtype)

    @property
    def latent_channels(self) -> int:
        """Channels of the denoised clip: 3 (RGB), or 4 with the coverage channel (`build_components(coverage=True)`)."""
        return self.transformer.config.out_channels

    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 times: torch.Tensor | None = None) -> torch.Tensor:
        """The flow-matching velocity noise - x0 implied by `predict_clean` (same arguments and shape):
        v = (x_t - x0) / max(t, MIN_SIGMA)."""
        clean = self.predict_clean(latents, timestep, text, times)
        sigma = (timestep.to(latents.dtype) / 1000).clamp_min(MIN_SIGMA).view(-1, 1, 1, 1, 1)
        return (latents - clean) / sigma

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        """Raise for sizes the patching cannot take, naming the nearest valid ones."""
        _, ph, pw = PATCH
        for name, value, step in (("height", height, ph), ("width", width, pw)):
            if value < step or value % step:
                low, high = max(step, value - value % step), value - value % step + step
                raise ConfigError(f"{name}={value} must be a multiple of {step} (the patch size); try {low} or {high}")
        if num_frames < 1:
            raise ConfigError(f"num_frames={num_frames} must be >= 1")

    def check_call(self, prompts: list[str], negatives: list[str], num_videos_per_prompt: int, output_type: str,
                   generator: torch.Generator | list[torch.Generator] | None) -> None:
        """Raise `ConfigError` for call arguments that do not fit together, before anything is computed."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type={output_type!r} is not one of {', '.join(map(repr, OUTPUT_TYPES))}")
        if isinstance(num_videos_per_prompt, bool) or not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ConfigError(f"num_videos_per_prompt={num_videos_per_prompt!r} must be an int >= 1")
        if len(negatives) != len(prompts):
            raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt, or one "
                              "string for all")
        videos = len(prompts) * num_videos_per_prompt
        if isinstance(generator, list) and len(generator) != videos:
            raise ConfigError(f"a list of {len(generator)} generators for {videos} videos ({len(prompts)} prompts x "
                              f"num_videos_per_prompt={num_videos_per_prompt}): give one generator per video, or one "
                              "for all")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 16,
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 20,
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ShapesVideoPipelineOutput | tuple:
        """Generate `num_videos_per_prompt` clips per prompt, in prompt order (each prompt's videos together).

        `generator`: one for all videos (drawn in one go, as diffusers does), or a list of one per video, which
        makes each video's clip independent of the batch it is generated in. `output_type`: see
        `ShapesVideoPipelineOutput`. The transformer runs in its dtype (`pipe.to(torch.bfloat16)` works); the
        latents and the scheduler step stay float32, as in diffusers' pipelines.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        self.check_call(prompts, negatives, num_videos_per_prompt, output_type, generator)
        self.check_size(num_frames, height, width)
        device = self.transformer.device
        cfg = guidance_scale > 1.0
        # Each prompt's videos sit together, as diffusers repeats prompt embeddings (repeat_interleave).
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_videos_per_prompt)]
        text = self.encode_prompt(prompts + negatives if cfg else prompts)
        batch = len(prompts)
        # Noise drawn in float32 on the CPU: the same clip on any device and in any dtype the transformer runs in.
        latents = randn_tensor((batch, self.latent_channels, num_frames, height, width), generator=generator,
                               device=torch.device("cpu"), dtype=torch.float32).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(self.scheduler.timesteps):
                self._current_timestep = t
                model_in = torch.cat([latents, latents]) if cfg else latents
                with self.transformer.cache_context("cond_uncond" if cfg else "cond"):
                    pred = self.velocity(model_in, t.expand(model_in.shape[0]), text)
                if cfg:
                    cond, uncond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents}
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                progress.update()
        self._current_timestep = None
        frames = latents if output_type == "latent" else to_frames(latents, output_type)
        self.maybe_free_model_hooks()
        return ShapesVideoPipelineOutput(frames=frames) if return_dict else (frames,)


def to_frames(latents: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]:
    """Denoised clips (B, C, F, H, W) in [-1, 1] as frames in [0, 1] of `output_type` "pt", "np" or "pil"."""
    frames = ((latents[:, :CHANNELS].float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W)
    if output_type == "pt":
        return frames
    array = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, F, H, W, 3)
    if output_type == "np":
        return array
    # As diffusers' numpy_to_pil: x255, rounded, uint8; one list of frames per video.
    pixels = (array * 255).round().astype(np.uint8)
    return [[PIL.Image.fromarray(frame) for frame in video] for video in pixels]
