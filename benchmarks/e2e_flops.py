"""The end-to-end benchmark's analytic FLOP and KV-cache model (`bench_e2e.py`): what each stage should cost, to set
the measured ratios against."""

from __future__ import annotations

from bench_projector import Shapes as ProjectorShapes
from e2e_models import BASELINE, PROMPT_TEXT_TOKENS, Shapes, tokenpacker_config


def vision_flops(vision: dict, layers: int, tiles: int) -> float:
    """Patch embedding + `layers` ViT blocks on G²+1 tokens: 2·MACs of the Linears plus the attention matmuls."""
    d, inner, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    patches = (vision["image_size"] // patch) ** 2
    n = patches + 1
    per_layer = 2 * n * (4 * d * d + 2 * d * inner) + 4 * n * n * d
    return tiles * (2 * patches * 3 * patch * patch * d + layers * per_layer)


def mlp_projector_flops(vision: dict, text: dict, tokens: int) -> float:
    """LLaVA's two-layer MLP on every patch."""
    dv, h = vision["hidden_size"], text["hidden_size"]
    return 2 * tokens * (dv * h + h * h)


def tokenpacker_projector_flops(shapes: Shapes, text: dict, scale: int, tiles: int) -> float:
    """The projector benchmark's analytic count (region MLPs, point query, region-to-point attention,
    output MLP) with this run's widths."""
    vision = shapes.vision
    projector = ProjectorShapes(
        grid=shapes.grid,
        vision_width=vision["hidden_size"],
        levels=len(shapes.region_feature_layers),
        width=vision["hidden_size"],
        text_width=text["hidden_size"],
        scale_factor=scale,
    )
    return tiles * projector.flops_per_image()


def llm_prefill_flops(text: dict, seq: int) -> float:
    """Causal prefill of `seq` tokens + LM head on the last position: 2·params·tokens + 2·d·seq² (causal half)."""
    d, inner, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    kv = d * text.get("num_key_value_heads", text["num_attention_heads"]) // text["num_attention_heads"]
    linear = 2 * seq * layers * (2 * d * d + 2 * d * kv + 3 * d * inner)
    attention = layers * 2 * d * seq * seq
    return linear + attention + 2 * d * text["vocab_size"]


def ttft_flops(
    name: str, shapes: Shapes, text: dict, image_tokens: int, tiles: int = 1, seq: int | None = None
) -> dict[str, float]:
    """FLOPs per stage of the time to first token (batch 1)."""
    seq = seq if seq is not None else PROMPT_TEXT_TOKENS + image_tokens
    vision = shapes.vision
    if name in (BASELINE, "llava-next"):
        stages = {
            "vision": vision_flops(vision, vision["num_hidden_layers"], tiles),
            "projector": tiles * mlp_projector_flops(vision, text, shapes.grid**2),
        }
    else:
        deepest = max(tokenpacker_config(shapes, int(name[-1])).vision_layers_needed)
        stages = {
            "vision": vision_flops(vision, deepest, tiles),
            "projector": tokenpacker_projector_flops(shapes, text, int(name[-1]), tiles),
        }
    stages["prefill"] = llm_prefill_flops(text, seq)
    stages["ttft"] = sum(stages.values())
    return stages


def kv_bytes_per_image(text: dict, image_tokens: int, dtype_bytes: int) -> int:
    """layers · 2 (k, v) · kv_heads · head_dim · bytes · image tokens."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", text["num_attention_heads"])
    return text["num_hidden_layers"] * 2 * kv_heads * head_dim * dtype_bytes * image_tokens
