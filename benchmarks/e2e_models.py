"""The models and requests of the end-to-end benchmark (`bench_e2e.py`): shapes, LLaVA-1.5, LLaVA-NeXT and
TokenPacker models on one shared random backbone, and batched requests with each model's own image token layout."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from tokenpacker_hf import (
    TokenPackerConfig,
    TokenPackerForConditionalGeneration,
    TokenPackerImageProcessor,
    TokenPackerProcessor,
)
from tokenpacker_hf.tiny import IMAGE_TOKEN_ID, make_tokenizer

BASELINE = "llava-1.5-mlp"
# Image positions hold IMAGE_TOKEN_ID, the `<image>` id of the tokenizer `hd_processor` lays images out with; the
# random prompt text is drawn above it.
PROMPT_TEXT_TOKENS = 40  # "USER: <image>\n <question> ASSISTANT:" is about this long in LLaMA tokens
TEXT_BEFORE_IMAGE = 5


@dataclass
class Shapes:
    """Model shapes of one run. `vision`/`text` are config kwargs; `text_7b` (Vicuna-7B; a wider tiny LLM in
    smoke runs) sets the FLOP estimates "with a 7B LLM" and the width of the projector-step comparison."""

    vision: dict
    text: dict
    region_feature_layers: list[int]
    scale_factors: list[int]
    hd_grids: dict[str, tuple[int, int]]  # name -> (rows, cols) of a square image's slice grid
    text_7b: dict = field(default_factory=dict)

    @property
    def tile(self) -> int:
        return self.vision["image_size"]

    @property
    def grid(self) -> int:
        return self.vision["image_size"] // self.vision["patch_size"]


CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
# Vicuna-7B's shape, for the FLOP model only: what the ratios become where the LLM dominates.
VICUNA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
# A Llama a CPU runs in minutes: Vicuna's layout (MHA, SwiGLU ratio 2.75, vocab 32000) at 1/4 width, 1/4 depth.
LLAMA_CPU = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
)


def full_shapes(llm: str) -> Shapes:
    """CLIP-L/336 with the chosen LLM; HD grids are the largest of max_slices 9 and 16 (a square image)."""
    text = dict(VICUNA_7B if llm == "7b" else LLAMA_CPU, max_position_embeddings=16384)
    return Shapes(
        vision=dict(CLIP_L_336),
        text=text,
        region_feature_layers=[12, 16, 22, 23],
        scale_factors=[2, 3, 4],
        hd_grids={"max_slices=9": (3, 3), "max_slices=16": (4, 4)},
        text_7b=dict(VICUNA_7B),
    )


def smoke_shapes() -> Shapes:
    """Seconds-long shapes that keep every code path: a 12×12 patch grid divisible by 2, 3 and 4."""
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=48,
        patch_size=4,
        projection_dim=32,
    )
    text = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=4096,
    )
    return Shapes(
        vision=vision,
        text=text,
        region_feature_layers=[1, 2, 3],
        scale_factors=[2, 3, 4],
        hd_grids={"max_slices=9": (3, 3), "max_slices=16": (4, 4)},
        text_7b=dict(text, hidden_size=192, intermediate_size=384),
    )


# --------------------------------------------------------------------------------------------------------- models


def tokenpacker_config(shapes: Shapes, scale_factor: int) -> TokenPackerConfig:
    return TokenPackerConfig(
        vision_config=dict(shapes.vision, model_type="clip_vision_model"),
        text_config=dict(shapes.text, model_type="llama"),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        region_feature_layers=shapes.region_feature_layers,
        scale_factor=scale_factor,
    )


def llava_config(shapes: Shapes) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**shapes.vision),
        text_config=LlamaConfig(**shapes.text),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def llava_next_config(shapes: Shapes) -> LlavaNextConfig:
    """LLaVA-NeXT anyres with pinpoints up to the largest HD grid, so a square image gets that grid."""
    side = max(max(grid) for grid in shapes.hd_grids.values())
    pinpoints = [[a * shapes.tile, b * shapes.tile] for a in range(1, side + 1) for b in range(1, side + 1)]
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**shapes.vision),
        text_config=LlamaConfig(**shapes.text),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
    )


def model_names(shapes: Shapes) -> list[str]:
    return [BASELINE] + [f"tokenpacker-s{s}" for s in shapes.scale_factors]


def build_one(name: str, shapes: Shapes, dtype: torch.dtype, device: str) -> nn.Module:
    """One model by benchmark name (`llava-mlp-576`, `llava-next`, `tokenpacker-s<k>`), eval mode, sdpa."""
    if name == BASELINE:
        model_cls, config = LlavaForConditionalGeneration, llava_config(shapes)
    elif name == "llava-next":
        model_cls, config = LlavaNextForConditionalGeneration, llava_next_config(shapes)
    else:
        model_cls, config = TokenPackerForConditionalGeneration, tokenpacker_config(shapes, int(name[-1]))
    with torch.device(device):
        return model_cls._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


def share_backbone(source: nn.Module, target: nn.Module) -> None:
    """Makes `target` use `source`'s vision tower, language model and LM head (same modules, same tensors)."""
    target.model.vision_tower = source.model.vision_tower
    target.model.language_model = source.model.language_model
    target.lm_head = source.lm_head


def build_models(names: list[str], shapes: Shapes, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    """All models of the run on one shared backbone. Projectors keep their own random weights."""
    models: dict[str, nn.Module] = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build_one(name, shapes, dtype, device)
        if len(models) > 1:
            share_backbone(models[names[0]], models[name])
    return models


# ------------------------------------------------------------------------------------------------------- requests


@dataclass
class Request:
    """One batched request: `pixel_values` in the model's layout, `input_ids [B, L]`, extra image kwargs."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    image_kwargs: dict
    image_tokens: int  # sequence positions one image takes (incl. HD separators)


def prompt_ids(image_layout: list[int], batch: int, vocab: int, device: str) -> torch.Tensor:
    """`[B, L]`: BOS, a few text ids, the image layout, the rest of the ~40 text ids (same for every model)."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(IMAGE_TOKEN_ID + 1, vocab, (PROMPT_TEXT_TOKENS - 1,), generator=generator).tolist()
    ids = [1] + text[: TEXT_BEFORE_IMAGE - 1] + image_layout + text[TEXT_BEFORE_IMAGE - 1 :]
    return torch.tensor([ids] * batch, device=device)


def hd_processor(tokens_per_tile: int, tile_separator: int) -> TokenPackerProcessor:
    """A slice-mode processor, for its `image_token_layout` of one image: `<image>` is `IMAGE_TOKEN_ID` (the tiny
    tokenizer's), the tile separator `tile_separator`, the row separator id 0 (`<unk>` in LLaMA's vocabulary)."""
    return TokenPackerProcessor(
        image_processor=TokenPackerImageProcessor(image_mode="slice"),
        tokenizer=make_tokenizer(),
        num_image_tokens=tokens_per_tile,
        tile_separator=tile_separator,
        row_separator=0,
    )


def llava_next_image_tokens(model: nn.Module, side: int) -> int:
    """Tokens LLaVA-NeXT gives a square `side`×`side` image: base tile + unpadded grid with one newline per row."""
    config = model.config
    grid = config.vision_config.image_size // config.vision_config.patch_size
    rows = cols = side // config.vision_config.image_size
    return grid * grid + (rows * grid) * (cols * grid + 1)


def base_request(model: nn.Module, name: str, shapes: Shapes, batch: int, dtype, device) -> Request:
    """A 336 px image per prompt, `batch` prompts."""
    tokens = model.config.num_image_tokens if name != BASELINE else shapes.grid**2
    pixels = torch.randn(batch, 3, shapes.tile, shapes.tile, generator=torch.Generator().manual_seed(2))
    ids = prompt_ids([IMAGE_TOKEN_ID] * tokens, batch, shapes.text["vocab_size"], device)
    return Request(pixels.to(device, dtype), ids, {}, tokens)


def hd_request(model: nn.Module, name: str, shapes: Shapes, grid: tuple[int, int], dtype, device) -> Request:
    """One square image at `grid` tiles' resolution: ours sliced (+ thumbnail), LLaVA-NeXT anyres."""
    rows, cols = grid
    tiles = rows * cols + 1
    pixels = torch.randn(tiles, 3, shapes.tile, shapes.tile, generator=torch.Generator().manual_seed(3))
    vocab = shapes.text["vocab_size"]
    if name == "llava-next":
        side = rows * shapes.tile
        layout = [IMAGE_TOKEN_ID] * llava_next_image_tokens(model, side)
        kwargs = {"image_sizes": torch.tensor([[side, side]], device=device)}
        pixels = pixels[None]  # [images, tiles, 3, H, W]
    else:
        layout = hd_processor(model.config.num_image_tokens, tile_separator=vocab - 1).image_token_layout(grid)
        kwargs = {"image_grids": torch.tensor([[rows, cols]], device=device)}
    return Request(pixels.to(device, dtype), prompt_ids(layout, 1, vocab, device), kwargs, len(layout))
