"""Text encoders that need no download: a word-level tokenizer built in code and a tiny (UM)T5 config.

The demo model's text side, and the tiny pipelines the tests build from configs.
"""

from __future__ import annotations

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
