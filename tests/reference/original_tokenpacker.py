"""Independent reference ("oracle") for TokenPacker in the ORIGINAL formulation, written from the authors' code
(CircleRadon/TokenPacker: the projector, the tower's feature selection and LLaVA's placeholder splice), not from
`tokenpacker_hf`.

It mirrors the authors' `llava/model/multimodal_projector/builder.py::TokenPacker` with the original parameter
names (`q_proj_1`, `k_proj_1.0`, `clip_attn.in_proj_weight`, `mlp.2`, ...), so an original-format projector
state dict (prefix `model.mm_projector.` stripped) loads into `OriginalTokenPacker` with
`load_state_dict(strict=True)`. The only generalisations are the widths the original hard-codes:
`Linear(4096, 1024)` is `Linear(num_levels * kv_dim, embed_dim)` here.

Contents:
- `OriginalTokenPacker`: the projector, sequence-first `nn.MultiheadAttention` over `divide_feature` groups.
- `original_feature_select`: the CLIP tower's `feature_select` (query layer + channel-concatenated levels).
- `random_init_`: non-trivial random weights for parity checks.
- `original_multimodal_forward`: LLaVA-1.5-era `prepare_inputs_labels_for_multimodal` (-200 splice, pad and
  slice layouts) followed by a causal LM forward, for one sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_TOKEN_INDEX = -200


class OriginalTokenPacker(nn.Module):
    """TokenPacker's projector as the original code builds it.

    Args:
        raw_grid: side of the patch grid (24 for CLIP ViT-L/14-336).
        embed_dim: projector width E.
        num_heads: heads of `clip_attn` (E // 128 in the original).
        hidden_size: LLM width (output of `mlp`).
        scale_factor: s; each output token packs an s×s region, G = raw_grid / s.
        kv_dim: width of the single-level query features (vision width).
        num_levels: number of channel-concatenated levels in the key/value features (4 in the original).
    """

    def __init__(
        self,
        raw_grid: int = 24,
        embed_dim: int = 1024,
        num_heads: int = 8,
        hidden_size: int = 4096,
        scale_factor: int = 2,
        kv_dim: int = 1024,
        num_levels: int = 4,
    ):
        super().__init__()
        if raw_grid % scale_factor != 0:
            raise ValueError(f"scale_factor {scale_factor} must divide raw_grid {raw_grid}")
        self.raw_grid = raw_grid
        self.grid_size = raw_grid // scale_factor
        self.num_queries = self.grid_size**2
        self.scale_factor = scale_factor
        self.q_proj_1 = nn.Linear(kv_dim, embed_dim, bias=False)
        self.k_proj_1 = nn.Sequential(
            nn.Linear(num_levels * kv_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim)
        )
        self.v_proj_1 = nn.Sequential(
            nn.Linear(num_levels * kv_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim)
        )
        self.ln_q_1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_k_1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_v_1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.clip_attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The authors' `TokenPacker._init_weights`: Linears (incl. the MHA out_proj) trunc-normal(0.02) with zero bias;
        LayerNorm 1/0.

        `in_proj_weight` keeps PyTorch's Xavier-uniform init (with zero `in_proj_bias`).
        """
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @staticmethod
    def divide_feature(x: torch.Tensor, kernel_size: int, token_num: int, N: int, c: int) -> torch.Tensor:
        """Regroups a sequence-first grid into local windows.

        Args:
            x: `[token_num, N, c]`, token_num = h·w patches of a square grid in row-major order, N images.
        Returns:
            `[k², (token_num / k²)·N, c]` with k = kernel_size: sequence position `dr·k + dc`, batch position
            `(R·(w/k) + C)·N + n` holds the patch at row `k·R + dr`, column `k·C + dc` of image n.
        """
        h = w = int(token_num**0.5)
        k = kernel_size
        x = x.reshape(h, w, N, c).reshape(h // k, k, w, N, c)  # [R, dr, col, N, c]
        x = x.permute(0, 2, 1, 3, 4).reshape(h // k, w // k, k, k, N, c)  # [R, C, dc, dr, N, c]
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(h // k, w // k, k * k, N, c)  # [R, C, dr·k+dc, N, c]
        return x.permute(2, 0, 1, 3, 4).reshape(k * k, -1, c)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The authors' `TokenPacker.forward`, step by step.

        Args:
            x: `(features [N, raw_grid², kv_dim], features_multi [N, raw_grid², num_levels·kv_dim])`, the tuple
                the original vision tower returns.
        Returns:
            `[N, grid_size², hidden_size]`.
        """
        x, x_multi = x
        key = self.ln_k_1(self.k_proj_1(x_multi)).permute(1, 0, 2)  # [token_num, N, E]
        value = self.ln_v_1(self.v_proj_1(x_multi)).permute(1, 0, 2)
        token_num, N, c = key.shape
        # Bilinear downsampling in float32 whatever the module dtype, then back (the only dtype handling).
        grid = x.reshape(N, self.raw_grid, self.raw_grid, -1).float().permute(0, 3, 1, 2)
        q = F.interpolate(grid, size=(self.grid_size, self.grid_size), mode="bilinear").permute(0, 2, 3, 1)
        q = q.reshape(N, -1, q.shape[-1]).to(x.dtype)
        query = self.ln_q_1(self.q_proj_1(q)).permute(1, 0, 2)  # [G², N, E]
        query = self.divide_feature(query, 1, self.num_queries, N, c)  # [1, G²·N, E]
        key = self.divide_feature(key, self.scale_factor, token_num, N, c)  # [s², G²·N, E]
        value = self.divide_feature(value, self.scale_factor, token_num, N, value.shape[-1])
        out = self.clip_attn(query, key, value)[0]  # [1, G²·N, E]
        out = out.reshape(self.num_queries, N, -1).permute(1, 0, 2)
        return self.mlp(out)


def random_init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialises every parameter with non-trivial random values for parity checks (in place).

    Matrices N(0, 1/fan_in) (unit gain, so attention scores are O(1): neither saturated nor uniform), every
    bias incl. the MHA in/out-projection biases N(0, 0.2), LayerNorm weights N(1, 0.2). The original's own init
    (zero biases, unit LayerNorms, std 0.02) would let errors in bias or LayerNorm handling go unnoticed.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(noise / param.shape[-1] ** 0.5)
            elif "ln_" in name or "norm" in name:
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return module


def original_feature_select(
    hidden_states: Sequence[torch.Tensor],
    select_layer: int = -2,
    layers: Sequence[int] = (12, 16, 22, 23),
    select_feature: str = "patch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP tower's `feature_select`.

    Args:
        hidden_states: the `output_hidden_states=True` tuple, `num_layers + 1` tensors `[B, 1 + P, C]` (index 0
            is the embedding output, index i the output of encoder layer i).
    Returns:
        `(query [B, P, C], multi [B, P, len(layers)·C])` with CLS dropped for `"patch"`; `multi` is the
        concatenation of `hidden_states[i] for i in layers` on channels, in that order.
    """
    query = hidden_states[select_layer]
    multi = torch.cat([hidden_states[i] for i in layers], dim=-1)
    if select_feature == "patch":
        return query[:, 1:], multi[:, 1:]
    if select_feature == "cls_patch":
        return query, multi
    raise ValueError(f"Unexpected select feature: {select_feature}")


def _slice_sequence(
    tiles: torch.Tensor, grid: tuple[int, int], separators: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The embeddings that replace the `-200` of a slice-mode sample.

    Args:
        tiles: `[tiles, T, D]` projector outputs: rows·cols grid tiles in row-major order, then the thumbnail
            when rows·cols > 1.
        separators: `(comma [1, D], newline [1, D])` embeddings.
    Returns:
        `[L, D]`: for each row `F , F , ... F \n`, then `F_thumbnail \n` when rows·cols > 1.
    """
    rows, cols = grid
    comma, newline = separators
    parts = []
    for row in range(rows):
        for col in range(cols):
            parts.append(tiles[row * cols + col])
            parts.append(comma if col < cols - 1 else newline)
    if rows * cols > 1:
        parts += [tiles[rows * cols], newline]
    return torch.cat(parts, dim=0)


def original_multimodal_forward(
    vision_model: nn.Module,
    projector: OriginalTokenPacker,
    language_model: nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    images: torch.Tensor,
    mode: str = "pad",
    grid: tuple[int, int] = (1, 1),
    separator_ids: tuple[int, int] = (29892, 0),
    select_layer: int = -2,
    layers: Sequence[int] = (12, 16, 22, 23),
) -> torch.Tensor:
    """Logits of one sample the way the original LLaVA-1.5-era TokenPacker computes them.

    1. `encode_images`: all tiles go through the tower (`output_hidden_states=True`, the full tower, as the
       original does), `original_feature_select`, cast back to the pixel dtype, then the projector in one call.
    2. `prepare_inputs_labels_for_multimodal`: the text between placeholders is embedded with the LM's input
       embeddings and every `-200` is replaced by image features consumed in order:
       - `mode="pad"` (any other mode than "slice"): each `-200` takes the next tile's T tokens, no separators;
       - `mode="slice"`: exactly one `-200`, replaced by the `rows×cols` tiles row by row with the comma
         embedding between tiles of a row and the newline embedding after each row, then, when rows·cols > 1,
         the thumbnail (last tile) and another newline.
    3. The causal LM runs on `inputs_embeds` (no attention mask: one unpadded sample).

    Args:
        vision_model: a transformers `CLIPVisionModel` (or any model returning `hidden_states` with a leading
            CLS token).
        projector: an `OriginalTokenPacker` whose `raw_grid` matches the tower's patch grid.
        language_model: a transformers causal LM accepting `inputs_embeds` (e.g. `LlamaForCausalLM`).
        input_ids: 1-D ids with `-200` placeholders.
        images: `[tiles, 3, H, W]` pixel values; pad mode: one tile per placeholder; slice mode: rows·cols
            tiles (+1 thumbnail when rows·cols > 1).
        grid: `(rows, cols)` of the slice grid; ignored in pad mode.
        separator_ids: `(comma_id, newline_id)`, 29892 and 0 (`<unk>`) for the released LLaMA models.
        select_layer, layers: the tower's query layer and key/value levels.
    Returns:
        logits `[1, L, vocab]` over the expanded sequence.
    """
    input_ids = torch.as_tensor(input_ids).reshape(-1)
    num_images = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    rows, cols = grid
    expected_tiles = (rows * cols + (rows * cols > 1)) if mode == "slice" else num_images
    if mode == "slice" and num_images != 1:
        raise ValueError(f"slice mode supports exactly one image placeholder per sample, got {num_images}")
    if images.shape[0] != expected_tiles:
        raise ValueError(f"expected {expected_tiles} image tiles for mode={mode!r}, grid={grid}, got {images.shape[0]}")

    tower_param = next(vision_model.parameters())
    outputs = vision_model(images.to(tower_param.device, tower_param.dtype), output_hidden_states=True)
    query, multi = original_feature_select(outputs.hidden_states, select_layer, layers)
    image_features = projector((query.to(images.dtype), multi.to(images.dtype)))  # [tiles, T, D]

    embed_tokens = language_model.get_input_embeddings()
    device = embed_tokens.weight.device
    image_features = image_features.to(device, embed_tokens.weight.dtype)
    if mode == "slice":
        separators = tuple(embed_tokens(torch.tensor([i], device=device)) for i in separator_ids)

    positions = torch.nonzero(input_ids == IMAGE_TOKEN_INDEX).flatten().tolist()
    bounds = [-1] + positions + [input_ids.numel()]
    pieces, tile = [], 0
    for index in range(num_images + 1):
        text = input_ids[bounds[index] + 1 : bounds[index + 1]].to(device)
        pieces.append(embed_tokens(text))
        if index < num_images:
            if mode == "slice":
                pieces.append(_slice_sequence(image_features, grid, separators))
            else:
                pieces.append(image_features[tile])
                tile += 1
    inputs_embeds = torch.cat(pieces, dim=0).unsqueeze(0)
    return language_model(inputs_embeds=inputs_embeds).logits
