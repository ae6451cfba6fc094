"""Tiny, offline building blocks for tests, examples and benchmark smoke runs: a real byte-level tokenizer
built in code and small configs of the vision tower, language model and TokenPacker. Nothing here touches
the network, so a working model can be built on any machine in a second."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .configuration_tokenpacker import TokenPackerConfig

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")


def byte_level_backend(special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE with no merges: `special_tokens` (ids 0, 1, ..., `<unk>` among them) then the 256 byte
    symbols. Every text encodes, one token per byte, so no vocabulary file is needed."""
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special_tokens)
    return backend


def make_tokenizer(padding_side: str = "left", image_token: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: 5 special tokens + 256 byte symbols (vocab 261).

    `<image>` is a single special token (id 4); without `image_token` it is left out (vocab 260), as from a
    plain LLM's tokenizer. Like LLaMA's vocabulary it has a ',' piece but no literal '\\n' piece ('\\n' is the
    byte symbol 'Ċ'), so `convert_tokens_to_ids("\\n")` falls back to `<unk>`.
    """
    special_tokens = SPECIAL_TOKENS if image_token else [token for token in SPECIAL_TOKENS if token != "<image>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_backend(special_tokens),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"} if image_token else {},
        padding_side=padding_side,
    )


VOCAB_SIZE = 5 + 256


def vision_config(**overrides) -> dict:
    """CLIP-style tower: 16 px images, 4 px patches -> a 4x4 grid, 4 layers of width 32."""
    config = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        projection_dim=32,
    )
    config.update(overrides)
    return config


def text_config(**overrides) -> dict:
    config = dict(
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.update(overrides)
    return config


def tiny_config(vision: dict | None = None, text: dict | None = None, **overrides) -> TokenPackerConfig:
    """A ~100k-parameter TokenPacker: 4x4 patch grid, s=2 -> 4 tokens per image, 3 region levels."""
    kwargs = dict(
        vision_config=vision_config(**(vision or {})),
        text_config=text_config(**(text or {})),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        region_feature_layers=[1, 2, 3],
        scale_factor=2,
        projector_hidden_size=32,
        projector_num_heads=2,
    )
    kwargs.update(overrides)
    return TokenPackerConfig(**kwargs)
