"""A small random-weight Wan pipeline built from configs: for the demo until the trained model ships, and tests.

Nothing is downloaded: the tokenizer is a word-level `tokenizers` model built in code and every network is
constructed from a config under a fixed seed.
"""

from __future__ import annotations

import torch

_SPECIAL = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}


def word_tokenizer(words: list[str] | tuple[str, ...], model_max_length: int = 512):
    """A lower-casing, whitespace-splitting word-level fast tokenizer over `words`.

    Ids: <pad> 0, </s> 1 (appended to every sequence), <unk> 2, <s> 3, then `words` in order.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.normalizers import Lowercase
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = dict(_SPECIAL)
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = Lowercase()
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>",
        model_max_length=model_max_length, padding_side="right",
    )


def tiny_t5_config(umt5: bool = False):
    """A 2-layer, 32-wide (UM)T5 encoder config with a 1000-word vocabulary."""
    from transformers import T5Config, UMT5Config

    cls = UMT5Config if umt5 else T5Config
    return cls(
        vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


DEMO_WORDS = "a an the and of in on with red green blue yellow circle square triangle moving left right up down".split()


def random_wan_pipeline(num_layers: int = 2, heads: int = 4, head_dim: int = 16, seed: int = 0):
    """A `WanPipeline` with random weights: UMT5 text encoder, Wan VAE and transformer, all tiny.

    At 17 frames of 256x256 pixels the transformer sees a (5, 16, 16) token grid (1280 tokens).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(tiny_t5_config(umt5=True)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=4 * heads * head_dim, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval()
    return WanPipeline(
        tokenizer=word_tokenizer(DEMO_WORDS), text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
