# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""Configuration of TokenPacker: a vision tower, the TokenPacker projector and a causal language model."""

from importlib.metadata import version
from typing import Literal

from packaging.version import Version  # a dependency of transformers itself

# The oldest transformers release these modules run on, the floor CI tests. It is checked before anything
# version-specific is imported, so an older install fails here with one line instead of deep inside transformers.
MIN_TRANSFORMERS_VERSION = "5.23.0"


def check_transformers_version(installed: str) -> None:
    """Raises ImportError naming `installed` and the required version when `installed` is below the floor."""
    if Version(installed) < Version(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"TokenPacker needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers {installed} is "
            f"installed; upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        )


check_transformers_version(version("transformers"))

from huggingface_hub.dataclasses import strict  # noqa: E402
from transformers import AutoConfig  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

PROJECTOR_TYPES = ("tokenpacker", "mlp", "avg_pool", "pixel_shuffle")

# Keys only the authors' LLaVA-format config.json has. Such a folder would otherwise load as the default config
# (its model_type "llava" merely earns a warning) and then as a model with random weights.
# What a vision tower's config needs for the patch grid and the layer indices.
VIT_CONFIG_FIELDS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers")

ORIGINAL_CONFIG_KEYS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")

# Saved into config.json so a folder loads with AutoModel as well as AutoModelForImageTextToText under
# trust_remote_code: save_pretrained alone records only the auto class of the object being saved.
AUTO_MAP = {
    "AutoConfig": "configuration_tokenpacker.TokenPackerConfig",
    "AutoModel": "modeling_tokenpacker.TokenPackerModel",
    "AutoModelForImageTextToText": "modeling_tokenpacker.TokenPackerForConditionalGeneration",
}


@strict
class TokenPackerConfig(PreTrainedConfig):
    r"""
    Configuration of [`TokenPackerForConditionalGeneration`]. The defaults give the released TokenPacker-7B:
    CLIP ViT-L/14-336 (24×24 patches of width 1024), a Llama/Vicuna-7B language model and a projector that
    packs 576 patches into 144 tokens (`scale_factor=2`).

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision tower config; a CLIP or SigLIP-style vision model (default CLIP ViT-L/14-336).
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Any causal language model config (default Llama).
        image_token_index (`int`, defaults to 32000):
            Id of the `<image>` placeholder token; alias `image_token_id`.
        vision_feature_layer (`int`, defaults to -2):
            Hidden state of the vision tower used for the point queries (and, for the baselines, as the only
            input). Index 0 is the embedding output, index i the output of encoder layer i; negatives count
            from the end, so -2 is the second-to-last layer's output.
        vision_feature_select_strategy (`str`, defaults to `"default"`):
            `"default"` drops the CLS token (CLIP), `"full"` keeps every token (towers without CLS, e.g. SigLIP).
        region_feature_layers (`list[int]`, defaults to `[12, 16, 22, 23]`):
            Hidden states concatenated on channels to form the region keys and values.
        scale_factor (`int`, defaults to 2):
            Side of the square region packed into one token: a G×G patch grid gives (G/s)² tokens per image.
            Must divide G.
        projector_type (`str`, defaults to `"tokenpacker"`):
            `"tokenpacker"`, or a baseline for comparisons: `"mlp"` (LLaVA-1.5, all tokens), `"avg_pool"`
            (s×s average pooling + MLP) or `"pixel_shuffle"` (space-to-depth + MLP).
        projector_hidden_size (`int`, *optional*):
            Width E of the projector's attention; defaults to the vision width.
        projector_num_heads (`int`, *optional*):
            Heads of the region-to-point attention; defaults to E/128 (at least 1).
        projector_layer_norm_eps (`float`, defaults to 1e-6):
            Epsilon of the point-query and region-key/value LayerNorms.
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation inside the projector MLPs (exact GELU, as in the original).
        initializer_range (`float`, defaults to 0.02):
            Std of the truncated-normal init of the projector's Linears.
        tie_word_embeddings (`bool`, defaults to `False`):
            Tie the LM head to the input embeddings (forwarded from `text_config` when it asks for it).

    Example:

    ```python
    >>> from tokenpacker_hf import TokenPackerConfig, TokenPackerForConditionalGeneration
    >>> config = TokenPackerConfig(scale_factor=3)          # 64 tokens per 336 px image
    >>> config.num_image_tokens
    64
    ```
    """

    model_type = "tokenpacker"
    attribute_map = {"image_token_id": "image_token_index"}

    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
                "hidden_act": "quick_gelu",
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    region_feature_layers: list[int] | None = None
    scale_factor: int = 2
    projector_type: str = "tokenpacker"
    projector_hidden_size: int | None = None
    projector_num_heads: int | None = None
    projector_layer_norm_eps: float = 1e-6
    projector_hidden_act: str = "gelu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    @classmethod
    def from_vision_text_configs(
        cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs
    ) -> "TokenPackerConfig":
        """The config of a new model made of a pretrained vision tower and a pretrained causal LM.

        `vision_config` may be a whole `CLIPConfig` / `SiglipConfig` (its vision half is taken) or a `*VisionConfig`
        of a ViT-style tower; `text_config` any causal LM's. Towers without a CLS token (SigLIP) default to the
        "full" select strategy. `kwargs` are further TokenPackerConfig fields; everything is validated here, before
        any weight is read.
        """
        vision_config = getattr(vision_config, "vision_config", vision_config)
        missing = [name for name in VIT_CONFIG_FIELDS if not hasattr(vision_config, name)]
        if missing:
            raise ValueError(
                f"expected a CLIP/SigLIP-style ViT vision tower, got model_type {vision_config.model_type!r}, "
                f"whose config has no {missing}"
            )
        if text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"expected a causal language model (a model type AutoModelForCausalLM knows), got model_type "
                f"{text_config.model_type!r}"
            )
        without_cls = vision_config.model_type.startswith("siglip")
        kwargs.setdefault("vision_feature_select_strategy", "full" if without_cls else "default")
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str, text_model_name_or_path: str, **kwargs
    ) -> "TokenPackerConfig":
        """[`from_vision_text_configs`] with the configs of two checkpoints (Hub ids or folders)."""
        return cls.from_vision_text_configs(
            AutoConfig.from_pretrained(vision_model_name_or_path),
            AutoConfig.from_pretrained(text_model_name_or_path),
            **kwargs,
        )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As `PreTrainedConfig.from_dict`, refusing the authors' unconverted LLaVA-format configs."""
        original = [key for key in ORIGINAL_CONFIG_KEYS if key in config_dict]
        if original:
            raise ValueError(
                f"expected a converted TokenPacker config (model_type 'tokenpacker'), got an original LLaVA-format "
                f"checkpoint config (model_type {config_dict.get('model_type')!r}, keys {original}); convert the "
                f"checkpoint first: tokenpacker-hf convert SRC DST"
            )
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.region_feature_layers is None:
            self.region_feature_layers = [12, 16, 22, 23]
        if self.projector_hidden_size is None:
            self.projector_hidden_size = self.vision_config.hidden_size
        if self.projector_num_heads is None:
            self.projector_num_heads = max(1, self.projector_hidden_size // 128)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        # The attribute lives on text_config for most LMs; forward it so tying really happens.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    # `@strict` runs every `validate_*` method after init, so bad configs fail before a model is built.
    def validate_projector(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        grid = self.patch_grid_size
        if self.scale_factor < 1 or grid % self.scale_factor != 0:
            divisors = [d for d in range(1, grid + 1) if grid % d == 0]
            raise ValueError(
                f"scale_factor must divide the patch grid side {grid} (image_size "
                f"{self.vision_config.image_size} / patch_size {self.vision_config.patch_size}); "
                f"allowed values: {divisors}, got {self.scale_factor}"
            )
        width, heads = self.projector_hidden_size, self.projector_num_heads
        if heads < 1 or width % heads != 0:
            raise ValueError(f"projector_hidden_size ({width}) must be divisible by projector_num_heads ({heads})")

    def validate_feature_layers(self):
        num_states = self.vision_config.num_hidden_layers + 1
        allowed = f"[{-num_states}, {num_states - 1}]"
        if not -num_states <= self.vision_feature_layer < num_states:
            raise ValueError(
                f"vision_feature_layer must index the vision tower's {num_states} hidden states, i.e. lie in "
                f"{allowed}, got {self.vision_feature_layer}"
            )
        bad = [i for i in self.region_feature_layers if not -num_states <= i < num_states]
        if bad or not self.region_feature_layers:
            raise ValueError(
                f"region_feature_layers must be a non-empty list of hidden-state indices in {allowed}, "
                f"got {self.region_feature_layers}"
            )

    @property
    def patch_grid_size(self) -> int:
        """Side G of the vision tower's square patch grid (24 for CLIP ViT-L/14-336)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens the projector emits per image tile: G² for `"mlp"`, (G/s)² otherwise."""
        grid = self.patch_grid_size
        if self.projector_type == "mlp":
            return grid * grid
        return (grid // self.scale_factor) ** 2

    def resolved_layer(self, index: int) -> int:
        """Turns a possibly negative hidden-state index into its position in `hidden_states` (0..num_layers)."""
        return index % (self.vision_config.num_hidden_layers + 1)

    @property
    def vision_layers_needed(self) -> list[int]:
        """Sorted hidden-state indices the projector reads; the tower never runs past the last one."""
        layers = {self.resolved_layer(self.vision_feature_layer)}
        if self.projector_type == "tokenpacker":
            layers.update(self.resolved_layer(i) for i in self.region_feature_layers)
        return sorted(layers)


__all__ = ["TokenPackerConfig", "PROJECTOR_TYPES"]
