"""The tests' tiny fixtures live in the package (`tokenpacker_hf.tiny`) so examples and benchmarks share them."""

from tokenpacker_hf.tiny import (
    IMAGE_TOKEN_ID,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    make_tokenizer,
    text_config,
    tiny_config,
    vision_config,
)

__all__ = [
    "IMAGE_TOKEN_ID",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "make_tokenizer",
    "text_config",
    "tiny_config",
    "vision_config",
]
