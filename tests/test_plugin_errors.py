"""Bad input gets a clear error and never a silently half-hooked model."""

import pytest
import torch

import sparse_dit
from sparse_dit import (
    ConfigError,
    DiffusersCompatibilityError,
    SparseDiTError,
    UnknownMethodError,
    UnsupportedModelError,
)

from tiny_models import make_pipeline, make_transformer_case


def hooked_modules(model):
    return [name for name, m in model.named_modules() if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks]


def test_unknown_method_lists_the_valid_ones_and_hooks_nothing():
    pipe, _ = make_pipeline("wan")
    with pytest.raises(UnknownMethodError, match="valid methods: dense, random, oracle, window, gna, clear"):
        pipe.enable_sparse_attention("svg3")
    assert hooked_modules(pipe.transformer) == []


def test_out_of_range_config_is_rejected_before_hooking():
    pipe, _ = make_pipeline("wan")
    with pytest.raises(ConfigError, match="window"):
        pipe.enable_sparse_attention("window", window=0)
    with pytest.raises(ConfigError, match="dense_steps"):
        pipe.enable_sparse_attention("window", dense_steps=2.5)
    assert hooked_modules(pipe.transformer) == []


def test_enabling_twice_replaces_cleanly():
    case = make_transformer_case("wan")
    with torch.no_grad():
        reference = case.model(**case.kwargs)[0]
        sparse_dit.enable_sparse_attention(case.model, "window", window=1, block_size=8, min_seq_len=0, dense_steps=0)
        sparse_dit.enable_sparse_attention(case.model, "dense", block_size=8, min_seq_len=0, dense_steps=0)
        out = case.model(**case.kwargs)[0]
    assert float((out - reference).abs().max()) < 1e-5 * float(reference.abs().max())
    for name in hooked_modules(case.model):
        hooks = case.model.get_submodule(name)._diffusers_hook.hooks
        assert len([h for h in hooks if h.startswith("sparse_dit")]) == 1
    assert sparse_dit.plugin.sparse_attention_config(case.model).method == "dense"


def test_pipeline_without_a_transformer():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(UnsupportedModelError, match="no transformer component"):
        pipe.enable_sparse_attention("window")


def test_unsupported_transformer_lists_the_supported_ones():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8)
    with pytest.raises(UnsupportedModelError, match="WanTransformer3DModel.*FluxTransformer2DModel"):
        sparse_dit.enable_sparse_attention(model, "window")
    with pytest.raises(SparseDiTError, match="DiffusionPipeline or transformer"):
        sparse_dit.enable_sparse_attention("not a pipeline", "window")


def test_attention_module_called_outside_its_transformer():
    case = make_transformer_case("wan")
    sparse_dit.enable_sparse_attention(case.model, "window", min_seq_len=0, dense_steps=0)
    with pytest.raises(SparseDiTError, match="outside a forward"):
        case.model.blocks[0].attn1(torch.randn(1, 72, 24))


def test_stats_and_disable_when_not_enabled():
    case = make_transformer_case("flux")
    sparse_dit.disable_sparse_attention(case.model)  # a no-op
    with pytest.raises(SparseDiTError, match="not enabled"):
        sparse_dit.sparse_attention_stats(case.model)


def test_missing_private_diffusers_api_names_the_tested_version(monkeypatch):
    from diffusers.models import attention_dispatch

    load = sparse_dit.plugin.compat.load
    monkeypatch.setattr(attention_dispatch, "_AttentionBackendRegistry", object())
    load.cache_clear()  # the check runs once per process; this test stands for a process with other diffusers
    try:
        with pytest.raises(DiffusersCompatibilityError, match="diffusers==0.42.1"):
            load()
    finally:
        load.cache_clear()
