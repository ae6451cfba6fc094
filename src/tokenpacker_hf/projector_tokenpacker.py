# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""The TokenPacker projector (coarse-to-fine region-to-point injection) and the baseline projectors of the
paper's comparison, all with one interface: `forward(query_features, region_features) -> [B, T, D_text]`."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_tokenpacker import TokenPackerConfig


def downsample_point_queries(features: torch.Tensor, grid_size: int, scale_factor: int) -> torch.Tensor:
    """Bilinear downsampling of a patch grid into the coarse point-query grid.

    Args:
        features: `[B, G*G, C]` patch features in row-major grid order.
    Returns:
        `[B, (G/s)², C]` in the input dtype. Interpolation runs in float32 like the original, which makes it
        exactly 2×2 average pooling for s=2, the centre patch for s=3 and the central 2×2 mean for s=4.
    """
    batch, _, channels = features.shape
    coarse = grid_size // scale_factor
    grid = features.view(batch, grid_size, grid_size, channels).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(coarse, coarse), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(batch, coarse * coarse, channels).to(features.dtype)


def check_patch_features(features: torch.Tensor, grid_size: int, width: int, name: str) -> None:
    """Raises a ValueError naming the expected `[B, G*G, width]` and the shape found, instead of a reshape
    error deep inside the projector."""
    if features.dim() != 3 or features.shape[1] != grid_size * grid_size or features.shape[2] != width:
        raise ValueError(
            f"{name}: expected [batch, {grid_size * grid_size} patches ({grid_size}x{grid_size} grid), {width} "
            f"channels], got {list(features.shape)}"
        )


def group_regions(features: torch.Tensor, grid_size: int, scale_factor: int) -> torch.Tensor:
    """Gathers each coarse cell's s×s block of patches, so a region's keys sit side by side.

    Args:
        features: `[B, G*G, C]` in row-major grid order.
    Returns:
        `[B * (G/s)², s², C]`: row `b*(G/s)² + R*(G/s) + C` holds the block of cell (R, C) of image b, its
        patches in row-major order inside the block.
    """
    batch, _, channels = features.shape
    coarse, s = grid_size // scale_factor, scale_factor
    blocks = features.view(batch, coarse, s, coarse, s, channels).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(batch * coarse * coarse, s * s, channels)


def space_to_depth(features: torch.Tensor, grid_size: int, scale_factor: int) -> torch.Tensor:
    """Pixel shuffle: concatenates each s×s block's channels. `[B, G*G, C]` -> `[B, (G/s)², s²·C]`."""
    batch, _, channels = features.shape
    regions = group_regions(features, grid_size, scale_factor)
    return regions.reshape(batch, -1, scale_factor * scale_factor * channels)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. `query [N, H, Lq, d]`, `key/value [N, H, Lk, d]` -> (`[N, Lq, H, d]`, weights)."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class TokenPackerMLP(nn.Module):
    """Two Linears with an activation between them (`fc1 -> act -> fc2`)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class TokenPackerInProjection(nn.Linear):
    """A query, key or value Linear of the region attention. Its own type tells `_init_weights` to initialise it
    as the original's `nn.MultiheadAttention` initialises its in-projection (Xavier-uniform), where every other
    projector Linear gets N(0, 0.02). The attention module cannot be the one recognised: transformers does not
    call `_init_weights` on a parameterless module of a model defined outside the library."""


class TokenPackerRegionAttention(nn.Module):
    """Region-to-point attention: multi-head attention of one point query over the s² keys of its own region.

    Separate q/k/v/o Linears (the original's `nn.MultiheadAttention` in-projection split in three) so that
    LoRA can target them, dispatched through transformers' attention interface so it follows the model's
    `attn_implementation` (sdpa by default, eager, flex, flash).
    """

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.projector_hidden_size
        self.num_heads = config.projector_num_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = TokenPackerInProjection(self.embed_dim, self.embed_dim)
        self.k_proj = TokenPackerInProjection(self.embed_dim, self.embed_dim)
        self.v_proj = TokenPackerInProjection(self.embed_dim, self.embed_dim)
        self.o_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        regions, length, _ = states.shape
        return states.view(regions, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, point_queries: torch.Tensor, region_keys: torch.Tensor, region_values: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """`point_queries [R, 1, E]`, `region_keys/values [R, s², E]` (R = images × cells) -> `[R, 1, E]`."""
        query = self._split_heads(self.q_proj(point_queries))
        key = self._split_heads(self.k_proj(region_keys))
        value = self._split_heads(self.v_proj(region_values))
        # A projector built standalone (outside a PreTrainedModel) has no resolved choice yet: use sdpa.
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation or "sdpa", eager_attention_forward
        )
        output, _ = attention_interface(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, is_causal=False, **kwargs
        )
        return self.o_proj(output.reshape(point_queries.shape[0], -1, self.embed_dim))


class TokenPackerProjector(nn.Module):
    """TokenPacker: packs a G×G patch grid into (G/s)² LLM tokens.

    Point queries are the bilinearly downsampled `vision_feature_layer` features; region keys/values are
    the multi-level `region_feature_layers` features. Each point query attends only to the s² patches of
    its own region (no residual: the output is the attention result), then an MLP maps it to the LLM width.
    """

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        width, eps, act = config.projector_hidden_size, config.projector_layer_norm_eps, config.projector_hidden_act
        region_width = vision_width * len(config.region_feature_layers)
        self.grid_size = config.patch_grid_size
        self.scale_factor = config.scale_factor
        self.vision_width, self.region_width = vision_width, region_width
        self.point_query_proj = nn.Linear(vision_width, width, bias=False)
        self.point_query_norm = nn.LayerNorm(width, eps=eps)
        self.region_key_proj = TokenPackerMLP(region_width, width, width, act)
        self.region_key_norm = nn.LayerNorm(width, eps=eps)
        self.region_value_proj = TokenPackerMLP(region_width, width, width, act)
        self.region_value_norm = nn.LayerNorm(width, eps=eps)
        self.region_attn = TokenPackerRegionAttention(config)
        self.output_proj = TokenPackerMLP(width, config.text_config.hidden_size, config.text_config.hidden_size, act)

    def forward(self, query_features: torch.Tensor, region_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            query_features: `[B, G*G, Dv]`, the `vision_feature_layer` patch features.
            region_features: `[B, G*G, L*Dv]`, the `region_feature_layers` features concatenated on channels.
        Returns:
            `[B, (G/s)², D_text]`.
        """
        grid, s = self.grid_size, self.scale_factor
        check_patch_features(query_features, grid, self.vision_width, "query_features")
        check_patch_features(region_features, grid, self.region_width, "region_features")
        batch = query_features.shape[0]
        point_queries = downsample_point_queries(query_features, grid, s)
        point_queries = self.point_query_norm(self.point_query_proj(point_queries))
        region_keys = self.region_key_norm(self.region_key_proj(region_features))
        region_values = self.region_value_norm(self.region_value_proj(region_features))
        packed = self.region_attn(
            point_queries.reshape(-1, 1, point_queries.shape[-1]),
            group_regions(region_keys, grid, s),
            group_regions(region_values, grid, s),
        )
        return self.output_proj(packed.view(batch, -1, packed.shape[-1]))


class MLPProjector(nn.Module):
    """LLaVA-1.5's projector (`mlp2x_gelu`): every patch becomes one token. Baseline with G² tokens."""

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        text_width = config.text_config.hidden_size
        self.output_proj = TokenPackerMLP(
            config.vision_config.hidden_size, text_width, text_width, config.projector_hidden_act
        )

    def forward(self, query_features: torch.Tensor, region_features: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, G*G, Dv]` -> `[B, G*G, D_text]`; `region_features` is ignored."""
        return self.output_proj(query_features)


class AvgPoolProjector(nn.Module):
    """s×s average pooling of the patch grid, then LLaVA's MLP. Baseline with (G/s)² tokens."""

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        text_width = config.text_config.hidden_size
        self.grid_size = config.patch_grid_size
        self.scale_factor = config.scale_factor
        self.output_proj = TokenPackerMLP(
            config.vision_config.hidden_size, text_width, text_width, config.projector_hidden_act
        )

    def forward(self, query_features: torch.Tensor, region_features: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, G*G, Dv]` -> `[B, (G/s)², D_text]`; `region_features` is ignored."""
        pooled = group_regions(query_features, self.grid_size, self.scale_factor).mean(dim=1)
        return self.output_proj(pooled.view(query_features.shape[0], -1, pooled.shape[-1]))


class PixelShuffleProjector(nn.Module):
    """Space-to-depth (pixel shuffle) of each s×s block, then an MLP. Baseline with (G/s)² tokens."""

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        text_width = config.text_config.hidden_size
        self.grid_size = config.patch_grid_size
        self.scale_factor = config.scale_factor
        in_width = config.vision_config.hidden_size * config.scale_factor**2
        self.output_proj = TokenPackerMLP(in_width, text_width, text_width, config.projector_hidden_act)

    def forward(self, query_features: torch.Tensor, region_features: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, G*G, Dv]` -> `[B, (G/s)², D_text]`; `region_features` is ignored."""
        return self.output_proj(space_to_depth(query_features, self.grid_size, self.scale_factor))


PROJECTOR_CLASSES = {
    "tokenpacker": TokenPackerProjector,
    "mlp": MLPProjector,
    "avg_pool": AvgPoolProjector,
    "pixel_shuffle": PixelShuffleProjector,
}


def build_projector(config: TokenPackerConfig) -> nn.Module:
    """The projector named by `config.projector_type`."""
    return PROJECTOR_CLASSES[config.projector_type](config)


__all__ = [
    "TokenPackerProjector",
    "TokenPackerRegionAttention",
    "TokenPackerInProjection",
    "MLPProjector",
    "AvgPoolProjector",
    "PixelShuffleProjector",
    "build_projector",
]
