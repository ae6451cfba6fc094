"""Bad input to the model, the processor and the config: a correct result or one clear error, never a silently
wrong answer. (Images, the command line, the converter and data files have their own `test_bad_input_*` files.)"""

import json
import re

import pytest
import torch

from tokenpacker_hf import TokenPackerConfig, TokenPackerForConditionalGeneration
from tokenpacker_hf.modeling_tokenpacker import left_padding_mask
from tokenpacker_hf.processing_tokenpacker import TokenPackerProcessor

from builders import PROMPT, make_model, make_processor, noise_image, pixels, prompt
from tiny import IMAGE_TOKEN_ID, make_tokenizer

# --- HD prompts whose row separator is the pad id --------------------------------------------------------


def released_style_processor() -> TokenPackerProcessor:
    """Slice mode with the released HD models' tokenizer setting: pad = `<unk>` = the row separator."""
    processor = make_processor("slice")
    processor.tokenizer.pad_token = processor.tokenizer.unk_token
    return processor


def released_style_model() -> TokenPackerForConditionalGeneration:
    model = make_model(seed=3)
    model.generation_config.pad_token_id = make_tokenizer().unk_token_id
    return model


def test_hd_generate_without_attention_mask_keeps_the_row_separators_visible():
    processor, model = released_style_processor(), released_style_model()
    inputs = processor(images=[noise_image(40, 20)], text=PROMPT, return_tensors="pt")
    separator = processor.tokenizer.unk_token_id
    assert separator == model.generation_config.pad_token_id and (inputs["input_ids"] == separator).sum() >= 2
    assert inputs["attention_mask"].all()
    with_mask = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    inputs.pop("attention_mask")
    without_mask = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(without_mask, with_mask)


def test_hd_generate_without_mask_still_masks_left_padding():
    processor, model = released_style_processor(), released_style_model()
    texts = [PROMPT, "USER: <image>\nWhat is it, in a few more words than that? ASSISTANT:"]
    inputs = processor(images=[noise_image(40, 20), noise_image(20, 40)], text=texts, padding=True, return_tensors="pt")
    assert not inputs["attention_mask"][0].all()  # the first prompt is left-padded
    with_mask = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    mask = inputs.pop("attention_mask")
    assert torch.equal(left_padding_mask(inputs["input_ids"], model.generation_config.pad_token_id), mask)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), with_mask)


@pytest.mark.parametrize(
    "ids, expected",
    [
        ([[0, 0, 5, 0, 6]], [[0, 0, 1, 1, 1]]),
        ([[5, 0, 0, 6]], [[1, 1, 1, 1]]),
        ([[0, 0, 0]], [[0, 0, 0]]),
        ([[7, 8], [0, 8]], [[1, 1], [0, 1]]),
    ],
)
def test_left_padding_mask_hides_only_the_leading_pad_run(ids, expected):
    assert left_padding_mask(torch.tensor(ids), 0).tolist() == expected


# --- <image> tokens without images ---------------------------------------------------------------------


def test_forward_with_image_tokens_but_no_pixel_values_names_the_count():
    model = make_model()
    with pytest.raises(ValueError, match=r"expected pixel_values \(or mm_encoder_outputs\) for the 8 <image> tokens"):
        model(input_ids=torch.tensor([prompt(images=2)]))


def test_generate_with_image_tokens_but_no_pixel_values_names_the_count():
    model = make_model()
    with pytest.raises(ValueError, match="for the 4 <image> tokens in input_ids, got none"):
        model.generate(input_ids=torch.tensor([prompt()]), max_new_tokens=2)


def test_base_model_with_image_tokens_but_no_pixel_values_names_the_count():
    with pytest.raises(ValueError, match="for the 4 <image> tokens"):
        make_model().model(input_ids=torch.tensor([prompt()]))


def test_text_only_prompts_need_no_images():
    model = make_model()
    ids = torch.tensor([[1, 70, 71, 72]])
    assert model(input_ids=ids).logits.shape == (1, 4, model.config.text_config.vocab_size)
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_a_generated_image_id_does_not_stop_decoding():
    """With a cache, a step's single token may be the `<image>` id the model itself produced."""
    model = make_model()
    image_id = torch.tensor([IMAGE_TOKEN_ID])
    model.lm_head.register_forward_hook(lambda module, args, logits: logits.index_fill(-1, image_id, 1e4))
    out = model.generate(input_ids=torch.tensor([prompt()]), pixel_values=pixels(1), max_new_tokens=3, do_sample=False)
    assert out[0, -3:].tolist() == [IMAGE_TOKEN_ID] * 3


@pytest.mark.parametrize("images, extra", [(1, 1), (2, -1), (0, 1)])
def test_image_count_mismatch_between_tokens_and_pixels_names_both(images, extra):
    model = make_model()
    with pytest.raises(ValueError, match="do not match|expected pixel_values"):
        model(
            input_ids=torch.tensor([prompt(images=images)]),
            pixel_values=pixels(images + extra) if images + extra else None,
        )


# --- the processor -------------------------------------------------------------------------------------


def test_empty_prompt_list_is_refused():
    with pytest.raises(ValueError, match="expected at least one prompt, got an empty list of texts"):
        make_processor()(text=[])


@pytest.mark.parametrize("text, empty", [("", [0]), (["hi", ""], [1]), (["", ""], [0, 1])])
def test_prompts_without_tokens_are_named(text, empty):
    with pytest.raises(ValueError, match=re.escape(f"prompts {empty} give none")):
        make_processor()(text=text, return_tensors="pt")


def test_input_ids_are_integers_for_every_prompt_that_can_be_given():
    out = make_processor()(text="a", return_tensors="pt")
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long


@pytest.mark.parametrize("text", [None, 3, ["ok", 5], b"bytes"])
def test_text_of_the_wrong_type_is_named(text):
    with pytest.raises(ValueError, match="text must be a string or a list of strings|expected a prompt"):
        make_processor()(text=text)


# --- unconverted checkpoints ---------------------------------------------------------------------------

ORIGINAL_CONFIG = {
    "model_type": "llava",
    "architectures": ["LlavaLlamaForCausalLM"],
    "hidden_size": 4096,
    "vocab_size": 32000,
    "mm_vision_tower": "./clip-vit-large-patch14-336",
    "mm_projector_type": "tokenpacker",
    "mm_hidden_size": 1024,
    "mm_vision_select_layer": -2,
    "scale_factor": 2,
    "image_aspect_ratio": "pad",
}


@pytest.mark.parametrize("drop", [None, "mm_projector_type", "mm_vision_tower"])
def test_an_original_llava_format_folder_is_refused_with_the_convert_command(tmp_path, drop):
    config = {key: value for key, value in ORIGINAL_CONFIG.items() if key != drop}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="original LLaVA-format checkpoint config.*tokenpacker-hf convert SRC DST"):
        TokenPackerConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="original LLaVA-format"):
        TokenPackerForConditionalGeneration.from_pretrained(tmp_path)


def test_a_converted_folder_still_loads(tmp_path):
    make_model().save_pretrained(tmp_path)
    assert TokenPackerConfig.from_pretrained(tmp_path).scale_factor == 2
