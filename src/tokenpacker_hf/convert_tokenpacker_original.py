# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""Convert the authors' LLaVA-format TokenPacker checkpoints (spec §2) into this package's layout."""

import re

import torch

# Original projector sub-keys (`builder.py`, class TokenPacker) -> this package's TokenPackerProjector.
_PROJECTOR_RENAMES = {
    "q_proj_1.": "point_query_proj.",
    "ln_q_1.": "point_query_norm.",
    "k_proj_1.0.": "region_key_proj.fc1.",
    "k_proj_1.2.": "region_key_proj.fc2.",
    "ln_k_1.": "region_key_norm.",
    "v_proj_1.0.": "region_value_proj.fc1.",
    "v_proj_1.2.": "region_value_proj.fc2.",
    "ln_v_1.": "region_value_norm.",
    "clip_attn.out_proj.": "region_attn.o_proj.",
    "mlp.0.": "output_proj.fc1.",
    "mlp.2.": "output_proj.fc2.",
}
_IN_PROJ = re.compile(r"^clip_attn\.in_proj_(weight|bias)$")

# Full-checkpoint prefixes, most specific first.
_PREFIX_RENAMES = (
    ("model.mm_projector.", "model.multi_modal_projector."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
_DROPPED = re.compile(r"rotary_emb\.inv_freq$|vision_tower\..*position_ids$")


def convert_original_projector_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original projector keys (no prefix, e.g. `clip_attn.in_proj_weight`) -> TokenPackerProjector keys.

    `nn.MultiheadAttention`'s stacked `in_proj_weight [3E, E]` / `in_proj_bias [3E]` is split into the
    `q_proj`, `k_proj`, `v_proj` thirds, in that order (spec §1.5).
    """
    converted = {}
    for key, tensor in state_dict.items():
        in_proj = _IN_PROJ.match(key)
        if in_proj:
            for name, third in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"region_attn.{name}.{in_proj.group(1)}"] = third.clone()
            continue
        for old, new in _PROJECTOR_RENAMES.items():
            if key.startswith(old):
                converted[new + key[len(old) :]] = tensor
                break
        else:
            raise KeyError(f"unexpected TokenPacker projector key {key!r}; expected one of "
                           f"{sorted(_PROJECTOR_RENAMES) + ['clip_attn.in_proj_weight', 'clip_attn.in_proj_bias']}")
    return converted


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original full-checkpoint keys (`LlavaLlamaForCausalLM`) -> `TokenPackerForConditionalGeneration` keys.

    `model.mm_projector.*` -> `model.multi_modal_projector.*` (in-projection split), the CLIP tower
    `model.vision_tower.vision_tower.vision_model.*` -> `model.vision_tower.*`, the rest of `model.*` ->
    `model.language_model.*`, `lm_head.*` unchanged; Llama's persistent `rotary_emb.inv_freq` buffers dropped.
    """
    projector, converted = {}, {}
    for key, tensor in state_dict.items():
        if _DROPPED.search(key):
            continue
        for old, new in _PREFIX_RENAMES:
            if key.startswith(old):
                break
        else:
            raise KeyError(f"unexpected checkpoint key {key!r}; expected a key under {[p for p, _ in _PREFIX_RENAMES]}")
        if old == "model.mm_projector.":
            projector[key[len(old) :]] = tensor
        else:
            converted[new + key[len(old) :]] = tensor
    for key, tensor in convert_original_projector_state_dict(projector).items():
        converted["model.multi_modal_projector." + key] = tensor
    return converted
