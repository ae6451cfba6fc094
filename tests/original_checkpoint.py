"""A synthetic original TokenPacker checkpoint, for the converter's tests: three modules the oracle runs as the
original code does (a CLIP tower, `OriginalTokenPacker` and a Llama LM) with non-trivial random weights, written in
the authors' exact layout (`LlavaLlamaForCausalLM` key names and shapes, `model.mm_projector.*` with the stacked
`clip_attn.in_proj_*`, `rotary_emb.inv_freq` buffers, an original `config.json`, `.bin` or safetensors shards with
their index, a tokenizer without `<image>`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights

from tokenpacker_hf.tiny import byte_level_backend

from reference.original_tokenpacker import (
    OriginalTokenPacker,
    original_feature_select,
    original_multimodal_forward,
    random_init_,
)

ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
# A tiny tower with CLIP-L's depth (the original reads layers 12, 16, 22, 23 and -2), 24 px tiles of 2 px patches:
# a 12x12 grid, divisible by s = 2, 3 and 4. Heads are 64 wide, as in OpenAI's CLIP (the converter infers them).
TINY_TOWER = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=24, num_attention_heads=1,
                  image_size=24, patch_size=2)  # fmt: skip
TINY_LM = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def llama_like_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with LLaMA's special ids (`<unk>` 0, `<s>` 1, `</s>` 2) and, like the released
    checkpoints, no `<image>` token; "\\n" is no token, so it maps to `<unk>` as in LLaMA's vocabulary."""
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_backend(["<unk>", "<s>", "</s>"]),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
    )  # fmt: skip


class Original:
    """The three modules of an original TokenPacker model, with non-trivial random weights, and the checkpoint
    folder they are written to in the authors' layout."""

    def __init__(self, tower: dict, lm: dict, scale_factor: int, seed: int = 0, vocab_size: int | None = None):
        """`vocab_size`: the LM's vocabulary when the folder will get another tokenizer than the byte-level one."""
        torch.manual_seed(seed)
        self.tokenizer = llama_like_tokenizer()
        with no_init_weights():  # random_init_ sets every parameter; the default init would only cost time
            self.tower = random_init_(CLIPVisionModel(CLIPVisionConfig(**tower)), seed).eval()
        self.llama_config = dict(
            vocab_size=vocab_size or len(self.tokenizer), hidden_act="silu", max_position_embeddings=512,
            initializer_range=0.02, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False, pretraining_tp=1, rope_scaling=None, use_cache=True, **lm,
        )  # fmt: skip
        with no_init_weights():
            self.lm = random_init_(LlamaForCausalLM(LlamaConfig(**self.llama_config)), seed + 1).eval()
        grid = tower["image_size"] // tower["patch_size"]
        self.projector = random_init_(
            OriginalTokenPacker(
                raw_grid=grid, embed_dim=tower["hidden_size"], num_heads=max(1, tower["hidden_size"] // 128),
                hidden_size=lm["hidden_size"], scale_factor=scale_factor, kv_dim=tower["hidden_size"], num_levels=4,
            ),
            seed + 2,
        ).eval()  # fmt: skip
        self.scale_factor = scale_factor

    def state_dict(self, with_tower: bool = True) -> dict[str, torch.Tensor]:
        """Original key names, including the persistent `inv_freq` buffers of transformers 4.31."""
        state = {key: t.clone() for key, t in self.lm.state_dict().items()}
        head_dim = self.llama_config["hidden_size"] // self.llama_config["num_attention_heads"]
        for layer in range(self.llama_config["num_hidden_layers"]):
            state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
                10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
            )
        state.update({"model.mm_projector." + k: t.clone() for k, t in self.projector.state_dict().items()})
        if with_tower:
            state.update({ORIGINAL_TOWER_PREFIX + k: t.clone() for k, t in self.tower.state_dict().items()})
        return state

    def config(self, **fields) -> dict:
        """An original `config.json`: Llama fields plus the `mm_*` fields `train.py` writes."""
        config = dict(
            architectures=["LlavaLlamaForCausalLM"], model_type="llava", torch_dtype="float32",
            transformers_version="4.31.0", mm_vision_tower="./clip-vit-large-patch14-336", mm_hidden_size=1024,
            mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_projector_type="tokenpacker",
            use_mm_proj=True, mm_use_im_start_end=False, mm_use_im_patch_token=False, tune_mm_mlp_adapter=False,
            freeze_mm_mlp_adapter=False, image_aspect_ratio="pad", scale_factor=self.scale_factor, **self.llama_config,
        )  # fmt: skip
        config.update(fields)
        return {key: value for key, value in config.items() if value is not None}

    def write(self, folder: Path, fmt: str = "bin", shards: int = 3, with_tower: bool = True,
              state: dict | None = None, **config_fields) -> Path:  # fmt: skip
        folder.mkdir(parents=True)
        write_shards(folder, state if state is not None else self.state_dict(with_tower), fmt, shards)
        (folder / "config.json").write_text(json.dumps(self.config(**config_fields), indent=2))
        self.tokenizer.save_pretrained(folder)
        return folder

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The original `encode_images`: full tower, `feature_select`, projector. `[tiles, T, D_text]`."""
        hidden_states = self.tower(pixel_values, output_hidden_states=True).hidden_states
        return self.projector(original_feature_select(hidden_states))

    def logits(self, input_ids: list[int], pixel_values: torch.Tensor, mode="pad", grid=(1, 1)) -> torch.Tensor:
        separators = tuple(self.tokenizer.convert_tokens_to_ids(t) for t in (",", "\n"))
        return original_multimodal_forward(
            self.tower, self.projector, self.lm, input_ids, pixel_values, mode=mode, grid=grid, separator_ids=separators
        )


def write_shards(folder: Path, state: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    """Consecutive key ranges in `shards` files, named and indexed as `save_pretrained` (4.31) does."""
    keys = list(state)
    size = -(-len(keys) // shards)
    suffix, stem = (".bin", "pytorch_model") if fmt == "bin" else (".safetensors", "model")
    weight_map = {}
    for index in range(shards):
        name = f"{stem}-{index + 1:05d}-of-{shards:05d}{suffix}"
        part = {key: state[key].contiguous() for key in keys[index * size : (index + 1) * size]}
        torch.save(part, folder / name) if fmt == "bin" else save_file(part, folder / name, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}  # fmt: skip
    (folder / f"{stem}{suffix}.index.json").write_text(json.dumps(index))
