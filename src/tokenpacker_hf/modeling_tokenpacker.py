# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""TokenPacker multimodal model: a vision tower, the TokenPacker projector and any causal language model,
following transformers' own LLaVA (v5) so `generate`, beam search, PEFT and the Trainer work unchanged."""

import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple, torch_compilable_check

from .configuration_tokenpacker import TokenPackerConfig
from .projector_tokenpacker import TokenPackerInProjection, build_projector

# The KV cache's name in outputs, language-model forwards and `generate`: transformers 5.24 renamed
# `past_key_values` to `cache`. Read off the installed output class, so a saved folder keeps working on both.
CACHE_NAME = "cache" if "cache" in {field.name for field in fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class TokenPackerModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `image_hidden_states`: the projected image features `[tokens, D_text]`."""

    image_hidden_states: torch.Tensor | None = None


@dataclass
class TokenPackerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `image_hidden_states`: the projected image features `[tokens, D_text]`."""

    image_hidden_states: torch.Tensor | None = None


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache passed under either name (`cache` from transformers 5.24 on, `past_key_values` before)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def left_padding_mask(input_ids: torch.LongTensor, pad_token_id: int) -> torch.LongTensor:
    """`[B, L]` mask that is 0 on each row's leading run of `pad_token_id` and 1 from its first other token on,
    so pad ids inside a prompt (HD row separators) stay visible."""
    return (input_ids != pad_token_id).cumsum(dim=-1).clamp(max=1)


def tiles_per_image(image_grids: torch.Tensor) -> list[int]:
    """Tiles the processor emits per image for `(rows, cols)` grids `[num_images, 2]`: rows·cols, plus the
    global thumbnail when there is more than one tile."""
    counts = image_grids.prod(dim=-1)
    return torch.where(counts > 1, counts + 1, counts).tolist()


def run_vision_tower(tower: nn.Module, pixel_values: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Runs a CLIP/SigLIP-style tower only up to the deepest layer in `layers`, keeping only those states.

    Index 0 is the embedding output (after CLIP's `pre_layrnorm`), index i the output of encoder layer i,
    as in `output_hidden_states`. `pixel_values [B, 3, H, W]` -> `{i: [B, N(+CLS), Dv]}`.
    """
    hidden = tower.embeddings(pixel_values)
    pre_norm = getattr(tower, "pre_layrnorm", None)
    if pre_norm is not None:
        hidden = pre_norm(hidden)
    kept = {0: hidden} if 0 in layers else {}
    for index, layer in enumerate(tower.encoder.layers[: max(layers)], start=1):
        hidden = layer(hidden, None)
        if index in layers:
            kept[index] = hidden
    return kept


def unsharded_class(module: nn.Module) -> type:
    """`module`'s own class: FSDP2's `fully_shard` swaps it for a generated `FSDP<Name>(FSDPModule, <Name>)`."""
    if not torch.distributed.is_available():
        return type(module)
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


class TokenPackerPreTrainedModel(PreTrainedModel):
    config: TokenPackerConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["TokenPackerProjector", "MLPProjector", "AvgPoolProjector", "PixelShuffleProjector"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        if isinstance(module, TokenPackerInProjection):
            # One third of `nn.MultiheadAttention`'s stacked [3E, E] in-projection: Xavier-uniform over its fan-out
            # of 3E, bias 0.
            bound = math.sqrt(6.0 / (module.in_features + 3 * module.out_features))
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, saving a model sharded by FSDP2 as its own class.

        transformers saves remote code from the model's class module, and `fully_shard`'s generated class lives
        in torch: the folder would get torch's `_fsdp_*.py` instead of this package's modules and an `auto_map`
        entry `_fsdp_init.FSDPTokenPackerForConditionalGeneration` that no load can resolve.
        """
        sharded_class = type(self)
        self.__class__ = unsharded_class(self)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class


class TokenPackerModel(TokenPackerPreTrainedModel):
    """Vision tower + projector + language model (without the LM head)."""

    def __init__(self, config: TokenPackerConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def _check_pixel_values(self, pixel_values: torch.Tensor):
        size = self.config.vision_config.image_size
        expected = (self.config.vision_config.num_channels, size, size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [tiles, {expected[0]}, {size}, {size}] for this vision tower, "
                f"got {list(pixel_values.shape)}"
            )

    def get_vision_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The projector's inputs from the vision tower, which runs only as deep as they need.

        Args:
            pixel_values: `[tiles, 3, H, W]`.
        Returns:
            `query_features [tiles, G*G, Dv]` (the `vision_feature_layer` state) and, for the tokenpacker
            projector, `region_features [tiles, G*G, L*Dv]` (the `region_feature_layers` states concatenated
            on channels), else None. CLS is dropped under the "default" select strategy.
        """
        self._check_pixel_values(pixel_values)
        config = self.config
        # A frozen tower needs no graph: this also defeats the input-grad hook that gradient checkpointing
        # puts on its patch embedding, which would otherwise keep and recompute all its activations.
        tower_trains = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            states = run_vision_tower(
                self.vision_tower, pixel_values.to(self.vision_tower.dtype), config.vision_layers_needed
            )
        first = 1 if config.vision_feature_select_strategy == "default" else 0
        query_features = states[config.resolved_layer(config.vision_feature_layer)][:, first:]
        if config.projector_type != "tokenpacker":
            return query_features, None
        region_levels = [states[config.resolved_layer(i)][:, first:] for i in config.region_feature_layers]
        return query_features, torch.cat(region_levels, dim=-1)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grids: torch.Tensor | list[torch.Tensor] | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Projected image features, one entry per image.

        Args:
            pixel_values: `[tiles, 3, H, W]`, all tiles of all images (one vision call).
            image_grids: `[num_images, 2]` slice grids `(rows, cols)`, or a list of `[2]` grids (the processor's
                form when asked for replacement offsets); an image with rows·cols > 1 owns rows·cols tiles plus
                its thumbnail. Without it every tile is its own image.
            return_dict: False gives the output's fields as a tuple (vLLM passes True).
        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is a list with one `[tokens_i, D_text]` tensor per
            image (tokens_i = tiles_i · T), and `last_hidden_state` the query features `[tiles, G*G, Dv]`.
        """
        query_features, region_features = self.get_vision_features(pixel_values)
        projected = self.multi_modal_projector(query_features, region_features)
        if isinstance(image_grids, (list, tuple)):
            image_grids = torch.stack([torch.as_tensor(grid) for grid in image_grids])
        if image_grids is None:
            per_image = list(projected)
        else:
            counts = tiles_per_image(image_grids)
            if sum(counts) != projected.shape[0]:
                raise ValueError(
                    f"image_grids {image_grids.tolist()} describe {sum(counts)} tiles, but pixel_values holds "
                    f"{projected.shape[0]}"
                )
            per_image = [tiles.flatten(0, 1) for tiles in torch.split(projected, counts)]
        return BaseModelOutputWithPooling(last_hidden_state=query_features, pooler_output=per_image)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """`[B, L, 1]` mask of the `<image>` positions; checks there is exactly one per image feature row."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        num_tokens, num_features = mask.sum(), image_features.shape[0]
        torch_compilable_check(
            num_tokens == num_features,
            lambda: (
                f"Image features and <image> tokens do not match: the text holds {int(num_tokens)} <image> "
                f"tokens but the images give {num_features} features ({self.config.num_image_tokens} per tile)"
            ),
        )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    def check_no_image_tokens(self, input_ids: torch.LongTensor | None):
        """Raises if `input_ids` holds `<image>` tokens: without images they would be read as an ordinary word.
        Only for a prompt's first pass, since a model may well generate the `<image>` id itself."""
        if input_ids is None:
            return
        num_tokens = (input_ids == self.config.image_token_id).sum()
        torch_compilable_check(
            num_tokens == 0,
            lambda: (
                f"expected pixel_values (or mm_encoder_outputs) for the {int(num_tokens)} <image> tokens in "
                f"input_ids, got none"
            ),
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_grids: torch.Tensor | list[torch.Tensor] | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> TokenPackerModelOutputWithPast:
        """Embeds the text, writes each image's features over its `<image>` positions, runs the LM.

        `input_ids [B, L]` (or `inputs_embeds [B, L, D_text]`), `pixel_values [tiles, 3, H, W]`,
        `image_grids [num_images, 2]` (or a list of `[2]` grids); `mm_encoder_outputs["image"]` may carry
        precomputed features (what `generate` passes after encoding the images once). The KV cache comes as
        `cache` or, as transformers before 5.24 names it, `past_key_values`; the output names it as the installed
        version does. `return_dict=False` gives the output's non-None fields as a tuple.
        """
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs, not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, image_grids=image_grids, return_dict=True)
        if image_outputs is None and cache is None:  # `generate` always passes a cache, and checks the prompt
            self.check_no_image_tokens(input_ids)
        image_features = None
        if image_outputs is not None:
            image_features = torch.cat(image_outputs.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return TokenPackerModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


class TokenPackerForConditionalGeneration(TokenPackerPreTrainedModel, GenerationMixin):
    """TokenPacker with a language-modelling head: image(s) + text in, text out."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: TokenPackerConfig):
        super().__init__(config)
        self.model = TokenPackerModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        processor=None,
        dtype: torch.dtype = torch.float32,
        **config_kwargs,
    ) -> "TokenPackerForConditionalGeneration":
        """A new TokenPacker model from a pretrained vision tower and a pretrained causal LM (the paper's stage 1
        starts here): their weights exactly as saved, a freshly initialised projector.

        Args:
            vision_model_name_or_path: a CLIP / SigLIP checkpoint (Hub id or folder): a whole `CLIPModel` /
                `SiglipModel` (only its vision half is read) or a `*VisionModel`.
            text_model_name_or_path: any `AutoModelForCausalLM` checkpoint; its LM head comes along, tied or
                untied as it was saved.
            processor: the [`TokenPackerProcessor`] from `TokenPackerProcessor.from_vision_text_pretrained` with
                the same arguments: its `<image>` id is used, and the embeddings grow to its tokenizer's length
                (new rows initialised as `resize_token_embeddings` does).
            dtype: of every weight, projector included.
            config_kwargs: `TokenPackerConfig` fields (`scale_factor`, `region_feature_layers`, ...), validated
                before any weight is read.
        """
        if processor is not None:
            config_kwargs.setdefault("image_token_index", processor.image_token_id)
        config = TokenPackerConfig.from_vision_text_pretrained(
            vision_model_name_or_path, text_model_name_or_path, **config_kwargs
        )
        if processor is not None and processor.num_image_tokens != config.num_image_tokens:
            raise ValueError(
                f"the processor expands <image> to {processor.num_image_tokens} tokens but this config packs "
                f"{config.num_image_tokens}; build both with the same arguments"
            )
        # The skeleton is built on the meta device and takes the loaded modules as they are: no weight is held twice.
        with torch.device("meta"):
            model = cls(config)
        tower_class = type(model.model.vision_tower)
        tower = tower_class.from_pretrained(vision_model_name_or_path, config=config.vision_config, dtype=dtype)
        language_model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, dtype=dtype)
        model.model.vision_tower = tower
        model.model.language_model = language_model.base_model
        model.lm_head = language_model.get_output_embeddings()
        model.model.multi_modal_projector = build_projector(config).to(dtype)
        model.model.multi_modal_projector.apply(model._init_weights)
        model.generation_config = language_model.generation_config
        if processor is not None:
            model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
            if len(processor.tokenizer) != config.text_config.vocab_size:
                model.resize_token_embeddings(len(processor.tokenizer))
        return model.eval()

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grids: torch.Tensor | list[torch.Tensor] | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """See [`TokenPackerModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, image_grids=image_grids, **kwargs)

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`; `<image>` tokens in the prompt need `pixel_values`, and without an
        `attention_mask` only left padding is masked.

        transformers would otherwise mask every pad id, but in TokenPacker-HD prompts the row separator is the
        LLaMA `<unk>` id, which is also the pad id: the separators inside a prompt would be hidden.
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if kwargs.get("pixel_values") is None and kwargs.get("mm_encoder_outputs") is None:
            self.model.check_no_image_tokens(input_ids)
        pad_token_id = kwargs.get("pad_token_id", (generation_config or self.generation_config).pad_token_id)
        if kwargs.get("attention_mask") is None and isinstance(input_ids, torch.Tensor) and pad_token_id is not None:
            kwargs["attention_mask"] = left_padding_mask(input_ids, pad_token_id)
        return super().generate(inputs, generation_config, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_grids: torch.Tensor | list[torch.Tensor] | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> TokenPackerCausalLMOutputWithPast:
        """As [`TokenPackerModel.forward`], then the LM head; `labels [B, L]` (-100 = ignored, as at image
        positions) give the shifted causal-LM loss. `logits_to_keep` limits logits to the last positions."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            image_grids=image_grids,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return TokenPackerCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


__all__ = [
    "TokenPackerPreTrainedModel",
    "TokenPackerModel",
    "TokenPackerForConditionalGeneration",
    "left_padding_mask",
    "resolve_cache",
    "run_vision_tower",
    "tiles_per_image",
]
