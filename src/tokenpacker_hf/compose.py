# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""A new TokenPacker model and its processor from a pretrained vision tower and LLM, as `tokenpacker-hf init` and
`examples/train.py` compose them."""

from __future__ import annotations

import torch

from .modeling_tokenpacker import TokenPackerForConditionalGeneration
from .processing_tokenpacker import TokenPackerProcessor


def compose_pretrained(
    vision_tower: str,
    language_model: str,
    *,
    scale_factor: int = 2,
    region_feature_layers: list[int] | None = None,
    image_mode: str = "pad",
    max_slices: int = 9,
    chat_template: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[TokenPackerForConditionalGeneration, TokenPackerProcessor]:
    """The model and processor `from_vision_text_pretrained` composes from `vision_tower` and `language_model` (Hub
    ids or folders), built with the same config fields so that the processor expands `<image>` into as many
    tokens as the model packs. `region_feature_layers` None keeps the config's default (CLIP-L's 12, 16, 22, 23)."""
    config = {"scale_factor": scale_factor}
    if region_feature_layers:
        config["region_feature_layers"] = region_feature_layers
    processor = TokenPackerProcessor.from_vision_text_pretrained(
        vision_tower,
        language_model,
        image_mode=image_mode,
        max_slices=max_slices,
        chat_template=chat_template,
        **config,
    )
    model = TokenPackerForConditionalGeneration.from_vision_text_pretrained(
        vision_tower, language_model, processor=processor, dtype=dtype, **config
    )
    return model, processor
