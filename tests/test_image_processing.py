"""TokenPackerImageProcessor against the original TokenPacker(-HD) preprocessing (spec §3 and §4.4)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tiny import tiny_config
from tokenpacker_hf.image_processing_tokenpacker import (
    SLICE_GRIDS,
    TokenPackerImageProcessor,
    get_slice_grid,
    num_tiles,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Spec §3.2, verified by execution with the reference `Image_Patch`: (H, W) -> grid for max_slices 9 / 16 / 25.
GOLDEN_GRIDS = [
    ((224, 224), (1, 1), (1, 1), (1, 1)),
    ((336, 336), (1, 1), (1, 1), (1, 1)),
    ((400, 400), (2, 2), (2, 2), (2, 2)),
    ((480, 640), (2, 3), (3, 4), (3, 4)),
    ((640, 480), (3, 2), (4, 3), (4, 3)),
    ((720, 1280), (2, 4), (3, 5), (3, 5)),
    ((1080, 1920), (2, 4), (3, 5), (3, 5)),
    ((1008, 1008), (3, 3), (4, 4), (4, 4)),
    ((1344, 1344), (3, 3), (4, 4), (5, 5)),
    ((2200, 1700), (3, 2), (4, 3), (5, 4)),
    ((1000, 3000), (1, 3), (2, 6), (2, 6)),
    ((300, 1200), (1, 4), (1, 4), (1, 4)),
]


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def expand2square_reference(image: Image.Image, background: tuple) -> Image.Image:
    """LLaVA-1.5's `expand2square`, transcribed from the original `llava/mm_utils.py`."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def slice_reference(image: Image.Image, grid: tuple, block_size: int) -> torch.Tensor:
    """The `slice` branch of the original data loaders, transcribed loop for loop (ToTensor, Normalize,
    bilinear on the normalised tensor, top-left zero canvas, row-major tiles, thumbnail from the canvas)."""
    array = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    array = ((array - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]
    h, w = array.shape[-2:]
    h_block, w_block = grid
    h_ratio, w_ratio = block_size * h_block / h, block_size * w_block / w
    if h_ratio <= w_ratio:
        w_, h_ = min(block_size * w_block, round(w * h_ratio)), block_size * h_block
    else:
        w_, h_ = block_size * w_block, min(block_size * h_block, round(h * w_ratio))
    image_inter = F.interpolate(array, size=(h_, w_), mode="bilinear")
    canvas = torch.zeros((1, 3, block_size * h_block, block_size * w_block))
    canvas[:, :, :h_, :w_] = image_inter
    split = []
    for i in range(h_block):
        for j in range(w_block):
            split.append(canvas[:, :, block_size * i : block_size * (i + 1), block_size * j : block_size * (j + 1)])
    if len(split) > 1:
        h_ratio, w_ratio = block_size / h, block_size / w
        if h_ratio <= w_ratio:
            w_, h_ = min(block_size, round(w * h_ratio)), block_size
        else:
            w_, h_ = block_size, min(block_size, round(h * w_ratio))
        thumbnail = torch.zeros((1, 3, block_size, block_size))
        thumbnail[:, :, :h_, :w_] = F.interpolate(canvas, size=(h_, w_), mode="bilinear")
        split.append(thumbnail)
    return torch.cat(split, dim=0)


# ---------------------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize("size, grid9, grid16, grid25", GOLDEN_GRIDS)
def test_slice_grid_matches_the_golden_table(size, grid9, grid16, grid25):
    height, width = size
    assert get_slice_grid(height, width, max_slices=9) == grid9
    assert get_slice_grid(height, width, max_slices=16) == grid16
    assert get_slice_grid(height, width, max_slices=25) == grid25
    assert TokenPackerImageProcessor(image_mode="slice", max_slices=16).get_slice_grid(height, width) == grid16


def test_candidate_lists_are_the_originals():
    assert [len(SLICE_GRIDS[n]) for n in (9, 16, 25)] == [23, 36, 57]
    assert set(SLICE_GRIDS[9]) == {(a, b) for a in range(1, 10) for b in range(1, 10) if a * b <= 9}
    assert SLICE_GRIDS[16][:23] == SLICE_GRIDS[9] and SLICE_GRIDS[25][:36] == SLICE_GRIDS[16]
    assert SLICE_GRIDS[25].count((4, 6)) == 2 and SLICE_GRIDS[25].count((6, 4)) == 2
    assert not any(rows == 1 and cols >= 10 for rows, cols in SLICE_GRIDS[25])


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 8000),
    width=st.integers(1, 8000),
    max_slices=st.sampled_from([9, 16, 25]),
)
def test_slice_grid_is_always_a_candidate(height, width, max_slices):
    assert get_slice_grid(height, width, max_slices=max_slices) in SLICE_GRIDS[max_slices]


def test_bad_max_slices_and_sizes_are_rejected():
    with pytest.raises(ValueError, match=r"max_slices must be one of \[9, 16, 25\], got 12"):
        get_slice_grid(100, 100, max_slices=12)
    with pytest.raises(ValueError, match="height=0, width=5"):
        get_slice_grid(0, 5)
    with pytest.raises(ValueError, match="image_mode must be one of"):
        TokenPackerImageProcessor(image_mode="anyres")
    with pytest.raises(ValueError, match="thumbnail_from must be one of"):
        TokenPackerImageProcessor(thumbnail_from="global")


# ---------------------------------------------------------------------------------------------- pad / square


@pytest.mark.parametrize("size", [(640, 480), (333, 500), (16, 16), (7, 40)])
@pytest.mark.parametrize("tile", [16, 336])
def test_pad_mode_equals_clip_processor_on_the_padded_image(size, tile):
    image = noise_image(*size, seed=sum(size))
    ours = TokenPackerImageProcessor(image_mode="pad", tile_size=tile)(image)
    clip = CLIPImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile})
    padded = expand2square_reference(image, tuple(int(x * 255) for x in clip.image_mean))
    expected = torch.as_tensor(np.stack(clip(padded)["pixel_values"]))
    assert ours["pixel_values"].shape == (1, 3, tile, tile)
    torch.testing.assert_close(ours["pixel_values"], expected, rtol=0, atol=0)
    assert ours["image_grids"].tolist() == [[1, 1]]


def test_square_mode_is_plain_clip_preprocessing():
    image = noise_image(50, 30, seed=3)
    ours = TokenPackerImageProcessor(image_mode="square", tile_size=16)(image)["pixel_values"]
    clip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.testing.assert_close(ours, torch.as_tensor(np.stack(clip(image)["pixel_values"])), rtol=0, atol=0)


def test_pad_colour_follows_the_configured_mean():
    image = Image.new("RGB", (16, 4), (0, 0, 0))
    processor = TokenPackerImageProcessor(tile_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    pixels = processor(image)["pixel_values"][0]
    # int(0.5 * 255) = 127 -> (127/255 - 0.5) / 0.5 in the padding band above the image.
    assert torch.allclose(pixels[:, 0, :], torch.full((3, 16), (127 / 255 - 0.5) / 0.5))


# ---------------------------------------------------------------------------------------------------- slice


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (1200, 300), (37, 5)])
def test_slice_mode_matches_the_original_pipeline(size):
    width, height = size
    image = noise_image(width, height, seed=width)
    processor = TokenPackerImageProcessor(image_mode="slice", max_slices=9)
    out = processor(image)
    grid = get_slice_grid(height, width, max_slices=9)
    assert out["image_grids"].tolist() == [list(grid)]
    expected = slice_reference(image, grid, 336)
    assert out["pixel_values"].shape == (num_tiles(grid), 3, 336, 336)
    torch.testing.assert_close(out["pixel_values"], expected, rtol=0, atol=0)


def test_thumbnail_quirk_on_480x640():
    """Spec §3.4: 480×640 (pn 9) -> 2×3 canvas of 672×1008 holding a 672×896 image; the 252×336 thumbnail is
    made from the canvas, so its real content spans only ~299 of its 336 columns."""
    image = Image.new("RGB", (640, 480), (250, 20, 20))  # far from the mean: clearly non-zero when normalised
    tiles = TokenPackerImageProcessor(image_mode="slice")(image)["pixel_values"]
    assert tiles.shape[0] == 2 * 3 + 1
    thumbnail = tiles[-1]
    content_columns = (thumbnail[0, :252].abs() > 1e-3).all(dim=0)
    assert content_columns[:298].all() and not content_columns[300:].any()
    assert int(content_columns.sum()) in (298, 299)
    assert (thumbnail[:, 252:] == 0).all()  # below the 252-row box: the zero tile

    fixed = TokenPackerImageProcessor(image_mode="slice", thumbnail_from="image")(image)["pixel_values"][-1]
    assert (fixed[0, :252].abs() > 1e-3).all()  # the whole 252×336 box is image
    assert (fixed[:, 252:] == 0).all()
    torch.testing.assert_close(tiles[:-1], TokenPackerImageProcessor(image_mode="slice")(image)["pixel_values"][:-1])


def test_tiles_are_row_major_and_padding_is_bottom_right():
    # 2×3 grid of 16 px tiles; each tile region gets its own grey level so the order is visible.
    levels = np.array([[10, 60, 110], [160, 210, 250]], dtype=np.uint8)
    image = Image.fromarray(np.kron(levels, np.ones((16, 16), dtype=np.uint8)), mode="L")
    out = TokenPackerImageProcessor(image_mode="slice", tile_size=16)(image)
    assert out["image_grids"].tolist() == [[2, 3]]
    tile_means = out["pixel_values"][:6, 0].mean(dim=(1, 2))
    assert torch.all(tile_means[1:] > tile_means[:-1])  # row-major: increasing levels
    narrow = TokenPackerImageProcessor(image_mode="slice", tile_size=16)(Image.new("RGB", (40, 32), "white"))
    canvas_row = torch.cat(list(narrow["pixel_values"][:3]), dim=-1)  # grid (2, 3): first row of tiles
    assert narrow["image_grids"].tolist() == [[2, 3]]
    assert (canvas_row[:, :, 43:] == 0).all() and (canvas_row[:, :, :40] != 0).all()


def test_tile_size_follows_the_vision_config():
    processor = TokenPackerImageProcessor.from_vision_config(tiny_config().vision_config, image_mode="slice")
    out = processor([noise_image(40, 24), noise_image(8, 8)])
    assert processor.tile_size == 16
    assert out["pixel_values"].shape[1:] == (3, 16, 16)
    grids = [tuple(g) for g in out["image_grids"].tolist()]
    assert out["pixel_values"].shape[0] == sum(num_tiles(g) for g in grids)


def test_batch_layout_is_image_by_image():
    processor = TokenPackerImageProcessor(image_mode="slice", tile_size=16)
    first, second = noise_image(48, 32, seed=1), noise_image(16, 64, seed=2)
    together = processor([[first], [second]])
    alone = [processor(image)["pixel_values"] for image in (first, second)]
    assert together["image_grids"].tolist() == [[2, 3], [4, 1]]
    torch.testing.assert_close(together["pixel_values"], torch.cat(alone))


# ------------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "F"])
def test_any_pil_mode_is_converted_to_rgb(mode):
    image = noise_image(20, 12, seed=5).convert(mode) if mode != "I;16" else Image.fromarray(
        np.full((12, 20), 40000, dtype=np.uint16)
    )
    for image_mode in ("pad", "slice"):
        out = TokenPackerImageProcessor(image_mode=image_mode, tile_size=16)(image)
        assert out["pixel_values"].shape[1:] == (3, 16, 16)
        assert torch.isfinite(out["pixel_values"]).all()


def test_sixteen_bit_images_are_scaled_not_saturated():
    sixteen = Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16))
    eight = Image.new("RGB", (16, 16), (156, 156, 156))  # 40000 / 257 = 155.6
    processor = TokenPackerImageProcessor(image_mode="slice", tile_size=16)
    torch.testing.assert_close(processor(sixteen)["pixel_values"], processor(eight)["pixel_values"])


def test_numpy_and_torch_inputs_match_pil():
    image = noise_image(24, 16, seed=7)
    array = np.asarray(image)
    processor = TokenPackerImageProcessor(image_mode="slice", tile_size=16)
    expected = processor(image)["pixel_values"]
    for variant in (array, array.transpose(2, 0, 1), torch.from_numpy(array.transpose(2, 0, 1).copy()),
                    torch.from_numpy(array.transpose(2, 0, 1) / 255.0)):  # fmt: skip
        torch.testing.assert_close(processor(variant)["pixel_values"], expected)
    batch = processor(np.stack([array, array]))
    torch.testing.assert_close(batch["pixel_values"], torch.cat([expected, expected]))


def test_image_files_and_bytes_are_decoded(tmp_path):
    image = noise_image(20, 12, seed=9)
    path = tmp_path / "picture.png"
    image.save(path)
    processor = TokenPackerImageProcessor(image_mode="slice", tile_size=16)
    expected = processor(image)["pixel_values"]
    torch.testing.assert_close(processor(str(path))["pixel_values"], expected)
    torch.testing.assert_close(processor(path.read_bytes())["pixel_values"], expected)


def test_empty_images_and_non_images_raise(tmp_path):
    processor = TokenPackerImageProcessor(image_mode="slice", tile_size=16)
    with pytest.raises(ValueError, match="non-empty image, got size 0x0"):
        processor(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="non-empty image, got size 0x7"):
        processor(Image.new("RGB", (0, 7)))
    with pytest.raises(ValueError, match=r"non-empty image, got an array of shape \(0, 5, 3\)"):
        processor(np.zeros((0, 5, 3), dtype=np.uint8))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt' could not be decoded as an image"):
        processor(str(text_file))
    with pytest.raises(ValueError, match="12 bytes could not be decoded as an image"):
        processor(b"not an image")
    with pytest.raises(ValueError, match="expected an image .* got dict"):
        processor({"image": 1})
    with pytest.raises(ValueError, match="expected at least one image"):
        processor([])


def test_a_100_megapixel_image_is_processed_in_bounded_memory():
    """Without the PIL reduction a 10000×10000 image would become 1.2 GB of float32 (plus copies)."""
    code = textwrap.dedent(
        """
        import json, resource
        from PIL import Image
        from tokenpacker_hf.image_processing_tokenpacker import TokenPackerImageProcessor
        processor = TokenPackerImageProcessor(image_mode="slice", max_slices=9)
        processor(Image.new("RGB", (40, 30)))  # warm up torch's allocator and kernels
        image = Image.linear_gradient("L").resize((10000, 10000))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = processor(image)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"growth_mb": (after - before) / 1024, "shape": list(out["pixel_values"].shape),
                          "grid": out["image_grids"].tolist()}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["grid"] == [[3, 3]]
    assert report["shape"] == [10, 3, 336, 336]
    assert report["growth_mb"] < 400, report


def test_save_and_load_round_trip(tmp_path):
    processor = TokenPackerImageProcessor(
        image_mode="slice", max_slices=16, tile_size=16, thumbnail_from="image", image_mean=[0.5, 0.4, 0.3]
    )
    processor.save_pretrained(tmp_path)
    loaded = TokenPackerImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = noise_image(64, 20)
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])
