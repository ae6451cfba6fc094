"""Bad or unusual image input gives the right pixels or one clear error, never a wrong answer or a traceback.

Everything goes through the package's one loading path (`load_image` / `to_rgb_image`), used by the image
processor, the CLI, `LlavaDataset` and the digits example; the last tests check those callers end to end with the
shipped digits model on a 16-bit copy of its sample grid.
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenpacker_hf import TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker_hf.image_processing_tokenpacker import TokenPackerImageProcessor, load_image, to_rgb_image
from tokenpacker_hf.training import LlavaDataset

REPO = Path(__file__).resolve().parents[1]
DIGITS_MODEL = REPO / "examples" / "models" / "tokenpacker-digits"
SAMPLE_GRID = REPO / "examples" / "digits" / "sample_grid.png"
SAMPLE_DIGITS = "3168"
QUESTION = "Read the digits."

RNG = np.random.default_rng(16)
GRAY = RNG.integers(0, 256, (12, 20), dtype=np.uint8)  # [H, W]
COLOUR = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # [H, W, 3]
ALPHA = RNG.integers(0, 256, (12, 20), dtype=np.uint8)
OPAQUE = np.full((12, 20), 255, dtype=np.uint8)
SIZE = (20, 12)  # PIL's (width, height)


def pixel_values(image, image_mode: str = "slice") -> torch.Tensor:
    """What the processor makes of `image` (16 px tiles: a 2×3 grid plus thumbnail in slice mode)."""
    return TokenPackerImageProcessor(image_mode=image_mode, tile_size=16)(image)["pixel_values"]


def assert_same_pixels(image, reference: np.ndarray) -> None:
    """`image` loads as exactly the RGB pixels `reference` [H, W, 3] uint8, and both processor paths agree."""
    np.testing.assert_array_equal(np.asarray(to_rgb_image(image)), reference)
    for image_mode in ("slice", "pad"):
        torch.testing.assert_close(
            pixel_values(image, image_mode), pixel_values(Image.fromarray(reference), image_mode), rtol=0, atol=0
        )


def gray_rgb(gray: np.ndarray = GRAY) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def palette_rgb(image: Image.Image) -> np.ndarray:
    """The colours a palette image's indices point at, looked up in its palette (not through PIL's convert)."""
    palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
    return palette[np.asarray(image)[..., 0] if image.mode == "PA" else np.asarray(image)]


# ---------------------------------------------------------------------------------------------- every PIL mode


def sixteen_bit(byte_order: str) -> bytes:
    return (GRAY.astype(f"{byte_order}u2") * 257).tobytes()


PALETTED = Image.fromarray(COLOUR).quantize(64)

# mode -> (the image, the RGB pixels it must give). 16-bit images hold 257·v and must read exactly as v.
PIL_MODE_CASES = {
    "1": (lambda: Image.fromarray(GRAY > 127), lambda: gray_rgb(np.where(GRAY > 127, 255, 0).astype(np.uint8))),
    "L": (lambda: Image.fromarray(GRAY), gray_rgb),
    "LA": (lambda: Image.fromarray(np.stack([GRAY, ALPHA], -1), "LA"), gray_rgb),  # alpha dropped, as the original
    "La": (lambda: Image.fromarray(np.stack([GRAY, OPAQUE], -1), "LA").convert("La"), gray_rgb),
    "P": (lambda: PALETTED, lambda: palette_rgb(PALETTED)),
    "PA": (lambda: PALETTED.convert("PA"), lambda: palette_rgb(PALETTED)),
    "RGB": (lambda: Image.fromarray(COLOUR), lambda: COLOUR),
    "RGBA": (lambda: Image.fromarray(np.dstack([COLOUR, ALPHA]), "RGBA"), lambda: COLOUR),
    "RGBa": (lambda: Image.fromarray(np.dstack([COLOUR, OPAQUE]), "RGBA").convert("RGBa"), lambda: COLOUR),
    "RGBX": (lambda: Image.fromarray(COLOUR).convert("RGBX"), lambda: COLOUR),
    "I": (lambda: Image.fromarray(GRAY.astype(np.int32) * 257), gray_rgb),
    "I;16": (lambda: Image.fromarray(GRAY.astype(np.uint16) * 257), gray_rgb),
    "I;16L": (lambda: Image.frombytes("I;16L", SIZE, sixteen_bit("<")), gray_rgb),
    "I;16B": (lambda: Image.frombytes("I;16B", SIZE, sixteen_bit(">")), gray_rgb),
    "I;16N": (lambda: Image.frombytes("I;16N", SIZE, sixteen_bit("=")), gray_rgb),
    "F": (lambda: Image.fromarray(GRAY.astype(np.float32)), gray_rgb),  # PIL's 0..255 float scale
}


@pytest.mark.parametrize("mode", sorted(PIL_MODE_CASES))
def test_every_pil_mode_gives_the_right_rgb_pixels(mode):
    make_image, reference = PIL_MODE_CASES[mode]
    image = make_image()
    assert image.mode == mode
    assert_same_pixels(image, reference())


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV"])
def test_colour_spaces_are_converted_as_pil_defines_them(mode):
    image = Image.fromarray(COLOUR).convert(mode)
    assert_same_pixels(image, np.asarray(image.convert("RGB")))


def test_every_sixteen_bit_level_maps_to_the_nearest_eight_bit_level():
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.array([round(int(v) / 257) for v in levels.ravel()], dtype=np.uint8).reshape(256, 256)
    np.testing.assert_array_equal(np.asarray(load_image(levels)), expected)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(levels))), expected)


def test_mode_i_outside_sixteen_bits_is_refused():
    image = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))
    with pytest.raises(ValueError, match=r"expected pixel values in \[0, 65535\] for a mode 'I' image, found 70000"):
        load_image(image)


def test_float_image_is_rounded_not_truncated():
    image = Image.fromarray(np.array([[100.4, 100.6, 0.2, 254.7]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(load_image(image)), [[100, 101, 0, 255]])


@pytest.mark.parametrize("value, found", [(np.nan, "NaN or infinity"), (300.0, "found 300")])
def test_float_image_with_nan_or_off_the_scale_values_is_refused(value, found):
    values = np.full((3, 3), 50, dtype=np.float32)
    values[1, 1] = value
    with pytest.raises(ValueError, match=found):
        load_image(Image.fromarray(values))


# ---------------------------------------------------------------------------------------------------- files


def write_png_48_bit(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one): signature, IHDR, one zlib IDAT of filter-0 rows, IEND."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(signature + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_sixteen_bit_grayscale_png_and_tiff_files(tmp_path):
    for name in ("gray16.png", "gray16.tif"):
        Image.fromarray(GRAY.astype(np.uint16) * 257).save(tmp_path / name)
        assert_same_pixels(tmp_path / name, gray_rgb())


def test_sixteen_bit_rgb_png_file(tmp_path):
    write_png_48_bit(tmp_path / "rgb48.png", COLOUR.astype(np.uint16) * 257)
    assert_same_pixels(tmp_path / "rgb48.png", COLOUR)
    assert_same_pixels(str(tmp_path / "rgb48.png"), COLOUR)
    assert_same_pixels((tmp_path / "rgb48.png").read_bytes(), COLOUR)


# EXIF orientation k: how the stored pixels must be turned for display (the EXIF 2.3 definition, in numpy).
EXIF_TO_UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # 90° clockwise
    7: lambda a: np.rot90(a.transpose(1, 0, 2), 2),
    8: lambda a: np.rot90(a, 1),  # 90° counter-clockwise
}


def exif_jpeg(path: Path, orientation: int) -> np.ndarray:
    """Writes a 20×12 JPEG tagged with `orientation`; returns its decoded stored pixels `[12, 20, 3]`."""
    image = Image.fromarray(COLOUR)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as stored:
        return np.asarray(stored.convert("RGB"))


@pytest.mark.parametrize("orientation", sorted(EXIF_TO_UPRIGHT))
def test_exif_orientation_of_a_jpeg_is_applied(tmp_path, orientation):
    stored = exif_jpeg(tmp_path / "photo.jpg", orientation)
    upright = np.ascontiguousarray(EXIF_TO_UPRIGHT[orientation](stored))
    assert_same_pixels(tmp_path / "photo.jpg", upright)


def test_exif_orientation_of_an_opened_pil_image_is_applied(tmp_path):
    stored = exif_jpeg(tmp_path / "photo.jpg", 6)
    with Image.open(tmp_path / "photo.jpg") as image:  # not yet loaded, as a user would pass it
        np.testing.assert_array_equal(np.asarray(to_rgb_image(image)), np.rot90(stored, -1))


def test_missing_path_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(FileNotFoundError, match="nowhere.png") as raised:
        load_image(missing)
    assert raised.value.errno == errno.ENOENT and raised.value.filename == str(missing)
    with pytest.raises(FileNotFoundError):
        pixel_values(str(missing))


def test_directory_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected an image file, but '.*' is a directory"):
        load_image(tmp_path)


@pytest.mark.parametrize(
    "data, what",
    [(b"", "empty file"), (b"GIF89a not really", "bad header"), (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "bad PNG")],
)
def test_bytes_that_are_not_an_image_are_refused(tmp_path, data, what):
    (tmp_path / "image.png").write_bytes(data)
    with pytest.raises(ValueError, match=r"image.png' could not be decoded as an image"):
        load_image(tmp_path / "image.png")
    with pytest.raises(ValueError, match=rf"{len(data)} bytes could not be decoded as an image"):
        load_image(data)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_image_file_is_refused(tmp_path, image_format):
    buffer = io.BytesIO()
    Image.fromarray(COLOUR).save(buffer, image_format)
    path = tmp_path / f"cut.{image_format.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut\..*' could not be decoded as an image"):
        load_image(path)


def test_decompression_bomb_is_refused_naming_pixel_count_and_limit(tmp_path, monkeypatch):
    Image.fromarray(COLOUR).save(tmp_path / "bomb.png")  # 240 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice this: 200
    with pytest.raises(ValueError, match=r"bomb.png' is larger: .*240 pixels.* 200 pixels"):
        load_image(tmp_path / "bomb.png")


def test_image_between_one_and_two_bomb_limits_loads_with_pils_warning(tmp_path, monkeypatch):
    Image.fromarray(COLOUR).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    with pytest.warns(Image.DecompressionBombWarning):
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "large.png")), COLOUR)


@pytest.mark.parametrize("thing", [None, {"image": 1}, 3.5, object()])
def test_things_that_are_no_image_are_named(thing):
    with pytest.raises(ValueError, match=rf"expected an image as .* got {type(thing).__name__}"):
        load_image(thing)


# -------------------------------------------------------------------------------------------- arrays, tensors


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(lambda: COLOUR.astype(np.uint16) * 257, id="uint16"),
        pytest.param(lambda: COLOUR.astype(np.int64), id="int64"),
        pytest.param(lambda: np.asfortranarray(COLOUR), id="uint8-fortran-order"),
        pytest.param(lambda: COLOUR.astype(np.float32) / 255, id="float32"),
        pytest.param(lambda: COLOUR.astype(np.float64) / 255, id="float64"),
        pytest.param(lambda: (COLOUR / 255).astype(np.float16), id="float16"),
        pytest.param(lambda: torch.from_numpy(COLOUR.astype(np.uint16) * 257), id="torch-uint16"),
        pytest.param(lambda: torch.from_numpy(COLOUR).permute(2, 0, 1).long(), id="torch-int64-chw"),
        pytest.param(lambda: torch.from_numpy(COLOUR / 255).float().requires_grad_(), id="torch-float32-grad"),
        pytest.param(lambda: torch.from_numpy(COLOUR / 255).half(), id="torch-float16"),
    ],
)
def test_numeric_arrays_and_tensors_give_the_eight_bit_pixels(values):
    assert_same_pixels(values(), COLOUR)


def test_bfloat16_tensor_reads_like_its_float32_values():
    # bfloat16 holds only 8 significant bits: these levels are exact in it.
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).repeat(3, 4, 1)  # [3, 4, 5], channels first
    expected = np.array([0, 64, 128, 191, 255], dtype=np.uint8)  # round(255·x), halves to even
    image = load_image(levels.bfloat16())
    np.testing.assert_array_equal(np.asarray(image), np.broadcast_to(expected[None, :, None], (4, 5, 3)))
    torch.testing.assert_close(pixel_values(levels.bfloat16()), pixel_values(levels), rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda a: a, torch.from_numpy], ids=["numpy", "torch"])
def test_bool_masks_read_as_black_and_white(make):
    mask = GRAY > 127
    assert_same_pixels(make(mask), gray_rgb(np.where(mask, 255, 0).astype(np.uint8)))


def test_floats_within_half_a_level_of_the_range_are_accepted():
    values = np.array([[-0.4 / 255, 1 + 0.4 / 255, 0.5]])
    np.testing.assert_array_equal(np.asarray(load_image(values)), [[0, 255, 128]])


@pytest.mark.parametrize(
    "values, message",
    [
        (np.full((4, 4), np.nan), "expected finite pixel values, found NaN or infinity"),
        (np.full((4, 4), np.inf, dtype=np.float32), "expected finite pixel values, found NaN or infinity"),
        (torch.full((3, 4, 4), -np.inf), "expected finite pixel values, found NaN or infinity"),
        (np.array([[0.2, -0.1]]), r"expected pixel values in \[0, 1\] for .*float64, found -0.1"),
        (COLOUR.astype(np.float32), r"expected pixel values in \[0, 1\] for .*float32, found 2\d\d"),
        (np.array([[3, 300]], dtype=np.int16), r"in \[0, 255\] .*found 300 \(16-bit data must be uint16\)"),
        (np.array([[-1, 3]]), r"in \[0, 255\] .*found -1"),
        (np.ones((4, 4), dtype=np.complex64), "expected pixel values of a bool, integer or float dtype"),
        (np.full((4, 4), "a"), "expected pixel values of a bool, integer or float dtype"),
        (torch.ones(4, 4, dtype=torch.complex64), "expected real-valued pixels, got an array of shape"),
    ],
    ids=[
        "nan",
        "inf",
        "torch-minus-inf",
        "negative",
        "float-0-255",
        "int-above-255",
        "int-negative",
        "complex",
        "strings",
        "torch-complex",
    ],
)
def test_unusable_values_are_refused_naming_what_was_found(values, message):
    with pytest.raises(ValueError, match=message):
        load_image(values)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda: GRAY, id="HW"),
        pytest.param(lambda: GRAY[..., None], id="HW1"),
        pytest.param(lambda: GRAY[None], id="1HW"),
        pytest.param(lambda: torch.from_numpy(GRAY)[None], id="torch-1HW"),
    ],
)
def test_gray_layouts(layout):
    assert_same_pixels(layout(), gray_rgb())


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda: COLOUR, id="HWC"),
        pytest.param(lambda: np.ascontiguousarray(COLOUR.transpose(2, 0, 1)), id="CHW"),
        pytest.param(lambda: torch.from_numpy(COLOUR).permute(2, 0, 1), id="torch-CHW"),
        pytest.param(lambda: torch.from_numpy(COLOUR), id="torch-HWC"),
        pytest.param(lambda: np.dstack([COLOUR, ALPHA]), id="HWC-RGBA"),
        pytest.param(lambda: torch.from_numpy(np.dstack([COLOUR, ALPHA])).permute(2, 0, 1), id="torch-CHW-RGBA"),
    ],
)
def test_colour_layouts(layout):
    assert_same_pixels(layout(), COLOUR)


def test_ambiguous_small_shapes_follow_the_containers_convention():
    """[3, 4, 3] could be 3 rows of 4 RGB pixels or an RGB image of 4 rows and 3 columns: numpy arrays are read
    channels-last (PIL's and numpy's convention), torch tensors channels-first (torch's)."""
    values = RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    assert load_image(values).size == (4, 3)  # (width, height)
    np.testing.assert_array_equal(np.asarray(load_image(values)), values)
    from_torch = load_image(torch.from_numpy(values))
    assert from_torch.size == (3, 4)
    np.testing.assert_array_equal(np.asarray(from_torch), values.transpose(1, 2, 0))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((5, 6, 2), r"\(H, W\), \(H, W, C\) or \(C, H, W\) with C in 1/3/4, got an array of shape \(5, 6, 2\)"),
        ((5, 6, 7), r"got an array of shape \(5, 6, 7\)"),
        ((30,), r"got an array of shape \(30,\)"),
        ((1, 1, 3, 4, 4), r"got an array of shape \(1, 1, 3, 4, 4\)"),
        ((0, 5, 3), r"expected a non-empty image, got an array of shape \(0, 5, 3\)"),
        ((3, 0, 5), r"expected a non-empty image, got an array of shape \(3, 0, 5\)"),
    ],
)
def test_wrong_shapes_are_refused_naming_the_shape(shape, message):
    with pytest.raises(ValueError, match=message):
        pixel_values(np.zeros(shape, dtype=np.uint8))


# ------------------------------------------------------------- the callers: processor, CLI, dataset, digits example


@pytest.fixture(scope="module")
def sixteen_bit_grid(tmp_path_factory) -> Path:
    """The shipped sample grid (gray, stored as RGB) as a 16-bit grayscale PNG holding 257·v."""
    rgb = np.asarray(Image.open(SAMPLE_GRID))
    assert (rgb == rgb[..., :1]).all()
    gray = rgb[..., 0].astype(np.uint16)
    path = tmp_path_factory.mktemp("grid16") / "sample_grid_16bit.png"
    Image.fromarray(gray * 257).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # what PIL makes of a 16-bit PNG, by version
    return path


@pytest.fixture(scope="module")
def digits_model():
    return TokenPackerForConditionalGeneration.from_pretrained(DIGITS_MODEL).eval()


@pytest.fixture(scope="module")
def digits_processor():
    return TokenPackerProcessor.from_pretrained(DIGITS_MODEL)


def read_digits(model, processor, pixels: torch.Tensor) -> str:
    """The model's greedy answer to the training question for one image's `pixel_values`."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (32, 32))], text=prompt, return_tensors="pt")
    inputs["pixel_values"] = pixels
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def test_processor_reads_the_sixteen_bit_grid_like_the_eight_bit_one(sixteen_bit_grid, digits_processor):
    processor = digits_processor.image_processor
    torch.testing.assert_close(
        processor(sixteen_bit_grid)["pixel_values"], processor(SAMPLE_GRID)["pixel_values"], rtol=0, atol=0
    )


def test_cli_reads_the_sixteen_bit_grid(sixteen_bit_grid):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's console script first
    env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1"}
    command = ["tokenpacker-hf", "generate", "--model", str(DIGITS_MODEL), "--image", str(sixteen_bit_grid),
               "--prompt", QUESTION]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == SAMPLE_DIGITS


def test_dataset_reads_the_sixteen_bit_grid(tmp_path, sixteen_bit_grid, digits_model, digits_processor):
    record = {"image": sixteen_bit_grid.name, "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": SAMPLE_DIGITS}]}  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps([record]))
    dataset = LlavaDataset(tmp_path / "data.json", digits_processor, image_folder=sixteen_bit_grid.parent)
    pixels = dataset[0]["pixel_values"]
    expected = digits_processor.image_processor(SAMPLE_GRID)["pixel_values"]
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
    assert read_digits(digits_model, digits_processor, pixels) == SAMPLE_DIGITS


@pytest.fixture
def digits_train_script(monkeypatch):
    """examples/digits/train.py imported in this process, its sibling `make_data` import resolved."""
    monkeypatch.syspath_prepend(str(REPO / "examples" / "digits"))
    for name in ("train", "make_data"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("train")
    for name in ("train", "make_data"):
        sys.modules.pop(name, None)


def test_digits_example_evaluation_reads_the_sixteen_bit_grid(
    tmp_path, sixteen_bit_grid, digits_model, digits_processor, digits_train_script
):
    record = {"image": str(sixteen_bit_grid), "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": SAMPLE_DIGITS}]}  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps([record]))
    scores = digits_train_script.evaluate(digits_model, digits_processor, tmp_path / "test.json", limit=1)
    assert scores["digit_accuracy"] == 1.0 and scores["exact_match"] == 1.0
