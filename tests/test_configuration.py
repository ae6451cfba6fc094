import json

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, CLIPVisionConfig

from tokenpacker_hf import TokenPackerConfig

from tiny import tiny_config


def test_defaults_describe_the_released_7b_model():
    config = TokenPackerConfig()
    assert isinstance(config.vision_config, CLIPVisionConfig)
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1024, 24)
    assert config.text_config.model_type == "llama" and config.text_config.hidden_size == 4096
    assert config.patch_grid_size == 24
    assert config.num_image_tokens == 144
    assert config.region_feature_layers == [12, 16, 22, 23]
    assert config.projector_hidden_size == 1024 and config.projector_num_heads == 8
    assert config.image_token_id == config.image_token_index == 32000
    # The last CLIP layer (24) is never needed: -2 resolves to 23.
    assert config.vision_layers_needed == [12, 16, 22, 23]


@pytest.mark.parametrize("scale_factor, tokens", [(1, 576), (2, 144), (3, 64), (4, 36), (6, 16), (12, 4)])
def test_token_count_follows_scale_factor(scale_factor, tokens):
    assert TokenPackerConfig(scale_factor=scale_factor).num_image_tokens == tokens


@pytest.mark.parametrize("projector_type, tokens", [("mlp", 576), ("avg_pool", 64), ("pixel_shuffle", 64)])
def test_baseline_token_counts(projector_type, tokens):
    config = TokenPackerConfig(projector_type=projector_type, scale_factor=3)
    assert config.num_image_tokens == tokens
    # Baselines read only the query layer, so the tower stops there.
    assert config.vision_layers_needed == [23]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale_factor=5), r"scale_factor must divide the patch grid side 24.*\[1, 2, 3, 4, 6, 8, 12, 24\], got 5"),
        (dict(scale_factor=0), r"scale_factor must divide .* got 0"),
        (dict(projector_type="resampler"), r"projector_type must be one of .*'tokenpacker'.* got 'resampler'"),
        (dict(region_feature_layers=[12, 25]), r"region_feature_layers .* in \[-25, 24\], got \[12, 25\]"),
        (dict(region_feature_layers=[]), r"region_feature_layers must be a non-empty list"),
        (dict(vision_feature_layer=-26), r"vision_feature_layer .* \[-25, 24\], got -26"),
        (dict(projector_hidden_size=100, projector_num_heads=3), r"projector_hidden_size \(100\) .* \(3\)"),
    ],
)
def test_bad_config_fails_at_construction_naming_field_and_allowed_values(kwargs, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        TokenPackerConfig(**kwargs)


def test_wrong_field_type_is_rejected():
    with pytest.raises(Exception, match="scale_factor"):
        TokenPackerConfig(scale_factor="2")


def test_json_round_trip_keeps_every_field(tmp_path):
    config = tiny_config(scale_factor=4, region_feature_layers=[0, -1], projector_type="tokenpacker")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "tokenpacker"
    assert saved["auto_map"]["AutoModel"] == "modeling_tokenpacker.TokenPackerModel"
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is TokenPackerConfig
    for field in ("scale_factor", "region_feature_layers", "projector_hidden_size", "image_token_index"):
        assert getattr(reloaded, field) == getattr(config, field)
    assert reloaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert reloaded.text_config.hidden_size == config.text_config.hidden_size


def test_image_token_id_alias_and_tied_embeddings_forwarding():
    config = tiny_config(image_token_id=7, text={"tie_word_embeddings": True})
    assert config.image_token_index == 7
    assert config.tie_word_embeddings is True


def test_negative_layer_indices_resolve_like_hidden_states():
    config = tiny_config(vision_feature_layer=-1, region_feature_layers=[-5, 0, 2])
    # 4 encoder layers -> 5 hidden states; -1 is the last layer's output, -5 the embeddings.
    assert config.vision_layers_needed == [0, 2, 4]
