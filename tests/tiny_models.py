"""Deterministic tiny random-weight diffusers models and pipelines for CPU tests.

Everything is built from configs in code: no hub access, no downloaded weights or tokenizers.
Every component is constructed right after ``torch.manual_seed(0)``, so two calls of the same
factory give bit-identical weights, and all example inputs come from a seeded ``torch.Generator``.

Two entry points:

* :func:`make_transformer_case` builds one diffusers transformer together with keyword arguments
  for ``model(**kwargs)`` and the token grid / joint-text layout that its attention layers see.
* :func:`make_pipeline` / :func:`make_wan22_pipeline` build a whole text-to-video / text-to-image
  pipeline (tiny text encoders, code-built tokenizers, tiny VAEs) plus call kwargs that run three
  denoising steps with classifier-free guidance switched on.

Timing note: these models are so small that CPU thread oversubscription dominates on a busy machine
(a pipeline run measured ~0.2-0.4 s with ``torch.set_num_threads(1)`` but 1-4 s with 2 threads
under load), so test sessions should call ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5EncoderModel,
    UMT5EncoderModel,
)

from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from sparse_dit.demo.text import tiny_t5_config, word_tokenizer

__all__ = [
    "TinyTransformerCase",
    "TRANSFORMER_FAMILIES",
    "PIPELINE_FAMILIES",
    "make_transformer_case",
    "make_pipeline",
    "make_wan22_pipeline",
    "make_tokenizer",
    "make_tiny_t5",
]

TRANSFORMER_FAMILIES: tuple[str, ...] = (
    "wan",
    "hunyuan_video",
    "hunyuan_video15",
    "cogvideox",
    "cogvideox15",
    "ltx",
    "mochi",
    "flux",
    "sd3",
    "qwenimage",
)
PIPELINE_FAMILIES: tuple[str, ...] = ("wan", "hunyuan_video", "cogvideox", "flux", "ltx")

SEED = 0
PROMPT = "a cat and a dog dance in the rain"
NEGATIVE_PROMPT = "blurry bad quality video"


@dataclass
class TinyTransformerCase:
    """One tiny transformer plus inputs and the token layout its self-attention sees.

    Attributes:
        name: family id (one of :data:`TRANSFORMER_FAMILIES`).
        model: the diffusers transformer, in ``eval()`` mode and fp32.
        kwargs: keyword arguments for ``model(**kwargs)``; ``return_dict=False`` is included.
        grid: token grid ``(F, H, W)`` after patchify, as the model sees it (F = 1 for images).
        text_len: number of non-video tokens in the joint self-attention sequence
            (0 for Wan and LTX, whose self-attention is video-only).
        text_position: ``"prefix"`` (``[text | video]``), ``"suffix"`` (``[video | text]``) or ``"none"``.
    """

    name: str
    model: torch.nn.Module
    kwargs: dict
    grid: tuple[int, int, int]
    text_len: int
    text_position: str

    @property
    def video_tokens(self) -> int:
        """F * H * W."""
        f, h, w = self.grid
        return f * h * w

    @property
    def seq_len(self) -> int:
        """Length of the self-attention sequence: video tokens plus joint text tokens."""
        return self.video_tokens + self.text_len


# --------------------------------------------------------------------------------------------
# Shared builders
# --------------------------------------------------------------------------------------------

_WORDS = (
    "a an the and of in on with at to is are this that "
    "cat dog monkey bird fish horse person man woman child car tree house city street "
    "dance run walk jump fly swim sit sing play rain snow sun sky sea river mountain forest "
    "red green blue black white bright dark small big slow fast "
    "photo video image picture scene cinematic "
    "blurry bad low quality worst ugly distorted noisy negative"
).split()


def _seeded() -> None:
    torch.manual_seed(SEED)


def _generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def make_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer built in code (no files, no sentencepiece); every id is below 100.

    Use ``model_max_length=77`` for CLIP tokenizer slots (Flux, HunyuanVideo ``tokenizer_2``).
    """
    return word_tokenizer(_WORDS, model_max_length=model_max_length)


def make_tiny_t5(umt5: bool = False) -> torch.nn.Module:
    """Tiny T5 (or UMT5, for Wan) encoder: d_model 32, 2 layers, 4 heads, vocab 1000; eval(), seeded."""
    _seeded()
    config = tiny_t5_config(umt5=umt5)
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(config).eval()


def _tiny_clip(hidden_size: int) -> CLIPTextModel:
    """Tiny CLIP text encoder (77 positions); its pooled output has width ``hidden_size``."""
    _seeded()
    config = CLIPTextConfig(
        bos_token_id=3,
        eos_token_id=1,
        pad_token_id=0,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
    )
    return CLIPTextModel(config).eval()


def _tiny_llama(hidden_size: int = 16) -> LlamaModel:
    """Tiny Llama encoder for HunyuanVideo (needs >= 3 hidden states: it reads hidden_states[-3])."""
    _seeded()
    config = LlamaConfig(
        bos_token_id=3,
        eos_token_id=1,
        pad_token_id=0,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=512,
        hidden_act="silu",
    )
    return LlamaModel(config).eval()


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _sizes(frames, height, width, default: tuple[int, int, int]) -> tuple[int, int, int]:
    f, h, w = default
    return (f if frames is None else frames, h if height is None else height, w if width is None else width)


def _build(cls, **config) -> torch.nn.Module:
    _seeded()
    return cls(**config).eval()


# --------------------------------------------------------------------------------------------
# Transformer factories (one per family). Sizes are raw model-input sizes (latent space).
# --------------------------------------------------------------------------------------------


def _wan(batch, frames, height, width) -> TinyTransformerCase:
    """Wan 2.1/2.2: (B,C,F,H,W), Conv3d patch (1,2,2); attn1 video-only self, attn2 cross (text)."""
    f, h, w = _sizes(frames, height, width, (3, 8, 12))
    model = _build(
        WanTransformer3DModel,
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, 4, f, h, w),
        encoder_hidden_states=_randn(g, batch, 12, 16),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        return_dict=False,
    )
    return TinyTransformerCase("wan", model, kwargs, (f, h // 2, w // 2), 0, "none")


def _hunyuan_video(batch, frames, height, width) -> TinyTransformerCase:
    """HunyuanVideo: (B,C,F,H,W), patch 1; joint attention [video | text] (text suffix)."""
    f, h, w = _sizes(frames, height, width, (3, 4, 6))
    text_len = 12
    model = _build(
        HunyuanVideoTransformer3DModel,
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, 4, f, h, w),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=_randn(g, batch, text_len, 16),
        encoder_attention_mask=torch.ones(batch, text_len),
        pooled_projections=_randn(g, batch, 8),
        guidance=torch.full((batch,), 6000.0),
        return_dict=False,
    )
    return TinyTransformerCase("hunyuan_video", model, kwargs, (f, h, w), text_len, "suffix")


def _hunyuan_video15(batch, frames, height, width) -> TinyTransformerCase:
    """HunyuanVideo-1.5 (t2v): patch 1; joint [video | byT5(5), MLLM(6), image(3)] (text suffix of 14).

    The model reorders text as [valid image, valid byT5, valid MLLM, invalid ...]; in t2v (all-zero
    image_embeds) the 3 image tokens are invalid, so they are the last 3 positions and masked out.
    """
    f, h, w = _sizes(frames, height, width, (3, 4, 6))
    n_mllm, n_byt5, n_image = 6, 5, 3
    model = _build(
        HunyuanVideo15Transformer3DModel,
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, 9, f, h, w),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=_randn(g, batch, n_mllm, 16),
        encoder_attention_mask=torch.ones(batch, n_mllm),
        encoder_hidden_states_2=_randn(g, batch, n_byt5, 32),
        encoder_attention_mask_2=torch.ones(batch, n_byt5),
        image_embeds=torch.zeros(batch, n_image, 12),
        return_dict=False,
    )
    return TinyTransformerCase("hunyuan_video15", model, kwargs, (f, h, w), n_mllm + n_byt5 + n_image, "suffix")


def _cogvideox(batch, frames, height, width) -> TinyTransformerCase:
    """CogVideoX 1.0: (B,F,C,H,W), per-frame 2D patch 2, sincos pos-emb; joint [text | video]."""
    f, h, w = _sizes(frames, height, width, (3, 8, 12))
    text_len = 8  # must equal max_text_seq_length (the sincos table covers text positions)
    model = _build(
        CogVideoXTransformer3DModel,
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=text_len,
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, f, 4, h, w),
        encoder_hidden_states=_randn(g, batch, text_len, 8),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        return_dict=False,
    )
    return TinyTransformerCase("cogvideox", model, kwargs, (f, h // 2, w // 2), text_len, "prefix")


def _cogvideox15(batch, frames, height, width) -> TinyTransformerCase:
    """CogVideoX 1.5: (B,F,C,H,W), patch (t=2, 2, 2) + linear, 3D RoPE ("slice"); joint [text | video]."""
    f, h, w = _sizes(frames, height, width, (6, 8, 12))
    text_len = 8
    p, p_t, head_dim = 2, 2, 16
    model = _build(
        CogVideoXTransformer3DModel,
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, patch_size=p,
        patch_size_t=p_t, temporal_compression_ratio=4, max_text_seq_length=text_len,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False, patch_bias=False,
    )
    grid = (math.ceil(f / p_t), h // p, w // p)
    # The RoPE the CogVideoX pipeline builds for 1.5 models (_prepare_rotary_positional_embeddings);
    # "slice" takes positions 0..n-1 of a max_size table, so max_size = grid gives the same values.
    image_rotary_emb = get_3d_rotary_pos_embed(
        embed_dim=head_dim, crops_coords=None, grid_size=(grid[1], grid[2]), temporal_size=grid[0],
        grid_type="slice", max_size=(grid[1], grid[2]),
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, f, 4, h, w),
        encoder_hidden_states=_randn(g, batch, text_len, 8),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        image_rotary_emb=image_rotary_emb,
        return_dict=False,
    )
    return TinyTransformerCase("cogvideox15", model, kwargs, grid, text_len, "prefix")


def _ltx(batch, frames, height, width) -> TinyTransformerCase:
    """LTX-Video: tokens pre-packed (B, F*H*W, C), patch 1, grid as kwargs; attn1 self, attn2 cross."""
    f, h, w = _sizes(frames, height, width, (3, 4, 6))
    model = _build(
        LTXVideoTransformer3DModel,
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=16,
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, f * h * w, 4),
        encoder_hidden_states=_randn(g, batch, 16, 16),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_attention_mask=torch.ones(batch, 16, dtype=torch.bool),
        num_frames=f,
        height=h,
        width=w,
        return_dict=False,
    )
    return TinyTransformerCase("ltx", model, kwargs, (f, h, w), 0, "none")


def _mochi(batch, frames, height, width) -> TinyTransformerCase:
    """Mochi: (B,C,F,H,W), per-frame patch 2; joint [video | valid text], one attention call per sample."""
    f, h, w = _sizes(frames, height, width, (3, 8, 12))
    text_len = 16
    model = _build(
        MochiTransformer3DModel,
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=text_len,
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, 4, f, h, w),
        encoder_hidden_states=_randn(g, batch, text_len, 16),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.bool),
        return_dict=False,
    )
    return TinyTransformerCase("mochi", model, kwargs, (f, h // 2, w // 2), text_len, "suffix")


def _flux(batch, frames, height, width) -> TinyTransformerCase:
    """Flux: packed (B, H*W, C) image tokens (height/width = token rows/cols); joint [text | image]."""
    _, h, w = _sizes(frames, height, width, (1, 6, 8))
    text_len = 8
    model = _build(
        FluxTransformer2DModel,
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, h * w, 4),
        encoder_hidden_states=_randn(g, batch, text_len, 32),
        pooled_projections=_randn(g, batch, 32),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )
    return TinyTransformerCase("flux", model, kwargs, (1, h, w), text_len, "prefix")


def _sd3(batch, frames, height, width) -> TinyTransformerCase:
    """SD3: (B,C,H,W), PatchEmbed patch 2; joint [image | text] (text suffix)."""
    _, h, w = _sizes(frames, height, width, (1, 12, 16))
    text_len = 10
    model = _build(
        SD3Transformer2DModel,
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None,
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, 4, h, w),
        encoder_hidden_states=_randn(g, batch, text_len, 32),
        pooled_projections=_randn(g, batch, 64),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        return_dict=False,
    )
    return TinyTransformerCase("sd3", model, kwargs, (1, h // 2, w // 2), text_len, "suffix")


def _qwenimage(batch, frames, height, width) -> TinyTransformerCase:
    """QwenImage: packed (B, H*W, C) tokens + img_shapes (height/width = token rows/cols); joint [text | image]."""
    _, h, w = _sizes(frames, height, width, (1, 6, 8))
    text_len = 8
    model = _build(
        QwenImageTransformer2DModel,
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    g = _generator()
    kwargs = dict(
        hidden_states=_randn(g, batch, h * w, 16),
        encoder_hidden_states=_randn(g, batch, text_len, 16),
        encoder_hidden_states_mask=torch.ones(batch, text_len, dtype=torch.long),
        timestep=torch.full((batch,), 1.0),
        img_shapes=[(1, h, w)] * batch,
        return_dict=False,
    )
    return TinyTransformerCase("qwenimage", model, kwargs, (1, h, w), text_len, "prefix")


_TRANSFORMER_FACTORIES = {
    "wan": _wan,
    "hunyuan_video": _hunyuan_video,
    "hunyuan_video15": _hunyuan_video15,
    "cogvideox": _cogvideox,
    "cogvideox15": _cogvideox15,
    "ltx": _ltx,
    "mochi": _mochi,
    "flux": _flux,
    "sd3": _sd3,
    "qwenimage": _qwenimage,
}


def make_transformer_case(
    name: str,
    batch: int = 1,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> TinyTransformerCase:
    """Build the tiny transformer of family ``name`` and its inputs.

    ``frames/height/width`` are raw model-input sizes in latent space, before patchify (for the
    packed-token models LTX, Flux and QwenImage they are the token grid itself). Image families
    ignore ``frames``. ``batch`` sets the batch size of every input tensor.
    Defaults give grids of 48-72 video tokens with F, H, W all distinct.
    """
    try:
        factory = _TRANSFORMER_FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown transformer family {name!r}; choose from {TRANSFORMER_FAMILIES}") from None
    return factory(batch, frames, height, width)


# --------------------------------------------------------------------------------------------
# Pipeline factories
# --------------------------------------------------------------------------------------------


def _wan_transformer() -> WanTransformer3DModel:
    return _build(
        WanTransformer3DModel,
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def _wan_vae() -> AutoencoderKLWan:
    # 8x spatial / 4x temporal like the real Wan 2.1 VAE (tests rely on 64x96 -> grid (3, 4, 6)).
    return _build(
        AutoencoderKLWan, base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _wan_call_kwargs() -> dict:
    # 9 frames, 64x96 -> latents (16, 3, 8, 12) -> token grid (3, 4, 6).
    return dict(
        prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=64, width=96, num_frames=9,
        num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16, output_type="pt",
        generator=_generator(),
    )


def _wan_pipeline() -> tuple[DiffusionPipeline, dict]:
    """WanPipeline (Wan 2.1 T2V, true CFG). Output frames (1, 9, 3, 64, 96); transformer grid (3, 4, 6)."""
    pipe = WanPipeline(
        tokenizer=make_tokenizer(), text_encoder=make_tiny_t5(umt5=True), vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=_wan_transformer(),
    )
    return pipe, _wan_call_kwargs()


def make_wan22_pipeline() -> tuple[DiffusionPipeline, dict]:
    """WanPipeline with two experts (Wan 2.2 A14B style): ``transformer`` (high noise) and ``transformer_2``.

    With shift 5 and 3 steps the timesteps are ~[1000, 835, 24]; ``boundary_ratio=0.8`` (boundary
    t = 800) sends the first two steps to ``transformer`` and the last one to ``transformer_2`` (with 4
    steps both experts run as well). The experts are built from different seeds (0 and 1), so their
    outputs differ. Same sizes and output shape as ``make_pipeline("wan")``.
    """
    transformer = _wan_transformer()
    torch.manual_seed(1)
    transformer_2 = WanTransformer3DModel.from_config(transformer.config).eval()
    pipe = WanPipeline(
        tokenizer=make_tokenizer(), text_encoder=make_tiny_t5(umt5=True), vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer,
        transformer_2=transformer_2, boundary_ratio=0.8,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, _wan_call_kwargs()


def _hunyuan_video_pipeline() -> tuple[DiffusionPipeline, dict]:
    """HunyuanVideoPipeline (Llama + CLIP, true CFG). Output (1, 9, 3, 32, 48); grid (3, 4, 6)."""
    transformer = _build(
        HunyuanVideoTransformer3DModel,
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    vae = _build(
        AutoencoderKLHunyuanVideo,
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=_tiny_llama(16), tokenizer=make_tokenizer(), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=_tiny_clip(8),
        tokenizer_2=make_tokenizer(model_max_length=77),
    )
    kwargs = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=32, width=48, num_frames=9,
        num_inference_steps=3, true_cfg_scale=4.0, guidance_scale=6.0,
        prompt_template={"template": "{}", "crop_start": 0}, max_sequence_length=16, output_type="pt",
        generator=_generator(),
    )
    return pipe, kwargs


def _cogvideox_pipeline() -> tuple[DiffusionPipeline, dict]:
    """CogVideoXPipeline (T5, DDIM, cond+uncond batched). Output (1, 9, 3, 32, 48); grid (3, 4, 6).

    The VAE has 3 blocks (4x spatial, 4x temporal) instead of 4, which makes decoding ~4x cheaper.
    """
    text_len = 16
    transformer = _build(
        CogVideoXTransformer3DModel,
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=text_len,
    )
    vae = _build(
        AutoencoderKLCogVideoX,
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(
        tokenizer=make_tokenizer(), text_encoder=make_tiny_t5(), vae=vae, transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
    kwargs = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=32, width=48, num_frames=9,
        num_inference_steps=3, guidance_scale=6.0, max_sequence_length=text_len, output_type="pt",
        generator=_generator(),
    )
    return pipe, kwargs


def _flux_pipeline() -> tuple[DiffusionPipeline, dict]:
    """FluxPipeline (CLIP + T5, true CFG, VAE scale 1). Output (1, 3, 12, 16); grid (1, 6, 8)."""
    transformer = _build(
        FluxTransformer2DModel,
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    vae = _build(
        AutoencoderKL,
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_tiny_clip(32),
        tokenizer=make_tokenizer(model_max_length=77), text_encoder_2=make_tiny_t5(),
        tokenizer_2=make_tokenizer(), transformer=transformer,
    )
    kwargs = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=12, width=16, num_inference_steps=3,
        true_cfg_scale=4.0, guidance_scale=3.5, max_sequence_length=16, output_type="pt",
        generator=_generator(),
    )
    return pipe, kwargs


def _ltx_pipeline() -> tuple[DiffusionPipeline, dict]:
    """LTXPipeline (T5, cond+uncond batched; VAE 8x spatial / 8x temporal). Output (1, 9, 3, 32, 64); grid (2, 4, 8).

    LTXPipeline requires height and width divisible by 32.
    """
    transformer = _build(
        LTXVideoTransformer3DModel,
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32,
    )
    vae = _build(
        AutoencoderKLLTXVideo,
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=make_tiny_t5(),
        tokenizer=make_tokenizer(), transformer=transformer,
    )
    kwargs = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, height=32, width=64, num_frames=9,
        num_inference_steps=3, guidance_scale=3.0, max_sequence_length=16, output_type="pt",
        generator=_generator(),
    )
    return pipe, kwargs


_PIPELINE_FACTORIES = {
    "wan": _wan_pipeline,
    "hunyuan_video": _hunyuan_video_pipeline,
    "cogvideox": _cogvideox_pipeline,
    "flux": _flux_pipeline,
    "ltx": _ltx_pipeline,
}


def make_pipeline(name: str) -> tuple[DiffusionPipeline, dict]:
    """Build the tiny pipeline of family ``name`` and kwargs for ``pipe(**kwargs)``.

    The kwargs run 3 steps with CFG on (two transformer calls per step for Wan / HunyuanVideo /
    Flux, one batch-2 call for CogVideoX / LTX), ``output_type="pt"`` and a seeded generator.
    Output is ``.frames`` of shape (1, F, 3, H, W) for the video pipelines and ``.images`` of shape
    (1, 3, H, W) for Flux. Progress bars are disabled.
    """
    try:
        factory = _PIPELINE_FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown pipeline family {name!r}; choose from {PIPELINE_FAMILIES}") from None
    pipe, kwargs = factory()
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs
