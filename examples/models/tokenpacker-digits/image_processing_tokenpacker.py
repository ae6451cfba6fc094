# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""Image processor of TokenPacker: the normal-resolution `pad` / `square` paths and the TokenPacker-HD
`slice` path (dynamic grid, top-left padded canvas, row-major tiles and a global thumbnail).

Everything here follows the original code (CircleRadon/TokenPacker, `llava/patch_divide.py` and the `slice`
branch of its data loaders).
"""

import io
import os
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

# Imported first for its transformers version check: a processor loaded alone through remote code gets it too.
from .configuration_tokenpacker import MIN_TRANSFORMERS_VERSION  # noqa: F401, I001
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import center_crop, get_resize_output_image_size, normalize, rescale, resize
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs

IMAGE_MODES = ("pad", "square", "slice")
THUMBNAIL_SOURCES = ("canvas", "image")

# Candidate grids (rows, cols) of the original, verbatim: the order decides ties (first maximum wins) and the
# 25-list really holds (4, 6), (6, 4) twice.
_GRIDS_9 = [
    (1, 1),
    (1, 2), (2, 1),
    (1, 3), (3, 1),
    (2, 2), (1, 4), (4, 1),
    (1, 5), (5, 1),
    (1, 6), (6, 1), (2, 3), (3, 2),
    (1, 7), (7, 1),
    (4, 2), (2, 4), (1, 8), (8, 1),
    (3, 3), (1, 9), (9, 1),
]  # fmt: skip
_GRIDS_16 = _GRIDS_9 + [
    (2, 5), (5, 2),
    (2, 6), (6, 2), (3, 4), (4, 3),
    (2, 7), (7, 2),
    (3, 5), (5, 3),
    (2, 8), (8, 2), (4, 4),
]  # fmt: skip
_GRIDS_25 = _GRIDS_16 + [
    (3, 6), (6, 3), (2, 9), (9, 2),
    (4, 5), (5, 4), (2, 10), (10, 2),
    (3, 7), (7, 3),
    (11, 2), (2, 11),
    (4, 6), (6, 4), (12, 2), (2, 12), (3, 8), (8, 3), (4, 6), (6, 4),
    (5, 5),
]  # fmt: skip
SLICE_GRIDS: dict[int, list[tuple[int, int]]] = {9: _GRIDS_9, 16: _GRIDS_16, 25: _GRIDS_25}

# The original scores canvases against the image box scaled by 1.4 (in its code, not in the paper's Eq. 3),
# with the overlap term weighted by beta = 0.1 and an IoU epsilon of 1e-5.
SLICE_OVERLAP_SCALE = 1.4
SLICE_BETA = 0.1
_IOU_EPS = 1e-5

# A source image is reduced (box filter, integer factor) only while it stays at least this many times larger than
# its resize target, so huge inputs never become a full-resolution float tensor.
_MAX_SOURCE_OVERSAMPLING = 2

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F")


class TokenPackerImagesKwargs(ImagesKwargs, total=False):
    """Call-time options of [`TokenPackerImageProcessor`] (all default to the instance's settings)."""

    image_mode: Literal["pad", "square", "slice"] | None
    max_slices: int | None
    tile_size: int | None
    thumbnail_from: Literal["canvas", "image"] | None


def get_slice_grid(height: int, width: int, max_slices: int = 9, tile_size: int = 336) -> tuple[int, int]:
    """Grid (rows, cols) of `tile_size` tiles chosen by TokenPacker-HD for a `height`×`width` image.

    Score per candidate (a, b), in float32 torch exactly as the original `Image_Patch.calculate`:
    coverage of the a·r × b·r canvas by the aspect-preserving resize (sides rounded half-to-even) plus
    0.1 × IoU(canvas, 1.4 × image box); the first maximum of the verbatim candidate list wins.
    """
    if max_slices not in SLICE_GRIDS:
        raise ValueError(f"max_slices must be one of {sorted(SLICE_GRIDS)}, got {max_slices}")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got height={height}, width={width}")
    grids = SLICE_GRIDS[max_slices]
    canvases = torch.tensor([[0, 0, rows * tile_size, cols * tile_size] for rows, cols in grids])  # [K, 4] int64
    canvas_areas = (canvases[:, 2] - canvases[:, 0]) * (canvases[:, 3] - canvases[:, 1])
    image_box = torch.tensor([[0, 0, height, width]])  # [1, 4] int64
    ratio = (canvases[:, 2:] / image_box[:, 2:]).min(dim=-1).values  # int64 / int64 -> float32
    coverage = torch.round(height * ratio) * torch.round(width * ratio) / canvas_areas
    target_box = image_box * SLICE_OVERLAP_SCALE  # float32
    target_area = (target_box[:, 2] - target_box[:, 0]) * (target_box[:, 3] - target_box[:, 1])
    top_left = torch.max(canvases[:, None, :2], target_box[:, :2])
    bottom_right = torch.min(canvases[:, None, 2:], target_box[:, 2:])
    overlap_hw = (bottom_right - top_left).clamp(min=0)
    intersection = overlap_hw[:, :, 0] * overlap_hw[:, :, 1]
    union = canvas_areas[:, None] + target_area - intersection
    iou = (intersection / (union + _IOU_EPS))[:, 0]
    score = coverage + iou * SLICE_BETA
    return grids[int(torch.argmax(score))]


def fit_size(height: int, width: int, box_height: int, box_width: int) -> tuple[int, int]:
    """Aspect-preserving size of a `height`×`width` image fitted into a `box_height`×`box_width` box.

    The side that limits the scale fills the box; the other is `round()`ed (Python, half-to-even) and
    clipped to the box, as in the original. Never 0: the original crashes on such extreme aspect ratios
    (e.g. 1×8000), here the thin side keeps 1 pixel.
    """
    height_ratio, width_ratio = box_height / height, box_width / width
    if height_ratio <= width_ratio:
        return box_height, max(1, min(box_width, round(width * height_ratio)))
    return max(1, min(box_height, round(height * width_ratio))), box_width


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pastes `image` centred on a square of colour `background` (LLaVA-1.5's `pad` aspect ratio)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def load_image(image: Any) -> Image.Image:
    """Any supported input as a non-empty PIL image (its mode kept, except 16-bit images which become "L").

    Accepts PIL images of any mode, file paths, raw file bytes, numpy arrays and torch tensors (H×W, H×W×C
    or C×H×W with C in 1/3/4; uint8 in [0, 255] or floats in [0, 1]). 16-bit images are scaled to 8 bit
    (PIL's own conversion to RGB, which the original uses, would saturate them to white).
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = _open_image_file(image)
    elif isinstance(image, torch.Tensor):
        image = _array_to_image(image.detach().cpu().numpy())
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(
            f"expected an image as a PIL image, numpy array, torch tensor, file path or file bytes, "
            f"got {type(image).__name__}"
        )
    if image.width < 1 or image.height < 1:
        raise ValueError(f"expected a non-empty image, got size {image.width}x{image.height} (width x height)")
    if image.mode in _SIXTEEN_BIT_MODES:
        eight_bit = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(eight_bit, mode="L")
    return image


def to_rgb_image(image: Any) -> Image.Image:
    """Any supported input (see [`load_image`]) as an RGB PIL image; other modes go through `convert("RGB")`."""
    image = load_image(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def reduce_for_target(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """`image` box-reduced by the largest integer factor that keeps it at least `2 ×` its resize `target` (h, w).

    Bounds memory for huge inputs: the float tensor made afterwards is at most ~4× the target canvas.
    Images not larger than that are returned unchanged, so they follow the original exactly.
    """
    factor = min(image.height // (_MAX_SOURCE_OVERSAMPLING * target[0]),
                 image.width // (_MAX_SOURCE_OVERSAMPLING * target[1]))  # fmt: skip
    if factor < 2:
        return image
    if image.mode not in _REDUCIBLE_MODES:
        image = image.convert("RGB")
    return image.reduce(factor)


def _open_image_file(source: str | os.PathLike | bytes | bytearray) -> Image.Image:
    """Opens and decodes an image file; anything that does not decode raises a ValueError naming the file."""
    name = f"{len(source)} bytes" if isinstance(source, (bytes, bytearray)) else f"file {os.fspath(source)!r}"
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        image = Image.open(handle)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"expected an image file, but {name} could not be decoded as an image: {error}") from error
    return image


def _array_to_image(array: np.ndarray) -> Image.Image:
    """A numpy image (H×W, H×W×C or C×H×W) as a PIL image; floats are read as [0, 1]."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"expected an image array of shape (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"expected a non-empty image, got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if array.max(initial=0.0) <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


class TokenPackerImageProcessor(BaseImageProcessor):
    r"""
    Image processor of TokenPacker and TokenPacker-HD.

    Modes (`image_mode`):
        - `"pad"` (normal-resolution models): paste the image centred on a square of the integer mean colour
          (122, 116, 104), then CLIP preprocessing: shortest edge `tile_size` with PIL bicubic, centre crop,
          rescale 1/255, normalise. One tile per image.
        - `"square"` (stage-1 style): the same CLIP preprocessing without the padding (the long side is cropped).
        - `"slice"` (TokenPacker-HD): ToTensor + Normalize, a grid (rows, cols) from [`get_slice_grid`], a
          bilinear resize (no antialias) of the normalised tensor placed top-left on a zero canvas of
          rows·S × cols·S, cut into row-major S×S tiles, plus a global thumbnail when rows·cols > 1.

    Args:
        image_mode (`str`, defaults to `"pad"`): `"pad"`, `"square"` or `"slice"`.
        max_slices (`int`, defaults to 9): Candidate list of the slice mode (`patch_num` of the original): 9, 16
            or 25.
        tile_size (`int`, defaults to 336): Side S of every tile, i.e. the vision tower's `image_size`.
        image_mean, image_std (`list[float]`, default CLIP): Normalisation; the pad colour is
            `int(mean · 255)` per channel, the slice padding is exactly the mean (zero after normalising).
        thumbnail_from (`str`, defaults to `"canvas"`): Source of the slice-mode thumbnail. `"canvas"`
            reproduces the original, which squashes the padded canvas (image plus its padding band) into the
            image's aspect ratio; `"image"` resizes the image itself (no distortion, differs from the
            released models' training).

    Returns (`__call__`): a [`BatchFeature`] with
        - `pixel_values`: `[total_tiles, 3, S, S]`, the tiles of image 0 (row-major, then its thumbnail if
          rows·cols > 1), then those of image 1, ...
        - `image_grids`: `[num_images, 2]` int64 (rows, cols) per image; (1, 1) in pad/square mode.

    In slice mode, images at least `4 ×` their resize target on both sides are first reduced with PIL's box
    filter by an integer factor (keeping at least twice the target resolution), so a 100-megapixel image never
    becomes a full-size float tensor. This differs from the original only for such images, by the tiny difference
    between bilinear-from-full-size and bilinear-from-box-reduced.
    """

    valid_kwargs = TokenPackerImagesKwargs
    model_input_names = ["pixel_values", "image_grids"]

    def __init__(
        self,
        image_mode: str = "pad",
        max_slices: int = 9,
        tile_size: int = 336,
        image_mean: list[float] | tuple[float, ...] | None = None,
        image_std: list[float] | tuple[float, ...] | None = None,
        thumbnail_from: str = "canvas",
        **kwargs,
    ):
        # Keys written by `to_dict` that are not settings of this class.
        for key in ("image_processor_type", "_valid_kwargs_names"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.image_mode = image_mode
        self.max_slices = max_slices
        self.tile_size = tile_size
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)
        self.thumbnail_from = thumbnail_from
        self._check_settings(image_mode, max_slices, tile_size, thumbnail_from)

    @classmethod
    def from_vision_config(cls, vision_config: Any, **kwargs) -> "TokenPackerImageProcessor":
        """Builds the processor whose tile size is the vision tower's `image_size` (other settings via kwargs)."""
        kwargs.setdefault("tile_size", vision_config.image_size)
        return cls(**kwargs)

    @staticmethod
    def _check_settings(image_mode: str, max_slices: int, tile_size: int, thumbnail_from: str) -> None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if max_slices not in SLICE_GRIDS:
            raise ValueError(f"max_slices must be one of {sorted(SLICE_GRIDS)}, got {max_slices!r}")
        if not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
        if thumbnail_from not in THUMBNAIL_SOURCES:
            raise ValueError(f"thumbnail_from must be one of {THUMBNAIL_SOURCES}, got {thumbnail_from!r}")

    def get_slice_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the slice-mode grid for a `height`×`width` image with this processor's settings."""
        return get_slice_grid(height, width, max_slices=self.max_slices, tile_size=self.tile_size)

    def get_image_grid(self, height: int, width: int, image_mode: str | None = None) -> tuple[int, int]:
        """(rows, cols) the processor gives a `height`×`width` image: the slice grid, or (1, 1) otherwise."""
        if (image_mode or self.image_mode) == "slice":
            return self.get_slice_grid(height, width)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be at least 1x1, got height={height}, width={width}")
        return (1, 1)

    def preprocess(
        self,
        images: Any,
        image_mode: str | None = None,
        max_slices: int | None = None,
        tile_size: int | None = None,
        thumbnail_from: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Tiles of a batch of images.

        Args:
            images: one image or a (possibly nested, one list per prompt) list of images; see [`to_rgb_image`].
            image_mode, max_slices, tile_size, thumbnail_from: override the instance settings for this call.

        Returns:
            `BatchFeature` with `pixel_values` `[total_tiles, 3, S, S]` float32 and `image_grids`
            `[num_images, 2]` int64 (always torch tensors: the tile count varies per image).
        """
        image_mode = image_mode or self.image_mode
        max_slices = max_slices or self.max_slices
        tile_size = tile_size or self.tile_size
        thumbnail_from = thumbnail_from or self.thumbnail_from
        self._check_settings(image_mode, max_slices, tile_size, thumbnail_from)
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None (tiles are torch tensors), got {return_tensors!r}")

        tiles, grids = [], []
        for image in flatten_images(images):
            image = load_image(image)
            if image_mode == "slice":
                grid = get_slice_grid(image.height, image.width, max_slices=max_slices, tile_size=tile_size)
                tiles.append(self._slice(image, grid, tile_size, thumbnail_from))
            else:
                grid = (1, 1)
                tiles.append(self._clip_preprocess(to_rgb_image(image), tile_size, pad=image_mode == "pad"))
            grids.append(grid)
        if not tiles:
            raise ValueError("expected at least one image, got none")
        data = {
            "pixel_values": torch.cat(tiles, dim=0),
            "image_grids": torch.tensor(grids, dtype=torch.long),
        }
        return BatchFeature(data=data)

    def _clip_preprocess(self, image: Image.Image, tile_size: int, pad: bool) -> torch.Tensor:
        """Pad / square path: `[1, 3, S, S]`, the CLIPImageProcessor pipeline of the original (PIL bicubic)."""
        if pad:
            image = expand2square(image, tuple(int(mean * 255) for mean in self.image_mean))
        pixels = np.asarray(image)  # [H, W, 3] uint8
        size = get_resize_output_image_size(
            pixels, size=tile_size, default_to_square=False, input_data_format=ChannelDimension.LAST
        )
        pixels = resize(
            pixels, size, resample=PILImageResampling.BICUBIC, input_data_format=ChannelDimension.LAST
        )
        pixels = center_crop(pixels, (tile_size, tile_size), input_data_format=ChannelDimension.LAST)
        pixels = rescale(pixels, 1 / 255, input_data_format=ChannelDimension.LAST)
        pixels = normalize(pixels, self.image_mean, self.image_std, input_data_format=ChannelDimension.LAST)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float()

    def _normalized_tensor(self, image: Image.Image) -> torch.Tensor:
        """ToTensor + Normalize of the original: `[1, 3, H, W]` float32 from an RGB image."""
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return pixels.sub_(mean).div_(std)[None]

    def _slice(
        self, image: Image.Image, grid: tuple[int, int], tile_size: int, thumbnail_from: str
    ) -> torch.Tensor:
        """Slice path: `[rows·cols (+1 thumbnail if > 1), 3, S, S]` tiles of one image."""
        rows, cols = grid
        height, width = image.height, image.width
        target = fit_size(height, width, rows * tile_size, cols * tile_size)
        thumbnail_size = fit_size(height, width, tile_size, tile_size)
        # The reduced source must stay large enough for the biggest resize it feeds.
        needed = target if thumbnail_from == "canvas" else (
            max(target[0], thumbnail_size[0]), max(target[1], thumbnail_size[1])
        )  # fmt: skip
        pixels = self._normalized_tensor(to_rgb_image(reduce_for_target(image, needed)))
        canvas = pixels.new_zeros(1, 3, rows * tile_size, cols * tile_size)
        canvas[:, :, : target[0], : target[1]] = F.interpolate(pixels, size=target, mode="bilinear")
        tiles = canvas.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(rows * cols, 3, tile_size, tile_size)
        if rows * cols == 1:
            return tiles
        # The original resizes the padded canvas (not the image) into the image's thumbnail box: the global view
        # carries the padding band squashed into the image's aspect ratio, as in the original.
        source = canvas if thumbnail_from == "canvas" else pixels
        thumbnail = canvas.new_zeros(1, 3, tile_size, tile_size)
        thumbnail[:, :, : thumbnail_size[0], : thumbnail_size[1]] = F.interpolate(
            source, size=thumbnail_size, mode="bilinear"
        )
        return torch.cat([tiles, thumbnail], dim=0)


def flatten_images(images: Any) -> list[Any]:
    """A flat list of images from one image, a list, a list of per-prompt lists, or a 4-D batch array."""
    if isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
        return [image for item in images for image in flatten_images(item)]
    return [images]


def num_tiles(grid: tuple[int, int]) -> int:
    """Tiles one image contributes to `pixel_values`: rows·cols, plus the thumbnail when rows·cols > 1."""
    rows, cols = grid
    return 1 if rows * cols == 1 else rows * cols + 1


__all__ = ["TokenPackerImageProcessor", "get_slice_grid", "num_tiles", "SLICE_GRIDS"]
