"""Tests of `tokenpacker_hf.projector_tokenpacker`: shapes, locality (each token sees only its own s×s region),
the bilinear point query, and equality with the independent original-formulation oracle in
`tests/reference/original_tokenpacker.py`."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from tokenpacker_hf.configuration_tokenpacker import TokenPackerConfig
from tokenpacker_hf.convert_tokenpacker_original import convert_original_projector_state_dict
from tokenpacker_hf.modeling_tokenpacker import TokenPackerForConditionalGeneration, TokenPackerModel
from tokenpacker_hf.projector_tokenpacker import (
    AvgPoolProjector,
    MLPProjector,
    PixelShuffleProjector,
    TokenPackerProjector,
    build_projector,
    downsample_point_queries,
    group_regions,
    space_to_depth,
)

from reference.original_tokenpacker import (
    IMAGE_TOKEN_INDEX,
    OriginalTokenPacker,
    original_feature_select,
    original_multimodal_forward,
    random_init_,
)
from tiny import tiny_config, vision_config

PATCH = 4  # pixels per patch in the test configs; only the grid side G = image_size / PATCH matters here


def make_config(
    grid: int = 12,
    scale_factor: int = 2,
    vision_width: int = 24,
    levels: int = 3,
    width: int = 32,
    heads: int = 4,
    text_width: int = 40,
    projector_type: str = "tokenpacker",
) -> TokenPackerConfig:
    """A projector config with a G×G patch grid and `levels` region levels (tower and LM are never built)."""
    return tiny_config(
        vision=dict(
            hidden_size=vision_width, image_size=grid * PATCH, patch_size=PATCH, num_hidden_layers=max(4, levels)
        ),
        text=dict(hidden_size=text_width),
        region_feature_layers=list(range(1, levels + 1)),
        scale_factor=scale_factor,
        projector_hidden_size=width,
        projector_num_heads=heads,
        projector_type=projector_type,
    )


def clip_large_config(scale_factor: int, text_width: int = 256) -> TokenPackerConfig:
    """CLIP ViT-L/14-336 shapes: 24×24 patches of width 1024, levels [12, 16, 22, 23], E = 1024, 8 heads."""
    return TokenPackerConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=64,
        ),
        scale_factor=scale_factor,
    )


def oracle_for(config: TokenPackerConfig, seed: int = 0) -> OriginalTokenPacker:
    """A randomly initialised `OriginalTokenPacker` with the shapes of `config`."""
    return random_init_(
        OriginalTokenPacker(
            raw_grid=config.patch_grid_size,
            embed_dim=config.projector_hidden_size,
            num_heads=config.projector_num_heads,
            hidden_size=config.text_config.hidden_size,
            scale_factor=config.scale_factor,
            kv_dim=config.vision_config.hidden_size,
            num_levels=len(config.region_feature_layers),
        ),
        seed,
    ).eval()


def converted_projector(oracle: OriginalTokenPacker, config: TokenPackerConfig) -> TokenPackerProjector:
    """Our projector holding the oracle's weights through the original->ours key conversion (strict load)."""
    projector = TokenPackerProjector(config).eval()
    projector.load_state_dict(convert_original_projector_state_dict(oracle.state_dict()), strict=True)
    return projector


def features(config: TokenPackerConfig, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `(query [B, G², Dv], region [B, G², L·Dv])` inputs."""
    generator = torch.Generator().manual_seed(seed)
    tokens, width = config.patch_grid_size**2, config.vision_config.hidden_size
    query = torch.randn(batch, tokens, width, generator=generator)
    region = torch.randn(batch, tokens, width * len(config.region_feature_layers), generator=generator)
    return query, region


def changed_tokens(reference: torch.Tensor, perturbed: torch.Tensor) -> list[list[int]]:
    """Per batch item, the indices of output tokens changed by a perturbation. `[B, T, D]` x2 -> B lists.

    Not bitwise: CPU kernels round differently depending on batch size and row position (~1e-7 here), so a
    token counts as changed above 1e-3 and must otherwise be within 1e-5, leaving no ambiguous middle ground.
    """
    difference = (perturbed - reference).abs().amax(dim=-1)
    changed = difference > 1e-3
    assert (difference[~changed] < 1e-5).all(), "a token changed by an amount between rounding noise and signal"
    return [torch.nonzero(row).flatten().tolist() for row in changed]


# --- shapes and token counts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid, scale_factor, vision_width, levels, width, heads, text_width",
    [
        (4, 1, 32, 3, 32, 2, 48),
        (4, 2, 32, 3, 32, 2, 48),
        (12, 3, 24, 1, 16, 1, 40),
        (12, 4, 16, 4, 64, 8, 24),
        (6, 3, 8, 2, 24, 3, 16),
        (12, 2, 40, 2, 48, 6, 72),
        (8, 4, 20, 5, 40, 5, 8),
    ],
)
def test_tokenpacker_output_shape(grid, scale_factor, vision_width, levels, width, heads, text_width):
    config = make_config(grid, scale_factor, vision_width, levels, width, heads, text_width)
    out = build_projector(config)(*features(config, batch=3))
    tokens = (grid // scale_factor) ** 2
    assert out.shape == (3, tokens, text_width)
    assert config.num_image_tokens == tokens


@pytest.mark.parametrize("scale_factor", [1, 2, 3, 4])
def test_clip_large_shapes_token_counts(scale_factor):
    config = clip_large_config(scale_factor)
    out = TokenPackerProjector(config)(*features(config, batch=1))
    assert out.shape == (1, {1: 576, 2: 144, 3: 64, 4: 36}[scale_factor], 256)


@pytest.mark.parametrize(
    "projector_type, cls, scale_factor, tokens",
    [
        ("mlp", MLPProjector, 2, 144),
        ("avg_pool", AvgPoolProjector, 2, 36),
        ("avg_pool", AvgPoolProjector, 3, 16),
        ("pixel_shuffle", PixelShuffleProjector, 4, 9),
        ("pixel_shuffle", PixelShuffleProjector, 1, 144),
    ],
)
def test_baseline_output_shapes(projector_type, cls, scale_factor, tokens):
    config = make_config(grid=12, scale_factor=scale_factor, projector_type=projector_type)
    projector = build_projector(config)
    query, _ = features(config, batch=2)
    assert isinstance(projector, cls)
    assert projector(query).shape == (2, tokens, 40) and config.num_image_tokens == tokens


def test_fresh_model_initialises_the_projector_like_the_original():
    """The original's `_init_weights` gives every Linear N(0, 0.02) and a zero bias, LayerNorms 1 and 0,
    and `nn.MultiheadAttention` Xavier-initialises the stacked in-projection. The oracle's own init is the
    reference, parameter by parameter (the Xavier bound of E = 256 gives a std about twice 0.02)."""
    config = make_config(grid=8, vision_width=64, levels=2, width=256, heads=2, text_width=96)
    torch.manual_seed(0)
    ours = TokenPackerModel(config).multi_modal_projector.state_dict()
    original = OriginalTokenPacker(raw_grid=8, embed_dim=256, num_heads=2, hidden_size=96, kv_dim=64, num_levels=2)
    expected = convert_original_projector_state_dict(original.state_dict())
    assert ours.keys() == expected.keys()
    for name, reference in expected.items():
        if reference.std() == 0:  # biases, LayerNorm weights
            assert torch.equal(ours[name], reference), name
        else:
            assert ours[name].std().item() == pytest.approx(reference.std().item(), rel=0.1), name
            assert ours[name].mean().abs() < 0.1 * reference.std(), name


def assert_initialised_like_the_original(projector: nn.Module) -> None:
    """q/k/v Linears Xavier-uniform on [-b, b], b from `nn.MultiheadAttention`'s stacked [3E, E] in-projection;
    every other Linear N(0, 0.02); biases 0; LayerNorms 1 and 0."""
    in_projections = 0
    for name, module in projector.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().float()
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj"):
                in_projections += 1
                bound = (6.0 / (module.in_features + 3 * module.out_features)) ** 0.5
                assert 0.99 * bound < weight.abs().max() <= bound, name  # fills the interval and stays inside
                assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.03), name
                # Uniform: half the weights lie within b/2 (a normal of the same std would put 61% there).
                assert (weight.abs() < bound / 2).float().mean().item() == pytest.approx(0.5, abs=0.02), name
            else:
                assert weight.std().item() == pytest.approx(0.02, rel=0.1), name
                assert weight.mean().abs() < 0.002, name
            assert module.bias is None or torch.all(module.bias == 0), name
        elif isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    assert in_projections == 3


@pytest.mark.parametrize("path", ["constructor", "from_pretrained_without_projector"])
def test_projector_init_is_the_originals_on_every_path(tmp_path, path):
    """A new model (`post_init`), and a checkpoint that lacks the projector, whose weights transformers then
    initialises as missing keys."""
    config = make_config(grid=8, vision_width=64, levels=2, width=256, heads=2, text_width=96)
    torch.manual_seed(0)
    model = TokenPackerForConditionalGeneration(config)
    if path != "constructor":
        model.save_pretrained(tmp_path)
        weights = load_file(tmp_path / "model.safetensors")
        kept = {key: value for key, value in weights.items() if ".multi_modal_projector." not in key}
        assert len(kept) < len(weights)
        save_file(kept, tmp_path / "model.safetensors", {"format": "pt"})
        model = TokenPackerForConditionalGeneration.from_pretrained(tmp_path)
    assert_initialised_like_the_original(model.model.multi_modal_projector)


# --- equality with the original formulation ----------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("scale_factor", [1, 2, 3, 4])
def test_matches_original_formulation(scale_factor, attn_implementation):
    config = make_config(grid=12, scale_factor=scale_factor)
    config._attn_implementation = attn_implementation
    oracle = oracle_for(config)
    query, region = features(config, batch=3)
    with torch.no_grad():
        expected = oracle((query, region))
        actual = converted_projector(oracle, config)(query, region)
    assert expected.abs().mean() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale_factor", [2, 3, 4])
def test_matches_original_formulation_clip_large(scale_factor):
    config = clip_large_config(scale_factor)
    oracle = oracle_for(config)
    query, region = features(config, batch=1)
    with torch.no_grad():
        expected = oracle((query, region))
        actual = converted_projector(oracle, config)(query, region)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_batch_items_are_independent():
    """Each image's tokens depend only on that image (the oracle's `(cell, image)` batch interleaving and our
    `(image, cell)` order must not mix images)."""
    config = make_config(grid=12, scale_factor=3)
    projector = converted_projector(oracle_for(config), config)
    query, region = features(config, batch=4)
    with torch.no_grad():
        together = projector(query, region)
        alone = torch.cat([projector(query[i : i + 1], region[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


# --- locality -------------------------------------------------------------------------


def perturb_each_patch(tensor: torch.Tensor) -> torch.Tensor:
    """`[1, G², C]` -> `[G², G², C]`: item p is the input with patch p's feature replaced by a different one."""
    tokens = tensor.shape[1]
    perturbed = tensor.expand(tokens, -1, -1).clone()
    index = torch.arange(tokens)
    perturbed[index, index] += 1.0 + torch.randn(tokens, tensor.shape[-1], generator=torch.Generator().manual_seed(5))
    return perturbed


@pytest.mark.parametrize("grid, scale_factor", [(12, 1), (12, 2), (12, 3), (12, 4), (6, 3)])
def test_region_feature_changes_exactly_its_own_token(grid, scale_factor):
    config = make_config(grid=grid, scale_factor=scale_factor)
    projector = random_init_(TokenPackerProjector(config)).eval()
    query, region = features(config, batch=1)
    coarse = grid // scale_factor
    with torch.no_grad():
        reference = projector(query, region)
        perturbed = projector(query.expand(grid * grid, -1, -1), perturb_each_patch(region))
    expected = [[(p // grid // scale_factor) * coarse + (p % grid) // scale_factor] for p in range(grid * grid)]
    assert changed_tokens(reference.expand_as(perturbed), perturbed) == expected


def bilinear_support(scale_factor: int) -> set[int]:
    """Offsets inside an s×s block that the exact-factor bilinear downsampling reads: it samples source coordinate
    `s·i + (s-1)/2`, i.e. the block's centre offset (odd s) or the two offsets around it (even s)."""
    centre = (scale_factor - 1) / 2
    return {int(centre // 1), int(-(-centre // 1))}


@pytest.mark.parametrize("scale_factor", [1, 2, 3, 4])
def test_query_feature_outside_bilinear_support_changes_nothing(scale_factor):
    grid = 12
    config = make_config(grid=grid, scale_factor=scale_factor)
    projector = random_init_(TokenPackerProjector(config)).eval()
    query, region = features(config, batch=1)
    coarse, support = grid // scale_factor, bilinear_support(scale_factor)
    with torch.no_grad():
        reference = projector(query, region)
        perturbed = projector(perturb_each_patch(query), region.expand(grid * grid, -1, -1))
    expected = []
    for p in range(grid * grid):
        row, col = divmod(p, grid)
        # At s=1 each query attends to a single key, whose softmax weight is 1 whatever the query.
        inside = scale_factor > 1 and row % scale_factor in support and col % scale_factor in support
        expected.append([(row // scale_factor) * coarse + col // scale_factor] if inside else [])
    assert changed_tokens(reference.expand_as(perturbed), perturbed) == expected


# --- bilinear identities and index mappings ------------------------------------------------


def as_grid(tensor: torch.Tensor, grid: int) -> torch.Tensor:
    """`[B, G², C]` -> `[B, G, G, C]`."""
    return tensor.reshape(tensor.shape[0], grid, grid, tensor.shape[-1])


@pytest.mark.parametrize("grid", [12, 24])
def test_bilinear_downsampling_identities(grid):
    x = torch.randn(2, grid * grid, 5, generator=torch.Generator().manual_seed(0))
    g = as_grid(x, grid)
    torch.testing.assert_close(downsample_point_queries(x, grid, 1), x, rtol=0, atol=0)
    # s=2: 2×2 average pooling
    pooled = (g[:, 0::2, 0::2] + g[:, 0::2, 1::2] + g[:, 1::2, 0::2] + g[:, 1::2, 1::2]) / 4
    torch.testing.assert_close(as_grid(downsample_point_queries(x, grid, 2), grid // 2), pooled, rtol=0, atol=1e-6)
    # s=3: the centre patch of each 3×3 block, no averaging
    assert torch.equal(as_grid(downsample_point_queries(x, grid, 3), grid // 3), g[:, 1::3, 1::3])
    # s=4: the mean of the central 2×2 of each 4×4 block
    central = (g[:, 1::4, 1::4] + g[:, 1::4, 2::4] + g[:, 2::4, 1::4] + g[:, 2::4, 2::4]) / 4
    torch.testing.assert_close(as_grid(downsample_point_queries(x, grid, 4), grid // 4), central, rtol=0, atol=1e-6)


def test_bf16_projector_interpolates_in_float32(monkeypatch):
    """The bilinear downsampling of a bf16 projector runs in float32 and its result is cast back
    to bf16, as in the original, so the point-query projection sees bf16 again."""
    seen = []
    interpolate = F.interpolate

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.dtype)
        return interpolate(tensor, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    config = make_config(grid=12, scale_factor=2)
    projector = TokenPackerProjector(config).to(torch.bfloat16)
    query, region = (t.bfloat16() for t in features(config, batch=2))
    projector.point_query_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.no_grad():
        assert projector(query, region).dtype == torch.bfloat16
    assert seen == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("grid, scale_factor", [(4, 2), (12, 3), (12, 4), (6, 1)])
def test_group_regions_and_space_to_depth_index_mapping(grid, scale_factor):
    batch, channels, s, coarse = 2, 3, scale_factor, grid // scale_factor
    x = torch.arange(batch * grid * grid * channels).reshape(batch, grid * grid, channels)
    regions = group_regions(x, grid, s)
    shuffled = space_to_depth(x, grid, s)
    assert regions.shape == (batch * coarse * coarse, s * s, channels)
    assert shuffled.shape == (batch, coarse * coarse, s * s * channels)
    for b in range(batch):
        for big_r in range(coarse):
            for big_c in range(coarse):
                for dr in range(s):
                    for dc in range(s):
                        source = x[b, (s * big_r + dr) * grid + s * big_c + dc]
                        cell, offset = big_r * coarse + big_c, dr * s + dc
                        assert torch.equal(regions[b * coarse * coarse + cell, offset], source)
                        assert torch.equal(shuffled[b, cell, offset * channels : (offset + 1) * channels], source)


def test_divide_feature_of_the_oracle_matches_spec_index_formula():
    """The oracle's `divide_feature`: sequence `dr·k + dc`, batch `(R·G + C)·N + n`."""
    grid, k, images, channels = 6, 3, 2, 2
    x = torch.arange(grid * grid * images * channels).reshape(grid * grid, images, channels)
    out = OriginalTokenPacker.divide_feature(x, k, grid * grid, images, channels)
    coarse = grid // k
    assert out.shape == (k * k, coarse * coarse * images, channels)
    for big_r in range(coarse):
        for big_c in range(coarse):
            for n in range(images):
                for dr in range(k):
                    for dc in range(k):
                        expected = x[(k * big_r + dr) * grid + k * big_c + dc, n]
                        assert torch.equal(out[dr * k + dc, (big_r * coarse + big_c) * images + n], expected)


# --- baselines ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_factor", [2, 3])
def test_avg_pool_baseline_is_avg_pool2d_then_mlp(scale_factor):
    config = make_config(grid=12, scale_factor=scale_factor, projector_type="avg_pool")
    projector = random_init_(build_projector(config))
    query, _ = features(config, batch=2)
    grid = query.reshape(2, 12, 12, -1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, scale_factor).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(projector(query), projector.output_proj(pooled), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale_factor", [2, 4])
def test_pixel_shuffle_baseline_is_block_concatenation_then_mlp(scale_factor):
    config = make_config(grid=12, scale_factor=scale_factor, projector_type="pixel_shuffle")
    projector = random_init_(build_projector(config))
    query, _ = features(config, batch=2)
    s, coarse, grid = scale_factor, 12 // scale_factor, as_grid(query, 12)
    gathered = torch.stack(
        [
            torch.stack(
                [
                    torch.cat([grid[b, s * r + dr, s * c + dc] for dr in range(s) for dc in range(s)])
                    for r in range(coarse)
                    for c in range(coarse)
                ]
            )
            for b in range(2)
        ]
    )
    with torch.no_grad():
        torch.testing.assert_close(projector(query), projector.output_proj(gathered), rtol=0, atol=1e-5)


def test_mlp_baseline_maps_every_patch():
    config = make_config(grid=4, projector_type="mlp")
    projector = random_init_(build_projector(config))
    query, region = features(config, batch=2)
    with torch.no_grad():
        out = projector(query, region)
        torch.testing.assert_close(out[:, 5], projector.output_proj(query[:, 5]), rtol=0, atol=1e-6)


# --- dtype, compile, gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("scale_factor", [2, 3])
def test_bf16_projector_close_to_fp32(scale_factor):
    config = make_config(grid=12, scale_factor=scale_factor)
    projector = random_init_(TokenPackerProjector(config)).eval()
    query, region = features(config, batch=2)
    with torch.no_grad():
        reference = projector(query, region)
        out = projector.to(torch.bfloat16)(query.bfloat16(), region.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.1 * reference.abs().max().item())
    assert (out.float() - reference).abs().mean() < 0.02 * reference.abs().mean()


def test_bf16_matches_original_formulation_loosely():
    config = make_config(grid=12, scale_factor=2)
    oracle = oracle_for(config)
    projector = converted_projector(oracle, config)
    query, region = (t.bfloat16() for t in features(config, batch=2))
    with torch.no_grad():
        expected = oracle.to(torch.bfloat16)((query, region))
        actual = projector.to(torch.bfloat16)(query, region)
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert (actual.float() - expected.float()).abs().mean() < 0.02 * expected.float().abs().mean()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_torch_compile_gives_same_outputs(attn_implementation):
    config = make_config(grid=12, scale_factor=3)
    config._attn_implementation = attn_implementation
    projector = random_init_(TokenPackerProjector(config)).eval()
    query, region = features(config, batch=2)
    torch._dynamo.reset()
    compiled = torch.compile(projector, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(query, region), projector(query, region), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gradient_reaches_every_parameter(attn_implementation):
    config = make_config(grid=12, scale_factor=2)
    config._attn_implementation = attn_implementation
    projector = random_init_(TokenPackerProjector(config)).train()
    query, region = features(config, batch=2)
    query.requires_grad_(True)
    region.requires_grad_(True)
    out = projector(query, region)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert query.grad.abs().sum() > 0 and region.grad.abs().sum() > 0


# --- bad inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query_shape, region_shape, numbers",
    [
        ((2, 15, 32), (2, 15, 96), ("16", "15")),  # 4×4 grid expects 16 tokens
        ((2, 16, 31), (2, 16, 96), ("32", "31")),
        ((2, 16, 32), (2, 16, 95), ("96", "95")),
        ((2, 16, 32), (2, 12, 96), ("16", "12")),
    ],
)
def test_bad_input_shape_names_expected_and_found(query_shape, region_shape, numbers):
    projector = TokenPackerProjector(tiny_config())  # 4×4 grid, vision width 32, 3 levels
    with pytest.raises(ValueError) as error:
        projector(torch.randn(query_shape), torch.randn(region_shape))
    assert all(number in str(error.value) for number in numbers)


# --- self-checks of the oracle's LLaVA splice ------------------------------------------


class EmbeddingEcho(nn.Module):
    """A stand-in causal LM whose "logits" are its `inputs_embeds`, to read back the spliced sequence."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, inputs_embeds: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=inputs_embeds)


def tiny_tower_and_projector() -> tuple[CLIPVisionModel, OriginalTokenPacker]:
    """The tiny CLIP tower (4×4 patches, width 32, 4 layers) and a 2×2-packing oracle projector (T = 4, D = 48)."""
    torch.manual_seed(0)
    settings = {key: value for key, value in vision_config().items() if key != "model_type"}
    tower = CLIPVisionModel(CLIPVisionConfig(**settings)).eval()
    projector = OriginalTokenPacker(
        raw_grid=4, embed_dim=32, num_heads=2, hidden_size=48, scale_factor=2, kv_dim=32, num_levels=3
    ).eval()
    return tower, projector


def projected(tower: CLIPVisionModel, projector: OriginalTokenPacker, images: torch.Tensor) -> torch.Tensor:
    """`[tiles, 3, H, W]` -> `[tiles, T, D]` through the full tower and the oracle's feature selection."""
    hidden_states = tower(images, output_hidden_states=True).hidden_states
    return projector(original_feature_select(hidden_states, -2, (1, 2, 3)))


def test_oracle_slice_layout_follows_spec_example():
    """2×3 grid: `t0 , t1 , t2 NL t3 , t4 , t5 NL t6(thumbnail) NL` between the text embeddings."""
    tower, projector = tiny_tower_and_projector()
    lm = EmbeddingEcho(vocab=300, width=48)
    images = torch.randn(7, 3, 16, 16)
    comma, newline = 44, 0
    with torch.no_grad():
        out = original_multimodal_forward(
            tower,
            projector,
            lm,
            [1, 70, IMAGE_TOKEN_INDEX, 71, 72],
            images,
            mode="slice",
            grid=(2, 3),
            separator_ids=(comma, newline),
            layers=(1, 2, 3),
        )[0]
        tiles = projected(tower, projector, images)
        e = lm.embed_tokens.weight
        expected = torch.cat(
            [
                e[[1, 70]],
                tiles[0],
                e[[comma]],
                tiles[1],
                e[[comma]],
                tiles[2],
                e[[newline]],
                tiles[3],
                e[[comma]],
                tiles[4],
                e[[comma]],
                tiles[5],
                e[[newline]],
                tiles[6],
                e[[newline]],
                e[[71, 72]],
            ]
        )
    assert out.shape == (2 + 7 * 4 + 7 + 2, 48)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_oracle_single_tile_slice_and_pad_mode():
    """A 1×1 slice is `t0 NL` (no thumbnail); pad mode replaces each -200 by one tile's T tokens in order."""
    tower, projector = tiny_tower_and_projector()
    lm = EmbeddingEcho(vocab=300, width=48)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tiles = projected(tower, projector, images)
        e = lm.embed_tokens.weight
        single = original_multimodal_forward(
            tower,
            projector,
            lm,
            [1, IMAGE_TOKEN_INDEX, 9],
            images[:1],
            mode="slice",
            grid=(1, 1),
            separator_ids=(44, 0),
            layers=(1, 2, 3),
        )
        torch.testing.assert_close(single[0], torch.cat([e[[1]], tiles[0], e[[0]], e[[9]]]), rtol=0, atol=1e-6)
        pad = original_multimodal_forward(
            tower, projector, lm, [1, IMAGE_TOKEN_INDEX, 9, IMAGE_TOKEN_INDEX], images, mode="pad", layers=(1, 2, 3)
        )
        torch.testing.assert_close(pad[0], torch.cat([e[[1]], tiles[0], e[[9]], tiles[1]]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected 7 image tiles"):
        original_multimodal_forward(tower, projector, lm, [IMAGE_TOKEN_INDEX], images, mode="slice", grid=(2, 3))
