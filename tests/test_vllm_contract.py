"""The contract of vLLM 0.33.0's Transformers modeling backend (`vllm serve DIR --model-impl transformers`),
replayed on CPU with the real processor and model.

vLLM cannot be installed here (CUDA wheels), so these tests repeat the calls its backend makes, in its order
and with its arguments, as read from the vLLM 0.33.0 source. The few lines of vLLM logic the checks need are
written out below as oracles, each naming the vLLM module and function it follows (paths inside the vLLM
package): `model_executor/models/transformers/multimodal.py` (the backend), `.../transformers/base.py`,
`multimodal/processing/context.py`, `multimodal/processing/processor.py`, `multimodal/processing/dummy_inputs.py`,
`multimodal/inputs.py`, `multimodal/utils.py`, `renderers/base.py` and `model_executor/models/utils.py`.
"""

import math
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModel, ByT5Tokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from tokenpacker_hf.image_processing_tokenpacker import SLICE_GRIDS, TokenPackerImageProcessor
from tokenpacker_hf.modeling_tokenpacker import TokenPackerForConditionalGeneration, TokenPackerModel
from tokenpacker_hf.processing_tokenpacker import TokenPackerProcessor, count_image_tokens, with_image_and_pad_tokens

import builders
from tiny import make_tokenizer, tiny_config

T = 4  # tokens per tile of the tiny config
TILE = 16  # its tile size


def make_processor(image_mode: str = "slice", tokenizer: Any = None, **kwargs) -> TokenPackerProcessor:
    """The shared tiny processor, in slice mode unless told otherwise: most of vLLM's contract is about HD."""
    return builders.make_processor(image_mode, tokenizer=tokenizer, **kwargs)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Images of grids 2×3, 1×1 and 2×1 in slice mode (sizes as PIL gives them: width, height).
IMAGES = {"wide": noise_image(48, 32, 1), "square": noise_image(16, 16, 2), "tall": noise_image(16, 32, 3)}
GRIDS = {"wide": (2, 3), "square": (1, 1), "tall": (2, 1)}
# Several requests: one image, two images of different grids (one 1×1), and the 1×1 image again.
REQUESTS = [
    ("USER: <image>\nWhat is it? ASSISTANT:", ["wide"]),
    ("USER: <image> and <image>\nCompare them. ASSISTANT:", ["square", "tall"]),
    ("<image> once more", ["square"]),
]


# ------------------------------------------------------------------------------------------ vLLM, written out


class ImageSize(NamedTuple):
    """vllm.multimodal.parse.ImageSize: width first."""

    width: int
    height: int


# model_executor/models/transformers/multimodal.py, module constants.
MAX_DUMMY_SIDE = 10_000
MIN_DUMMY_SIDE = 224
IMAGE_SIZE_KEY = "num_image_patches"  # _MODALITY_SIZE_KEYS["image"]


def vllm_num_image_tokens(processor: Any, size: ImageSize, mm_processor_kwargs: dict) -> int:
    """MultiModalProcessingInfo._get_num_image_tokens through _get_num_mm_tokens."""
    mm_tokens = processor._get_num_multimodal_tokens(image_sizes=([size.height, size.width],), **mm_processor_kwargs)
    return mm_tokens["num_image_tokens"][0]


def vllm_image_size_with_most_features(processor: Any, mm_processor_kwargs: dict) -> ImageSize:
    """MultiModalProcessingInfo.get_image_size_with_most_features: _get_size_candidates (divisors (1,)) on
    `image_processor.size`, then _get_size_with_most_tokens."""
    size = getattr(processor.image_processor, "size", None) or {}
    height = size.get("height", size.get("max_height"))
    width = size.get("width", size.get("max_width"))
    if height and width:
        candidates = [ImageSize(width=width, height=height)]
    elif max_pixels := size.get("max_pixels", size.get("longest_edge")):
        candidates = [ImageSize(width=side, height=side) for side in {math.isqrt(max_pixels)} if side]
    else:
        candidates = []

    def count(size: ImageSize) -> int:
        return vllm_num_image_tokens(processor, size, mm_processor_kwargs)

    sizes = [*candidates, ImageSize(width=MAX_DUMMY_SIDE, height=MAX_DUMMY_SIDE)]
    num_tokens = [count(size) for size in sizes]
    most_tokens = max(num_tokens)
    size = sizes[num_tokens.index(most_tokens)]
    while min(size.width, size.height) // 2 >= MIN_DUMMY_SIDE:
        smaller = ImageSize(width=size.width // 2, height=size.height // 2)
        if count(smaller) < most_tokens:
            break
        size = smaller
    return size


def vllm_dummy_text(processor: Any, num_images: int) -> str:
    """MultiModalDummyInputsBuilder.get_dummy_text, which MultiModalProcessor._get_hf_mm_text returns: the
    processor is called with this text, not the user's prompt."""
    image_token = getattr(processor, "image_token", "")
    start_token = getattr(processor, "image_start_token", "")
    end_token = getattr(processor, "image_end_token", "")
    return f"{start_token}{image_token}{end_token}" * num_images


def vllm_call_hf_processor(processor: Any, data: dict, kwargs: dict) -> BatchFeature:
    """InputProcessingContext.call_hf_processor (multimodal/processing/context.py): every kwarg reaches a
    `__call__` taking **kwargs, `return_tensors="pt"` unless given, any error re-raised as a ValueError, and the
    output rebuilt as a BatchFeature (floats cast to the model dtype: float32 here, so unchanged)."""
    allowed_kwargs = dict(kwargs)
    allowed_kwargs.setdefault("return_tensors", "pt")
    try:
        output = processor(**data, **allowed_kwargs)
    except Exception as exc:
        message = f"Failed to apply {type(processor).__name__} on data={data} with kwargs={allowed_kwargs}"
        raise ValueError(message) from exc
    assert isinstance(output, BatchFeature), "vLLM warns and guesses for a processor not returning BatchFeature"
    return BatchFeature(dict(output.data))


def vllm_apply_hf_processor_main(processor: Any, images: list[Image.Image], mm_processor_kwargs: dict) -> BatchFeature:
    """MultiModalProcessor._apply_hf_processor_main, with BaseMultiModalProcessor._get_hf_mm_inputs (dummy text,
    `truncation=False`) and _get_num_image_patches / _get_num_patches_per_image."""
    hf_kwargs = {"truncation": False, **mm_processor_kwargs}
    hf_data = {"images": images, "return_text_replacement_offsets": True}
    text = vllm_dummy_text(processor, len(images))
    hf_inputs = vllm_call_hf_processor(processor, dict(text=text, **hf_data), hf_kwargs)
    # _unpad_images only acts on an `image_sizes` field; ours has none, so pixel_values stay as they are.
    assert "image_sizes" not in hf_inputs
    hf_inputs.pop("mm_token_type_ids", None)
    hf_inputs.pop("token_type_ids", None)
    offsets = hf_inputs.pop("text_replacement_offsets", None)
    if offsets is None or len(offsets) == 0 or len(offsets[0]) == 0:
        raise AssertionError("vLLM raises: the processor returned no text replacement offsets")
    tokenizer = processor.tokenizer
    seqs = [tokenizer.encode(entry["replacement"], add_special_tokens=False) for entry in offsets[0]]  # cached_encode
    assert {entry["type"] for entry in offsets[0]} == {"image"}
    hf_inputs["image_replacement_ids"] = torch.tensor([token_id for seq in seqs for token_id in seq])
    hf_inputs["image_replacement_sizes"] = torch.tensor([len(seq) for seq in seqs])
    # _get_num_image_patches: no `image_grid_thw`, so the processor is asked per image (PIL height, width).
    sizes = [(image.height, image.width) for image in images]
    mm_tokens = processor._get_num_multimodal_tokens(image_sizes=sizes, **mm_processor_kwargs)
    num_patches = torch.tensor(mm_tokens[IMAGE_SIZE_KEY])
    rows = hf_inputs["pixel_values"].shape[vllm_slice_dim(hf_inputs["pixel_values"], int(num_patches.sum()))]
    assert rows == int(num_patches.sum()), "vLLM raises: the rows of image data cannot be attributed to images"
    hf_inputs[IMAGE_SIZE_KEY] = num_patches
    hf_inputs.pop("input_ids")
    return hf_inputs


def vllm_slice_dim(data: Any, total_rows: int) -> int:
    """MultiModalProcessor._get_slice_dim."""
    if not isinstance(data, torch.Tensor) or data.ndim < 2:
        return 0
    if data.shape[0] != total_rows and data.shape[1] == total_rows:
        return 1
    return 0


def vllm_mm_fields_config(hf_inputs: BatchFeature) -> dict[str, tuple]:
    """MultiModalProcessor._get_mm_fields_config and _get_field_config for images only: per key
    ("batched",) or ("flat", sizes, dim)."""
    hf_inputs.pop("attention_mask", None)
    sizes = hf_inputs[IMAGE_SIZE_KEY]
    own_keys = {IMAGE_SIZE_KEY, "num_video_tokens", "image_replacement_ids", "image_replacement_sizes",
                "image_grid_thw", "video_grid_thw", "second_per_grid_ts"}  # fmt: skip
    fields = {}
    for key in (key for key in hf_inputs if key not in own_keys):  # one modality owns every key
        data = hf_inputs[key]
        if isinstance(data, list):  # "Un-padded fields are already one entry per item"
            fields[key] = ("batched",)
        else:
            fields[key] = ("flat", sizes, vllm_slice_dim(data, int(sizes.sum())))
    fields[IMAGE_SIZE_KEY] = ("batched",)
    fields["image_replacement_ids"] = ("flat", hf_inputs["image_replacement_sizes"], 0)
    return fields


def vllm_items(hf_inputs: BatchFeature, fields: dict[str, tuple]) -> list[dict[str, Any]]:
    """MultiModalKwargsItems.from_hf_inputs with MultiModalBatchedField / MultiModalFlatField.build_elems
    (multimodal/inputs.py): one dict of fields per image; every field must give one element per image."""
    elems = {}
    for key, field in fields.items():
        data = hf_inputs[key]
        if field[0] == "batched":
            elems[key] = [item for item in data]
        else:
            _, sizes, dim = field
            bounds = [0, *np.cumsum(sizes.tolist())]
            elems[key] = [data[(slice(None),) * dim + (slice(bounds[i], bounds[i + 1]),)] for i in range(len(sizes))]
    counts = {key: len(value) for key, value in elems.items()}
    assert len(set(counts.values())) == 1, f"vLLM raises: Cannot merge different batch sizes, found {counts}"
    return [{key: value[index] for key, value in elems.items()} for index in range(next(iter(counts.values())))]


def vllm_prompt_replacements(items: list[dict[str, Any]]) -> list[tuple[list[int], int]]:
    """MultiModalProcessor._get_prompt_updates: pops each item's replacement ids (so the model never gets them)
    and picks its embedding token, the most frequent id (_get_embed_token_id)."""
    replacements = []
    for item in items:
        ids = item.pop("image_replacement_ids")
        replacements.append((ids.tolist(), int(ids.mode().values)))
    return replacements


def vllm_apply_prompt_updates(
    prompt_ids: list[int], target: list[int], replacements: list[tuple[list[int], int]]
) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
    """For one target of one token (the image token), apply_token_matches (multimodal/processing/processor.py)
    replaces its occurrences in order by item i's replacement; PromptUpdateDetails.select_token_id marks the
    positions holding embeddings. Returns the new ids and per item (offset, is_embed mask)."""
    assert len(target) == 1, "the image token must encode to one id"
    new_ids, placeholders, items = [], [], iter(replacements)
    for token_id in prompt_ids:
        if token_id != target[0]:
            new_ids.append(token_id)
            continue
        ids, embed_id = next(items)
        placeholders.append((len(new_ids), torch.tensor(ids) == embed_id))
        new_ids.extend(ids)
    assert next(items, None) is None, "vLLM raises: fewer placeholders than images"
    return new_ids, placeholders


def vllm_batch(items: list[dict[str, Any]], fields: dict[str, tuple]) -> dict[str, Any]:
    """group_and_batch_mm_items / _batch_mm_items (multimodal/utils.py) with MultiModalBatchedField._reduce_data
    (stack equal shapes, one item unsqueezed) and MultiModalFlatField._reduce_data (concatenate along dim)."""
    assert all(item.keys() == items[0].keys() for item in items), "items with different fields are not batched"
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if fields[key][0] == "batched":
            if len(values) == 1:
                batch[key] = values[0].unsqueeze(0)
            elif all(value.shape == values[0].shape for value in values):
                batch[key] = torch.stack(values)
            else:
                batch[key] = values
        else:
            batch[key] = torch.cat(values, dim=fields[key][2])
    return batch


def vllm_split_embeddings(embeddings: torch.Tensor, split_sizes: list[int]) -> list[torch.Tensor]:
    """MultiModalMixin._split_embeddings, without the padding/truncating branch, which vLLM calls untrustworthy
    outside of memory profiling (here it fails the test)."""
    if embeddings.ndim > 2:
        embeddings = embeddings.reshape(-1, embeddings.shape[-1])
    total_tokens, total_expected = embeddings.shape[0], sum(split_sizes)
    if total_tokens == total_expected:
        return list(torch.split(embeddings, split_sizes))
    assert total_expected > 0 and total_tokens % total_expected == 0, "vLLM would pad or truncate the embeddings"
    return list(torch.split(embeddings, [size * (total_tokens // total_expected) for size in split_sizes]))


def vllm_embed_multimodal(model: nn.Module, batch: dict[str, Any]) -> list[torch.Tensor]:
    """MultiModalMixin.embed_multimodal -> _process_image_input -> _process_vision_input -> _get_features."""
    kwargs = dict(batch)
    pixel_values = kwargs.pop("pixel_values")
    split_sizes = kwargs.pop(IMAGE_SIZE_KEY).flatten().tolist()
    assert isinstance(pixel_values, torch.Tensor), "a list would mean items of different shapes, encoded one by one"
    features = model.get_image_features(pixel_values, return_dict=True, **kwargs).pooler_output
    if isinstance(features, torch.Tensor):
        return vllm_split_embeddings(features, split_sizes)
    if len(features) == len(split_sizes):
        return list(features)
    return vllm_split_embeddings(torch.cat(list(features)), split_sizes)


def vllm_forward(
    model: nn.Module, prompt_ids: list[int], placeholders: list, embeddings: list[torch.Tensor]
) -> torch.Tensor:
    """The prompt's last hidden states `[L, D]` as vLLM computes them: embed_input_ids (Base), the image
    embeddings written at the embedding positions (_merge_multimodal_embeddings, model_executor/models/utils.py),
    then Base.forward's call of the Transformers model with a batch of one."""
    input_ids = torch.tensor(prompt_ids)
    inputs_embeds = model.get_input_embeddings()(input_ids)
    is_multimodal = torch.zeros(len(prompt_ids), dtype=torch.bool)
    for offset, is_embed in placeholders:
        is_multimodal[offset : offset + len(is_embed)] = is_embed
    inputs_embeds[is_multimodal] = torch.cat(embeddings).to(inputs_embeds.dtype)
    positions = torch.arange(len(prompt_ids))
    outputs = model(input_ids=None, inputs_embeds=inputs_embeds[None], use_cache=False, position_ids=positions[None],
                    return_dict=False)  # fmt: skip
    return outputs[0][0]


def vllm_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """How vLLM tokenizes a text prompt of a multimodal model: MultiModalProcessingInfo.get_default_tok_params
    (multimodal/processing/context.py) sets add_special_tokens=True, for completions and chat alike."""
    return tokenizer.encode(prompt, add_special_tokens=True)


@pytest.fixture(scope="module")
def model() -> TokenPackerModel:
    """Built as Base._create_model does: AutoModel.from_config(config, dtype=..., trust_remote_code=...)."""
    torch.manual_seed(0)
    return AutoModel.from_config(tiny_config(), dtype=torch.float32, trust_remote_code=True).eval()


# ------------------------------------------------------------------------------------------------ profiling


def test_image_processor_size_is_the_tile_size_and_survives_save_load_and_calls(tmp_path):
    processor = make_processor("slice")
    assert processor.image_processor.size == {"height": TILE, "width": TILE}
    assert processor.image_processor.to_dict()["size"] == {"height": TILE, "width": TILE}
    out = processor(images=IMAGES["wide"], text="<image>", size={"height": TILE, "width": TILE})
    assert tuple(out["pixel_values"].shape[-2:]) == (TILE, TILE)
    # A call's `size` reaches the image processor through the processor's images kwargs: it is checked, not ignored.
    with pytest.raises(ValueError, match=r"size must be \{'height': 16, 'width': 16\}"):
        processor(images=IMAGES["wide"], text="<image>", size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    loaded = TokenPackerProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.size == {"height": TILE, "width": TILE}
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    with pytest.raises(ValueError, match="set tile_size"):
        TokenPackerImageProcessor.from_pretrained(tmp_path, size={"height": 8, "width": 8})
    loaded.image_processor.tile_size = 32  # derived, so it follows
    assert loaded.image_processor.size == {"height": 32, "width": 32}


@pytest.mark.parametrize(
    "image_mode, mm_processor_kwargs",
    [
        ("pad", {}),
        ("slice", {}),
        ("slice", {"max_slices": 16}),
        ("pad", {"image_mode": "slice"}),
        ("slice", {"images_kwargs": {"max_slices": 25}}),
    ],
)
def test_profiling_finds_the_most_tokens_an_image_can_take(image_mode, mm_processor_kwargs):
    processor = make_processor(image_mode)
    size = vllm_image_size_with_most_features(processor, mm_processor_kwargs)
    most = vllm_num_image_tokens(processor, size, mm_processor_kwargs)
    options = {**mm_processor_kwargs, **mm_processor_kwargs.get("images_kwargs", {})}
    mode, max_slices = options.get("image_mode", image_mode), options.get("max_slices", 9)
    expected = T if mode != "slice" else max(count_image_tokens(r, c, T) for r, c in SLICE_GRIDS[max_slices])
    assert most == expected
    if mode == "pad":  # the candidate read off `size` wins the tie
        assert size == ImageSize(width=TILE, height=TILE)
    # MultiModalDummyInputsBuilder.get_dummy_mm_data -> BaseDummyInputsBuilder._get_dummy_images, processed as
    # the profiling run does: the dummy images really take that many positions.
    dummy = [Image.new("RGB", (size.width, size.height), color=255)] * 2
    hf_inputs = vllm_apply_hf_processor_main(processor, dummy, mm_processor_kwargs)
    assert hf_inputs["image_replacement_sizes"].tolist() == [most, most]


# --------------------------------------------------------------------------------------- processing, serving


@pytest.mark.parametrize("image_mode", ["pad", "slice"])
def test_serving_replay_gives_our_ids_and_our_hidden_states(model, image_mode):
    processor = make_processor(image_mode)
    tokenizer = processor.tokenizer
    target = tokenizer.encode(processor.image_token, add_special_tokens=False)  # _get_prompt_updates' target
    requests, all_items, fields_seen = [], [], None
    for prompt, names in REQUESTS:
        images = [IMAGES[name] for name in names]
        hf_inputs = vllm_apply_hf_processor_main(processor, images, {})
        fields = vllm_mm_fields_config(hf_inputs)
        assert set(fields) == {"pixel_values", "image_grids", IMAGE_SIZE_KEY, "image_replacement_ids"}
        assert fields["image_grids"] == ("batched",)  # one entry per image, never sliced by tiles
        items = vllm_items(hf_inputs, fields)
        grids = [GRIDS[name] if image_mode == "slice" else (1, 1) for name in names]
        for item, grid in zip(items, grids, strict=True):
            assert item["image_grids"].tolist() == list(grid)
            tiles = 1 if grid == (1, 1) else grid[0] * grid[1] + 1
            assert item["pixel_values"].shape[0] == int(item[IMAGE_SIZE_KEY]) == tiles
            assert item["image_replacement_ids"].tolist() == processor.image_token_layout(grid)
        replacements = vllm_prompt_replacements(items)
        assert {embed_id for _, embed_id in replacements} == {processor.image_token_id}
        prompt_ids, placeholders = vllm_apply_prompt_updates(vllm_prompt_ids(tokenizer, prompt), target, replacements)
        ours = processor(images=images, text=prompt, return_tensors="pt")
        assert prompt_ids == ours["input_ids"][0].tolist()
        requests.append((prompt_ids, placeholders, ours, len(items)))
        all_items += items
        fields_seen = fields

    # One encoder batch across the requests, as the model runner groups consecutive items.
    with torch.no_grad():
        embeddings = vllm_embed_multimodal(model, vllm_batch(all_items, fields_seen))
    assert len(embeddings) == len(all_items)
    start = 0
    for prompt_ids, placeholders, ours, count in requests:
        mine = embeddings[start : start + count]
        start += count
        with torch.no_grad():
            expected = model.get_image_features(ours["pixel_values"], image_grids=ours["image_grids"]).pooler_output
            for got, want, (_, is_embed) in zip(mine, expected, placeholders, strict=True):
                assert got.shape[0] == int(is_embed.sum())
                torch.testing.assert_close(got, want)
            served = vllm_forward(model, prompt_ids, placeholders, mine)
            own = model(**ours).last_hidden_state[0]
        torch.testing.assert_close(served, own)


def test_an_image_item_depends_on_that_image_only():
    """vLLM caches processed items by image hash and reuses them beside other images (see the docstring of
    MultiModalProcessor._unpad_images), so an item must not depend on its neighbours."""
    processor = make_processor("slice")
    alone = vllm_items(*_processed(processor, [IMAGES["tall"]]))[0]
    crowded = vllm_items(*_processed(processor, [IMAGES["wide"], IMAGES["square"], IMAGES["tall"]]))[2]
    assert alone.keys() == crowded.keys()
    for key in alone:
        assert torch.equal(alone[key], crowded[key]), key


def _processed(processor: TokenPackerProcessor, images: list[Image.Image]) -> tuple[BatchFeature, dict]:
    hf_inputs = vllm_apply_hf_processor_main(processor, images, {})
    return hf_inputs, vllm_mm_fields_config(hf_inputs)


def test_replacement_offsets_describe_the_expanded_ids():
    processor = make_processor("slice")
    prompts = ["USER: <image>\nHi <image>", "<image>!"]
    images = [[IMAGES["wide"], IMAGES["square"]], [IMAGES["tall"]]]
    out = processor(images=images, text=prompts, return_text_replacement_offsets=True, return_offsets_mapping=True,
                    padding=True, return_tensors="pt")  # fmt: skip
    assert isinstance(out["text_replacement_offsets"], list) and isinstance(out["image_grids"], list)
    assert [grid.tolist() for grid in out["image_grids"]] == [[2, 3], [1, 1], [2, 1]]
    grids = iter([(2, 3), (1, 1), (2, 1)])
    for prompt, entries, ids, offsets in zip(prompts, out["text_replacement_offsets"], out["input_ids"],
                                             out["offset_mapping"], strict=True):  # fmt: skip
        assert len(entries) == prompt.count("<image>")
        expanded, last = "", 0
        for entry in entries:
            begin, end = entry["span"]
            assert (entry["type"], entry["text"], prompt[begin:end]) == ("image", "<image>", "<image>")
            expanded += prompt[last:begin] + entry["replacement"]
            last = end
            assert expanded[entry["new_span"][0] : entry["new_span"][1]] == entry["replacement"]
        expanded += prompt[last:]
        for entry in entries:
            layout = processor.image_token_layout(next(grids))
            assert processor.tokenizer.encode(entry["replacement"], add_special_tokens=False) == layout
            new_begin, new_end = entry["new_span"]
            inside = [pos for pos, (b, e) in enumerate(offsets.tolist()) if new_begin <= b and e <= new_end and e > b]
            assert ids[inside].tolist() == layout


# ------------------------------------------------------------------------------- tokenizers and round trips


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("image_mode", ["pad", "slice"])
def test_replacements_round_trip_through_the_llama_tokenizer(llama_tokenizers, legacy, image_mode):
    processor = make_processor(image_mode, tokenizer=llama_tokenizers[legacy])
    images = [IMAGES["wide"], IMAGES["square"]]
    call = dict(images=images, text=vllm_dummy_text(processor, 2), return_text_replacement_offsets=True,
                truncation=False, return_tensors="pt")  # fmt: skip
    if legacy and image_mode == "slice":
        # SentencePiece with legacy=True reads "," after "<image>" as "▁,": no text gives the layout back.
        with pytest.raises(ValueError, match=r"instead of ',' .*legacy=False"):
            processor(**call)
        return
    out = processor(**call)
    grids = [(2, 3), (1, 1)] if image_mode == "slice" else [(1, 1), (1, 1)]
    for entry, grid in zip(out["text_replacement_offsets"][0], grids, strict=True):
        assert cached_encode(processor.tokenizer, entry["replacement"]) == processor.image_token_layout(grid)
    if image_mode == "slice":
        assert "<unk>" in out["text_replacement_offsets"][0][0]["replacement"]  # the LLaMA row separator, id 0


def cached_encode(tokenizer: Any, text: str) -> list[int]:
    """cached_encode (multimodal/processing/processor.py) without its cache, as _apply_hf_processor_main calls it."""
    return tokenizer.encode(text, truncation=None, add_special_tokens=False)


def test_vllm_tokenizes_text_after_an_image_differently_from_the_original(llama_tokenizers):
    """vLLM tokenizes the whole prompt with the tokenizer; the original (and `encode_prompt`) tokenised each chunk
    between images alone, so with SentencePiece the text after `<image>` starts with the dummy prefix `▁`. The
    ids vLLM serves then lack that piece: pass `prompt_token_ids` from `encode_prompt` to keep it."""
    processor = make_processor("pad", tokenizer=llama_tokenizers[False])
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    served = vllm_prompt_ids(processor.tokenizer, prompt)
    original = processor.encode_prompt(prompt)[0]
    at = original.index(processor.image_token_id)
    assert processor.tokenizer.convert_ids_to_tokens(original[at : at + 3]) == ["<image>", "▁", "<0x0A>"]
    assert served == original[: at + 1] + original[at + 2 :]
    # With the original's ids as prompt_token_ids, the replacement gives the processor's ids exactly.
    hf_inputs = vllm_apply_hf_processor_main(processor, [IMAGES["wide"]], {})
    replacements = vllm_prompt_replacements(vllm_items(hf_inputs, vllm_mm_fields_config(hf_inputs)))
    target = processor.tokenizer.encode(processor.image_token, add_special_tokens=False)
    expanded, _ = vllm_apply_prompt_updates(original, target, replacements)
    assert expanded == processor(images=IMAGES["wide"], text=prompt)["input_ids"][0]


# ---------------------------------------------------------------------------------------- offset mapping


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_offset_mapping_slices_the_expanded_text(padding_side):
    processor = make_processor("slice", tokenizer=make_tokenizer(padding_side))
    prompts = ["USER: <image>\nWhat is it? ASSISTANT:", "<image> and <image> differ"]
    images = [[IMAGES["wide"]], [IMAGES["square"], IMAGES["tall"]]]
    out = processor(images=images, text=prompts, return_text_replacement_offsets=True, return_offsets_mapping=True,
                    padding=True)  # fmt: skip
    assert any(0 in mask for mask in out["attention_mask"])  # a prompt is padded
    rows = zip(
        prompts, *(out[key] for key in ("text_replacement_offsets", "input_ids", "attention_mask", "offset_mapping")),
        strict=True,
    )  # fmt: skip
    for prompt, entries, ids, mask, offsets in rows:
        expanded = _expanded(prompt, entries)
        for token_id, real, (begin, end) in zip(ids, mask, offsets, strict=True):
            # Text bytes, `<image>`, `,` and `<unk>` alike: each token's span holds its own text.
            assert expanded[begin:end] == (processor.tokenizer.decode([token_id]) if real else "")
            if not real:
                assert (begin, end) == (0, 0)


def _expanded(prompt: str, entries: list[dict]) -> str:
    """The prompt with each placeholder replaced by its replacement, as `text_replacement_offsets` describe it."""
    text, last = "", 0
    for entry in entries:
        text += prompt[last : entry["span"][0]] + entry["replacement"]
        last = entry["span"][1]
    return text + prompt[last:]


def test_offset_mapping_stays_aligned_through_truncation():
    processor = make_processor("slice")
    prompt = "<image> a long question after the image"
    full = processor(images=IMAGES["wide"], text=prompt, return_offsets_mapping=True)
    cut = processor(images=IMAGES["wide"], text=prompt, return_offsets_mapping=True, truncation=True, max_length=40)
    assert len(cut["input_ids"][0]) == 40
    assert cut["offset_mapping"][0] == full["offset_mapping"][0][:40]
    processor.tokenizer.truncation_side = "left"
    left = processor(images=IMAGES["wide"], text="question first <image>", return_offsets_mapping=True,
                     truncation=True, max_length=36)  # fmt: skip
    whole = processor(images=IMAGES["wide"], text="question first <image>", return_offsets_mapping=True)
    assert left["offset_mapping"][0] == whole["offset_mapping"][0][-36:]


@pytest.mark.parametrize("tokenizer", ["tiny", "llama"])
def test_assistant_masks_cover_the_answers_after_images(model, llama_tokenizers, tokenizer):
    """ProcessorMixin.apply_chat_template(return_assistant_tokens_mask=True) asks for offset_mapping and
    text_replacement_offsets and maps the template's {% generation %} spans through them."""
    processor = make_processor("slice", tokenizer=make_tokenizer() if tokenizer == "tiny" else llama_tokenizers[False])
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %} {% else %}ASSISTANT: {% generation %}{{ m['content'][0]['text'] }}</s>{% endgeneration %}"
        "{% endif %}{% endfor %}"
    )
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": IMAGES["wide"]}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "image", "image": IMAGES["tall"]}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
    ]
    out = processor.apply_chat_template(conversation, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)  # fmt: skip
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    runs, previous = [], 0
    for token_id, masked in zip(ids, mask, strict=True):
        if masked and not previous:
            runs.append([])
        if masked:
            runs[-1].append(token_id)
        previous = masked
    assert [processor.tokenizer.decode(run).strip() for run in runs] == ["A cat.</s>", "A dog.</s>"]
    if tokenizer == "tiny":  # the tiny model's vocabulary is the tiny tokenizer's
        # The output, with its list-valued image_grids, drives the model.
        assert isinstance(out["image_grids"], list)
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), pixel_values=out["pixel_values"],
                           image_grids=out["image_grids"]).last_hidden_state  # fmt: skip
        assert hidden.shape[:2] == (1, len(ids))


# -------------------------------------------------------------------------------------------------- model


def test_model_exposes_what_the_backend_looks_up(model):
    """_ModelRegistry._try_resolve_transformers (model_executor/models/registry.py) and
    ModelConfig._get_transformers_backend_cls (config/model.py) pick the backend class; then Base/MultiModalMixin:
    _find_encoder_classes, _get_supported_modalities, get_decoder, _vocab_embeddings, get_mm_mapping, and the
    weight names of base_model_prefix "model"."""
    config = tiny_config()
    # The first "AutoModel..." entry of auto_map is the class the registry checks.
    first = next(module for name, module in config.auto_map.items() if name.startswith("AutoModel"))
    assert first == "modeling_tokenpacker.TokenPackerModel" and TokenPackerModel.is_backend_compatible()
    assert config.get_text_config() is not config  # a nested config: TransformersMultiModalForCausalLM
    encoder_classes = {}
    for modality in ("image", "video", "audio"):  # _MODALITY_TO_TOKEN_TYPE_ID
        try:
            encoder_cls = type(model.get_encoder(modality=modality))
        except (TypeError, ValueError):
            continue
        if encoder_cls is not type(model):
            encoder_classes[modality] = encoder_cls
    assert encoder_classes == {"image": type(model.vision_tower), "video": type(model.vision_tower)}
    processor = make_processor("pad")
    # MultiModalProcessingInfo._is_image_model / _is_video_model / _is_audio_model: only images are served,
    # so the video entry above never marks the tower.
    assert hasattr(processor, "image_processor") and not hasattr(processor, "video_processor")
    assert getattr(processor, "audio_processor", None) is None and getattr(processor, "feature_extractor", None) is None
    assert type(model.get_decoder()) is type(model.language_model)
    vocab_sizes = {model.config.text_config.vocab_size}
    embeddings = {module for module in model.get_input_embeddings().modules() if isinstance(module, nn.Embedding)}
    embeddings |= {m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings in vocab_sizes}
    assert embeddings == {model.language_model.embed_tokens}
    assert getattr(model, "language_model", None) is not None  # get_mm_mapping: "model.language_model"
    full = TokenPackerForConditionalGeneration(tiny_config())
    assert set(full.state_dict()) - {"lm_head.weight"} == {f"model.{key}" for key in model.state_dict()}


def test_the_language_model_dispatches_attention_to_vllm(monkeypatch):
    """Base._patch_config sets text_config._attn_implementation = "vllm" before the model is built; vLLM's
    AttentionFuser.validate then needs every text attention module's config to say "vllm" (vision modules must
    not), and the layers dispatch through the attention interface, one call per layer."""
    calls = []

    def vllm_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "vllm", vllm_attention)
    config = tiny_config()
    config.get_text_config()._attn_implementation = "vllm"
    torch.manual_seed(0)
    served = AutoModel.from_config(config, dtype=torch.float32, trust_remote_code=True).eval()
    torch.manual_seed(0)
    reference = AutoModel.from_config(tiny_config(), dtype=torch.float32, trust_remote_code=True).eval()
    reference.load_state_dict(served.state_dict())
    text_attention = [m for m in served.language_model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    assert [m.layer_idx for m in text_attention] == list(range(config.text_config.num_hidden_layers))
    assert all(m.config._attn_implementation == "vllm" for m in text_attention)
    assert all(getattr(m, "config", config.vision_config)._attn_implementation != "vllm"
               for m in served.vision_tower.modules())  # fmt: skip
    embeds = torch.randn(1, 9, config.text_config.hidden_size)
    with torch.no_grad():
        out = served(input_ids=None, inputs_embeds=embeds, use_cache=False, position_ids=torch.arange(9)[None],
                     return_dict=False)  # fmt: skip
        expected = reference(inputs_embeds=embeds).last_hidden_state
    assert calls == list(range(config.text_config.num_hidden_layers))
    torch.testing.assert_close(out[0], expected)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("image_mode", ["pad", "slice"])
def test_image_count_mismatches_name_both_numbers_on_the_serving_path(image_mode):
    processor = make_processor(image_mode)
    serving = dict(return_text_replacement_offsets=True, return_offsets_mapping=True, truncation=False)
    with pytest.raises(ValueError, match=r"expected 2 images .* got 1 images"):
        processor(images=[IMAGES["wide"]], text="<image><image>", return_tensors="pt", **serving)
    with pytest.raises(ValueError, match=r"expected 1 images .* got 2 images"):
        processor(images=[IMAGES["wide"], IMAGES["tall"]], text="<image>", return_tensors="pt", **serving)
    with pytest.raises(ValueError, match=r"Failed to apply TokenPackerProcessor") as raised:
        vllm_call_hf_processor(processor, {"text": "<image>", "images": [IMAGES["wide"]] * 3,
                                           "return_text_replacement_offsets": True}, {"truncation": False})  # fmt: skip
    assert "expected 1 images" in str(raised.value.__cause__) and "got 3 images" in str(raised.value.__cause__)


def test_offsets_need_a_fast_tokenizer():
    tokenizer = with_image_and_pad_tokens(ByT5Tokenizer())
    processor = TokenPackerProcessor.from_config(
        tiny_config(image_token_index=tokenizer.convert_tokens_to_ids("<image>")),
        image_processor=TokenPackerImageProcessor(tile_size=TILE),
        tokenizer=tokenizer,
    )
    out = processor(images=IMAGES["wide"], text="a <image>", return_text_replacement_offsets=True)
    assert out["text_replacement_offsets"][0][0]["replacement"] == "<image>" * T
    with pytest.raises(ValueError, match="return_offsets_mapping needs character offsets, i.e. a fast tokenizer"):
        processor(images=IMAGES["wide"], text="a <image>", return_offsets_mapping=True)
