"""TokenPackerProcessor: the exact token layout of the original models, bad input,
save/load and remote code, and processor output driving the tiny model's `generate`."""

import json
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tokenpacker_hf.image_processing_tokenpacker import SLICE_GRIDS, TokenPackerImageProcessor
from tokenpacker_hf.processing_tokenpacker import VICUNA_V1_SYSTEM, TokenPackerProcessor, count_image_tokens

from builders import PROMPT, make_processor, noise_image
from subprocess_utils import run_without_package
from tiny import IMAGE_TOKEN_ID, make_tokenizer, tiny_config

T = 4  # tokens per tile of the tiny config (4×4 patch grid, s = 2)
COMMA, NEWLINE = 16, 3  # convert_tokens_to_ids(",") and the <unk> fallback of convert_tokens_to_ids("\n")


def text_ids(text: str) -> list[int]:
    return make_tokenizer()(text)["input_ids"]


def image_positions(ids: list[int]) -> int:
    """Positions an image occupies: image tokens plus slice separators (the tiny prompts hold no other ',' or
    <unk>)."""
    return sum(token in (IMAGE_TOKEN_ID, COMMA, NEWLINE) for token in ids)


# --------------------------------------------------------------------------------------------------- layout


def test_separators_come_from_convert_tokens_to_ids_like_the_original():
    processor = make_processor("slice")
    tokenizer = processor.tokenizer
    assert processor.separator_ids == (tokenizer.convert_tokens_to_ids(","), tokenizer.unk_token_id) == (COMMA, 3)
    assert processor.image_token_id == IMAGE_TOKEN_ID
    custom = make_processor("slice", tile_separator=7, row_separator="<s>")
    assert custom.separator_ids == (7, tokenizer.convert_tokens_to_ids("<s>"))


def test_pad_mode_replaces_the_placeholder_with_T_image_tokens():
    processor = make_processor("pad")
    out = processor(images=noise_image(30, 20), text=PROMPT)
    before, after = PROMPT.split("<image>")
    assert out["input_ids"] == [text_ids(before) + [IMAGE_TOKEN_ID] * T + text_ids(after)]
    assert out["attention_mask"] == [[1] * len(out["input_ids"][0])]
    assert out["pixel_values"].shape == (1, 3, 16, 16)
    assert out["image_grids"].tolist() == [[1, 1]]


def test_slice_mode_layout_of_a_2x3_grid():
    """The original's HD layout (README, "High resolution"): `t0 , t1 , t2 NL t3 , t4 , t5 NL t6(global) NL`,
    separators as single ids."""
    processor = make_processor("slice")
    out = processor(images=noise_image(48, 32), text=PROMPT)
    assert out["image_grids"].tolist() == [[2, 3]]
    tile = [IMAGE_TOKEN_ID] * T
    row = tile + [COMMA] + tile + [COMMA] + tile + [NEWLINE]
    before, after = PROMPT.split("<image>")
    assert out["input_ids"] == [text_ids(before) + row + row + tile + [NEWLINE] + text_ids(after)]
    assert out["pixel_values"].shape == (7, 3, 16, 16)


def test_call_time_options_override_the_settings():
    processor = make_processor("pad")
    out = processor(images=noise_image(48, 32), text="<image>", image_mode="slice", return_tensors="np")
    assert out["image_grids"].tolist() == [[2, 3]] and out["pixel_values"].shape == (7, 3, 16, 16)
    assert isinstance(out["input_ids"], np.ndarray) and out["input_ids"].shape == (1, count_image_tokens(2, 3, T))


def test_a_1x1_slice_ends_with_one_row_separator():
    out = make_processor("slice")(images=noise_image(16, 16), text="<image>")
    assert out["image_grids"].tolist() == [[1, 1]]
    assert out["input_ids"] == [[IMAGE_TOKEN_ID] * T + [NEWLINE]]


def test_separators_never_merge_with_neighbouring_text():
    processor = make_processor("slice", tile_separator=",", row_separator="a")
    out = processor(images=noise_image(32, 16), text="a<image>a")
    a = processor.tokenizer.convert_tokens_to_ids("a")
    tile = [IMAGE_TOKEN_ID] * T
    assert out["input_ids"] == [[a] + tile + [COMMA] + tile + [a] + tile + [a] + [a]]


@pytest.mark.parametrize("rows, cols, expected", [(1, 1, 145), (2, 2, 725), (2, 3, 1015), (3, 3, 1450), (4, 4, 2465)])
def test_token_count_of_the_released_hd_models(rows, cols, expected):
    """144 tokens per tile, each tile followed by one separator, plus the thumbnail and its separator when there is
    more than one tile."""
    assert count_image_tokens(rows, cols, 144) == expected
    assert count_image_tokens(rows, cols, 144, image_mode="pad") == 144


@settings(max_examples=25, deadline=None)
@given(
    size=st.one_of(
        st.tuples(st.integers(1, 8000), st.integers(1, 8000)),
        st.tuples(st.integers(1, 4), st.integers(1000, 8000)),  # extreme aspect ratios, both ways
        st.tuples(st.integers(1000, 8000), st.integers(1, 4)),
    ),
    max_slices=st.sampled_from([9, 16, 25]),
)
def test_token_count_property(size, max_slices):
    """For any size: the grid is a candidate, the count is T+1 or (n+1)(T+1), and equals both what
    `_get_num_multimodal_tokens` predicts and the positions the processor actually emits."""
    height, width = size
    processor = make_processor("slice")
    processor.image_processor.max_slices = max_slices
    out = processor(images=Image.new("L", (width, height), 128), text="<image>")
    rows, cols = out["image_grids"][0].tolist()
    assert (rows, cols) in SLICE_GRIDS[max_slices]
    n = rows * cols
    expected = T + 1 if n == 1 else (n + 1) * (T + 1)
    assert count_image_tokens(rows, cols, T) == expected
    assert len(out["input_ids"][0]) == image_positions(out["input_ids"][0]) == expected
    assert processor._get_num_multimodal_tokens([(height, width)]).num_image_tokens == [expected]
    assert out["pixel_values"].shape[0] == (1 if n == 1 else n + 1)


def test_num_multimodal_tokens_match_the_processor():
    sizes = [(32, 48), (16, 16), (64, 16)]
    for image_mode in ("pad", "slice"):
        processor = make_processor(image_mode)
        images = [noise_image(width, height) for height, width in sizes]
        out = processor(images=images, text=["<image>"] * 3, padding=True)
        data = processor._get_num_multimodal_tokens(sizes)
        assert data.num_image_tokens == [sum(m) for m in out["attention_mask"]]
        assert data.num_image_patches == [1 if r * c == 1 else r * c + 1 for r, c in out["image_grids"].tolist()]
        assert sum(data.num_image_patches) == out["pixel_values"].shape[0]


# ------------------------------------------------------------------------------------------ batches, padding


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_attention_mask_come_from_real_padding(side):
    # Row separator = pad id 0: a mask derived from `input_ids != pad_id` would hide the separators.
    processor = make_processor("slice", padding_side=side, row_separator=0)
    images = [noise_image(48, 32), noise_image(16, 16)]
    out = processor(images=images, text=["hi <image>", "<image> a longer question"], padding=True,
                    return_tensors="pt")  # fmt: skip
    lengths = [1 * 3 + count_image_tokens(2, 3, T), count_image_tokens(1, 1, T) + len(" a longer question")]
    assert out["input_ids"].shape == (2, max(lengths))
    assert out["attention_mask"].sum(dim=1).tolist() == lengths
    for row, (ids, mask) in enumerate(zip(out["input_ids"], out["attention_mask"], strict=True)):
        pad = max(lengths) - lengths[row]
        padded = slice(0, pad) if side == "left" else slice(lengths[row], None)
        assert (mask[padded] == 0).all() and (ids[padded] == 0).all()
        assert int(mask.sum()) == lengths[row]
    assert ((out["input_ids"] == 0) & (out["attention_mask"] == 1)).sum() == 3 + 1  # the separators stay visible
    padding_side_override = processor(images=images, text=["hi <image>", "<image> x"], padding=True,
                                      padding_side="right" if side == "left" else "left")  # fmt: skip
    assert padding_side_override["attention_mask"][1][0] == (1 if side == "left" else 0)


def test_padding_to_max_length_and_multiple():
    processor = make_processor("pad")
    out = processor(images=[noise_image(8, 8)], text=["<image> hi"], padding="max_length", max_length=20)
    assert len(out["input_ids"][0]) == 20 and sum(out["attention_mask"][0]) == T + 3
    out = processor(images=[noise_image(8, 8)], text=["<image> hi"], padding=True, pad_to_multiple_of=8)
    assert len(out["input_ids"][0]) == 8


def test_several_images_per_prompt_and_text_only_prompts():
    processor = make_processor("slice")
    images = [noise_image(48, 32, 1), noise_image(16, 16, 2), noise_image(16, 32, 3)]
    out = processor(images=[[images[0], images[1]], [], [images[2]]],
                    text=["<image> and <image>", "no image here", "<image>?"], padding=True)  # fmt: skip
    assert out["image_grids"].tolist() == [[2, 3], [1, 1], [2, 1]]
    assert out["pixel_values"].shape[0] == 7 + 1 + 3
    masks = out["attention_mask"]
    assert sum(masks[1]) == len("no image here")
    assert image_positions(out["input_ids"][0]) == count_image_tokens(2, 3, T) + count_image_tokens(1, 1, T)
    text_only = processor(text="just text", return_tensors="pt")
    assert set(text_only.keys()) == {"input_ids", "attention_mask"}
    assert text_only["input_ids"].tolist() == [text_ids("just text")]


# ------------------------------------------------------------------------------------------------ bad input


def test_image_count_mismatches_name_both_numbers():
    processor = make_processor("pad")
    with pytest.raises(ValueError, match=r"expected 2 images .* got 1 images"):
        processor(images=[noise_image(8, 8)], text="<image> <image>")
    with pytest.raises(ValueError, match=r"expected 1 images .* got 2 images"):
        processor(images=[noise_image(8, 8), noise_image(8, 8)], text="<image>")
    with pytest.raises(ValueError, match=r"hold 1 <image> tokens .* no images"):
        processor(text="<image>")
    with pytest.raises(ValueError, match=r"expected \[1, 0\] images per prompt .* got \[0, 1\]"):
        processor(images=[[], [noise_image(8, 8)]], text=["<image>", "text"])


def test_truncation_never_cuts_an_image():
    processor = make_processor("slice")
    image = noise_image(48, 32)  # 2×3 grid: 35 positions
    text = "<image> a long question after the image"
    with pytest.raises(ValueError, match=r"max_length=20 would cut the image tokens of prompt 0: it needs at least 35"):
        processor(images=image, text=text, truncation=True, max_length=20)
    kept = processor(images=image, text=text, truncation=True, max_length=40)
    assert len(kept["input_ids"][0]) == 40 and image_positions(kept["input_ids"][0]) == 35
    processor.tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match="needs at least 35"):
        processor(images=image, text="question first <image>", truncation=True, max_length=30)


def test_bad_images_are_reported(tmp_path):
    processor = make_processor("slice")
    with pytest.raises(ValueError, match="got size 0x0"):
        processor(images=Image.new("RGB", (0, 0)), text="<image>")
    not_an_image = tmp_path / "data.csv"
    not_an_image.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="data.csv' could not be decoded as an image"):
        processor(images=str(not_an_image), text="<image>")


def test_tokenizer_without_the_image_token_is_rejected():
    processor = make_processor("pad", image_token="<img>")
    with pytest.raises(ValueError, match="the tokenizer has no token '<img>'"):
        processor(text="<img> hi")


# --------------------------------------------------------------------------------------------- chat template


def test_chat_template_reproduces_vicuna_v1():
    processor = make_processor("pad")
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(question, add_generation_prompt=True)
    assert prompt == f"<s>{VICUNA_V1_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT:"
    # The original moves the image to the front of the first user turn, and closes answers with </s>.
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Describe it."}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Color?"}]},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        f"<s>{VICUNA_V1_SYSTEM} USER: <image>\nDescribe it. ASSISTANT: A cat.</s>USER: Color? ASSISTANT:"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system, add_generation_prompt=True) == "<s>Be brief. USER: Hi ASSISTANT:"


def test_chat_template_with_images_tokenizes_through_the_processor():
    processor = make_processor("slice")
    image = noise_image(48, 32)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = processor(images=image, text=f"<s>{VICUNA_V1_SYSTEM} USER: <image>\nHi ASSISTANT:")
    assert out["input_ids"] == expected["input_ids"]
    torch.testing.assert_close(out["pixel_values"], expected["pixel_values"])


# ---------------------------------------------------------------------------------------- save / load / remote


def save_remote_processor(processor: TokenPackerProcessor, folder) -> None:
    TokenPackerProcessor.register_for_auto_class()
    TokenPackerImageProcessor.register_for_auto_class()
    processor.save_pretrained(folder)


def test_save_and_load_round_trip(tmp_path):
    processor = make_processor("slice", row_separator=0)
    processor.image_processor.thumbnail_from = "image"
    save_remote_processor(processor, tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["num_image_tokens"] == T and saved["row_separator"] == 0 and saved["tile_separator"] == ","
    assert saved["auto_map"]["AutoProcessor"] == "processing_tokenpacker.TokenPackerProcessor"
    assert saved["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_tokenpacker.TokenPackerImageProcessor"
    )
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoProcessor"] == "processing_tokenpacker.TokenPackerProcessor"
    loaded = TokenPackerProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert (loaded.num_image_tokens, loaded.separator_ids) == (T, (COMMA, 0))
    image = noise_image(48, 32)
    expected, got = processor(images=image, text=PROMPT), loaded(images=image, text=PROMPT)
    assert got["input_ids"] == expected["input_ids"]
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"])


def test_remote_code_loads_without_the_package(tmp_path):
    processor = make_processor("slice")
    folder = tmp_path / "tiny_processor"
    save_remote_processor(processor, folder)
    image = noise_image(48, 32, seed=4)
    image.save(tmp_path / "image.png")
    code = textwrap.dedent(
        f"""
        import json
        from PIL import Image
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained("tiny_processor", trust_remote_code=True)
        out = processor(images=Image.open("image.png"), text={PROMPT!r})
        print(json.dumps({{"class": type(processor).__name__, "module": type(processor).__module__,
                           "input_ids": out["input_ids"], "grids": out["image_grids"].tolist(),
                           "pixel_sum": float(out["pixel_values"].double().sum())}}))
        """
    )
    result = run_without_package(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = processor(images=image, text=PROMPT)
    assert report["class"] == "TokenPackerProcessor" and report["module"].startswith("transformers_modules.")
    assert report["input_ids"] == expected["input_ids"]
    assert report["grids"] == expected["image_grids"].tolist()
    assert report["pixel_sum"] == pytest.approx(float(expected["pixel_values"].double().sum()), rel=1e-9)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def model():
    from tokenpacker_hf.modeling_tokenpacker import TokenPackerForConditionalGeneration

    torch.manual_seed(0)
    return TokenPackerForConditionalGeneration(tiny_config()).eval()


@pytest.mark.parametrize("image_mode", ["pad", "slice"])
def test_processor_output_drives_generate(model, image_mode):
    processor = make_processor(image_mode)
    images = [noise_image(48, 32, 1), noise_image(16, 40, 2)]
    inputs = processor(images=images, text=["<image> what?", "a <image> b"], padding=True, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)
    # Left padding: each prompt generates what it generates alone.
    for index, (image, text) in enumerate(zip(images, ["<image> what?", "a <image> b"], strict=True)):
        alone = processor(images=image, text=text, return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=4, do_sample=False)
        assert generated[index, -4:].tolist() == single[0, -4:].tolist()


def test_slice_batch_beam_search_and_several_return_sequences(model):
    processor = make_processor("slice")
    images = [noise_image(48, 32, 5), noise_image(16, 16, 6)]
    inputs = processor(images=images, text=["<image> hi", "<image> a longer one"], padding=True,
                       return_tensors="pt")  # fmt: skip
    assert inputs["image_grids"].tolist() == [[2, 3], [1, 1]]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, inputs["input_ids"].shape[1] + 3)
    alone = processor(images=images[1], text="<image> a longer one", return_tensors="pt")
    single = model.generate(**alone, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams[2:, -3:].tolist() == single[:, -3:].tolist()
