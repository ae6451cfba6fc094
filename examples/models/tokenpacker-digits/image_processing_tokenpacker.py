# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""Image processor of TokenPacker: the normal-resolution `pad` / `square` paths and the TokenPacker-HD
`slice` path (dynamic grid, top-left padded canvas, row-major tiles and a global thumbnail).

Everything here follows the original code (CircleRadon/TokenPacker, `llava/patch_divide.py` and the `slice`
branch of its data loaders).
"""

import errno
import io
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import center_crop, get_resize_output_image_size, normalize, rescale, resize
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling
from transformers.processing_utils import ImagesKwargs

# Imported first for its transformers version check: a processor loaded alone through remote code gets it too.
from .configuration_tokenpacker import MIN_TRANSFORMERS_VERSION  # noqa: F401, I001

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

# With `box_reduce_large_images`, a source image is reduced (box filter, integer factor) only while it stays at
# least this many times larger than its resize target.
_MAX_SOURCE_OVERSAMPLING = 2

_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK")
_RGB = np.arange(3)  # channel indices, to look `[..., 3]` pixels up in a `[256, 3]` table

# Huge images are converted, resized and normalised in row blocks of about this many bytes, so that no full-size
# copy (16-bit, float or padded) of them is ever made.
_ROW_BLOCK_BYTES = 8 * 2**20

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_SIXTEEN_BIT_MAX = 65535
_EIGHT_BIT_MAX = 255
_PREMULTIPLIED_MODES = {"La": "LA", "RGBa": "RGBA"}  # PIL cannot convert these to RGB directly
_CHANNEL_COUNTS = (1, 3, 4)
_EXIF_ORIENTATION = 0x0112
_TURNED_ORIENTATIONS = range(2, 9)  # 1 is upright


class TokenPackerImagesKwargs(ImagesKwargs, total=False):
    """Call-time options of [`TokenPackerImageProcessor`] (all default to the instance's settings)."""

    image_mode: Literal["pad", "square", "slice"] | None
    max_slices: int | None
    tile_size: int | None
    thumbnail_from: Literal["canvas", "image"] | None
    box_reduce_large_images: bool | None


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


def load_image(image: Any) -> Image.Image:
    """The one image-loading path of the package: any supported input as a non-empty, upright PIL image whose
    `convert("RGB")` gives the right colours.

    Accepts file paths, raw file bytes, PIL images of every mode, numpy arrays and torch tensors.

    - Files are decoded in full, so a truncated file is refused here, not later. PIL's decompression-bomb rule
      applies: above `Image.MAX_IMAGE_PIXELS` pixels PIL warns, above twice that the file is refused.
    - The EXIF orientation (files and PIL images) is applied.
    - 16-bit images (modes "I", "I;16", "I;16B", "I;16L", "I;16N"; uint16 arrays) are scaled to 8 bits as
      `round(v / 257)`, so 257·v gives v. Mode "F" holds PIL's 0..255 scale. These become mode "L";
      premultiplied "La" / "RGBa" become "LA" / "RGBA". Alpha is dropped later, as `convert("RGB")` does.
    - Arrays and tensors are `[H, W]`, `[H, W, C]` or `[C, H, W]` with C in 1 / 3 / 4 (gray, RGB, RGBA). A 3-D
      shape whose first and last sides could both be C (e.g. `[3, 4, 3]`) follows its container's convention:
      channels-last for numpy, channels-first for torch. Values: uint8 as they are; uint16 as 16-bit; bool as
      0 / 255; other integers must lie in [0, 255]; floats (float16, bfloat16, float32, float64) must be finite
      and lie in [0, 1] (up to half an 8-bit level outside is accepted) and are rounded to 8 bits. Nothing
      else is clipped.

    Raises:
        FileNotFoundError: a path that does not exist (named in the message).
        ValueError: any other unusable input, with one line naming what was expected and what was found.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = _open_image_file(image)
    elif isinstance(image, torch.Tensor):
        image = _array_to_image(*_tensor_to_array(image), channels_first_when_ambiguous=True)
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image, _describe_array(image), channels_first_when_ambiguous=False)
    elif isinstance(image, Image.Image):
        image = _decode(lambda: image, "the PIL image")
    else:
        raise ValueError(
            f"expected an image as a PIL image, numpy array, torch tensor, file path or file bytes, "
            f"got {type(image).__name__}"
        )
    if image.width < 1 or image.height < 1:
        raise ValueError(f"expected a non-empty image, got size {image.width}x{image.height} (width x height)")
    image = _upright(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_eight_bit_image_rows(image, _SIXTEEN_BIT_MAX, f"a mode {image.mode!r} image"))
    if image.mode == "F":
        return Image.fromarray(_eight_bit_image_rows(image, _EIGHT_BIT_MAX, "a mode 'F' image"))
    if image.mode in _PREMULTIPLIED_MODES:
        return image.convert(_PREMULTIPLIED_MODES[image.mode])
    return image


def to_rgb_image(image: Any) -> Image.Image:
    """Any supported input (see [`load_image`]) as an RGB PIL image."""
    return _as_rgb(load_image(image))


def reduce_for_target(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """`image` box-reduced by the largest integer factor that keeps it at least `2 ×` its resize `target` (h, w).

    The shortcut of `box_reduce_large_images=True`: the bilinear resize then reads at most ~4× the target's
    pixels. Images less than `4 ×` the target on either side are returned unchanged.
    """
    factor = min(image.height // (_MAX_SOURCE_OVERSAMPLING * target[0]),
                 image.width // (_MAX_SOURCE_OVERSAMPLING * target[1]))  # fmt: skip
    if factor < 2:
        return image
    if image.mode not in _REDUCIBLE_MODES:
        image = _as_rgb(image)
    return image.reduce(factor)


def _row_blocks(height: int, row_bytes: int) -> list[tuple[int, int]]:
    """`(first, last)` row ranges covering `height` rows, each about `_ROW_BLOCK_BYTES` at `row_bytes` per row."""
    rows = max(1, _ROW_BLOCK_BYTES // max(1, row_bytes))
    return [(first, min(first + rows, height)) for first in range(0, height, rows)]


def _as_rgb(image: Image.Image) -> Image.Image:
    """`image.convert("RGB")`; a mode PIL cannot convert raises a ValueError naming it."""
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"expected an image PIL can convert to RGB, got mode {image.mode!r}: {error}") from error


def _rgb_rows(image: Image.Image, first: int, last: int) -> np.ndarray:
    """Rows `first:last` of a loaded image as RGB: `[last - first, W, 3]` uint8."""
    return np.array(_as_rgb(image.crop((0, first, image.width, last))))  # writable, for torch.from_numpy


def _open_image_file(source: str | os.PathLike | bytes | bytearray) -> Image.Image:
    """Opens and decodes an image file or file bytes (see [`load_image`] for the errors)."""
    if isinstance(source, (bytes, bytearray)):
        return _decode(lambda: Image.open(io.BytesIO(source)), f"{len(source)} bytes")
    path = os.fspath(source)
    if os.path.isdir(path):
        raise ValueError(f"expected an image file, but {path!r} is a directory")
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "image file not found", path) from None
    except OSError as error:
        raise ValueError(f"expected a readable image file, but {path!r} could not be opened: {error}") from error
    # Closing the handle is safe once the image is decoded: only its first frame is used.
    with handle:
        return _decode(lambda: Image.open(handle), f"file {path!r}")


def _decode(open_image: Callable[[], Image.Image], name: str) -> Image.Image:
    """The image `open_image` returns, with its pixels decoded; PIL's decoding errors become one-line ValueErrors."""
    try:
        image = open_image()
        image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"expected an image of at most twice PIL's Image.MAX_IMAGE_PIXELS pixels, but {name} is larger: {error}"
        ) from error
    except Exception as error:  # noqa: BLE001
        # PIL's format plugins raise many types on malformed data (OSError, SyntaxError, EOFError, struct.error,
        # even AttributeError from Pillow 10's TIFF reader); each means the data does not decode.
        raise ValueError(f"expected an image, but {name} could not be decoded as an image: {error}") from error
    return image


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation tag says (a copy), or `image` itself when there is nothing to do."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) in _TURNED_ORIENTATIONS:
        return ImageOps.exif_transpose(image)
    return image


def _describe_array(array: np.ndarray | torch.Tensor) -> str:
    """How an error message names an array or tensor: its shape and dtype."""
    dtype = array.dtype if isinstance(array, torch.Tensor) else f"numpy.{array.dtype}"
    return f"an array of shape {tuple(array.shape)} and dtype {dtype}"


def _tensor_to_array(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor's values as a numpy array (bfloat16 widened to float32, exactly), and a description of it."""
    description = _describe_array(tensor)
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    if tensor.is_complex():
        raise ValueError(f"expected real-valued pixels, got {description}")
    try:
        return tensor.numpy(), description
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"expected a bool, integer or float tensor, got {description}") from error


def _array_to_image(array: np.ndarray, description: str, channels_first_when_ambiguous: bool) -> Image.Image:
    """An image array (see [`load_image`] for layouts and value ranges) as an 8-bit PIL image (L, RGB, RGBA)."""
    if array.dtype.kind not in "buif":
        raise ValueError(f"expected pixel values of a bool, integer or float dtype, got {description}")
    array = _channels_last(array, description, channels_first_when_ambiguous)
    if array.size == 0:
        raise ValueError(f"expected a non-empty image, got {description}")
    if array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array))
    row_values = array[:1].size
    blocks = (
        _eight_bit(array[first:last], _array_maximum(array.dtype), description)
        for first, last in _row_blocks(array.shape[0], row_values * 8)
    )
    return Image.fromarray(_stack_rows(blocks, array.shape))


def _channels_last(array: np.ndarray, description: str, channels_first_when_ambiguous: bool) -> np.ndarray:
    """`array` as `[H, W]` or `[H, W, C]` with C in 3 / 4 (a view; a single channel is squeezed)."""
    if array.ndim == 3:
        first, last = array.shape[0] in _CHANNEL_COUNTS, array.shape[-1] in _CHANNEL_COUNTS
        if first and (not last or channels_first_when_ambiguous):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            array = array[None]  # neither side is a channel count: refused below
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(
            f"expected an image array of shape (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got {description}"
        )
    return array


def _array_maximum(dtype: np.dtype) -> float:
    """The value that means full intensity for an array of `dtype` (see [`load_image`])."""
    if dtype == np.uint16:
        return _SIXTEEN_BIT_MAX
    return 1.0 if dtype.kind in "bf" else _EIGHT_BIT_MAX


def _eight_bit_image_rows(image: Image.Image, maximum: float, description: str) -> np.ndarray:
    """A single-band 16-bit or float PIL image as `[H, W]` uint8, one row block at a time."""
    blocks = (
        _eight_bit(np.asarray(image.crop((0, first, image.width, last))), maximum, description)
        for first, last in _row_blocks(image.height, image.width * 8)
    )
    return _stack_rows(blocks, (image.height, image.width))


def _stack_rows(blocks: Iterable[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Row blocks written one after the other into one uint8 array of `shape`."""
    pixels = np.empty(shape, dtype=np.uint8)
    first = 0
    for block in blocks:
        pixels[first : first + len(block)] = block
        first += len(block)
    return pixels


def _eight_bit(values: np.ndarray, maximum: float, description: str) -> np.ndarray:
    """Pixel values on the scale [0, `maximum`] as uint8 levels; refuses NaN, infinities and values off the scale.

    Integers of 16-bit images map exactly as `round(v / 257)`; floats are rounded (half an 8-bit level of slack
    on either side of the scale is accepted, as it rounds into it); bools give 0 / 255.
    """
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype.kind == "f":
        levels = values.astype(np.float64) * (255.0 / maximum)
        if not np.isfinite(levels).all():
            raise ValueError(f"expected finite pixel values, found NaN or infinity in {description}")
        low, high = levels.min(), levels.max()
        if low < -0.5 or high > 255.5:
            found = values.min() if low < -0.5 else values.max()
            raise ValueError(f"expected pixel values in [0, {maximum:g}] for {description}, found {found:g}")
        return np.clip(np.round(levels), 0, 255).astype(np.uint8)
    low, high = values.min(), values.max()
    if low < 0 or high > maximum:
        hint = "" if maximum == _SIXTEEN_BIT_MAX else " (16-bit data must be uint16)"
        raise ValueError(
            f"expected pixel values in [0, {maximum:g}] for {description}, found {low if low < 0 else high}{hint}"
        )
    if maximum == _SIXTEEN_BIT_MAX:
        # round(v / 257) in integers: v / 257 is never exactly halfway, so this is (v + 128) // 257.
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return values.astype(np.uint8)


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
        tile_size (`int`, defaults to 336): Side S of every tile, i.e. the vision tower's `image_size`. The
            `size` property reports it as `{"height": S, "width": S}`; a `size` argument must agree with it.
        image_mean, image_std (`list[float]`, default CLIP): Normalisation; the pad colour is
            `int(mean · 255)` per channel, the slice padding is exactly the mean (zero after normalising).
        thumbnail_from (`str`, defaults to `"canvas"`): Source of the slice-mode thumbnail. `"canvas"`
            reproduces the original, which squashes the padded canvas (image plus its padding band) into the
            image's aspect ratio; `"image"` resizes the image itself (no distortion, differs from the
            released models' training).
        box_reduce_large_images (`bool`, defaults to `False`): Slice mode only. `False` reproduces the original:
            the bilinear resize reads the full-resolution image. `True` first shrinks images at least `4 ×` their
            resize target on both sides with PIL's box filter by an integer factor (keeping at least twice the
            target), which is faster but changes their tiles: on a fine-texture 12-megapixel photo (4032×3024,
            `max_slices=9`) by up to 2.15 (mean 0.37) in normalised units, pixels the released models
            never saw. Smaller images are unaffected.

    Returns (`__call__`): a [`BatchFeature`] with
        - `pixel_values`: `[total_tiles, 3, S, S]`, the tiles of image 0 (row-major, then its thumbnail if
          rows·cols > 1), then those of image 1, ...
        - `image_grids`: `[num_images, 2]` int64 (rows, cols) per image; (1, 1) in pad/square mode.

    Images come in through [`load_image`] (files, PIL images of any mode, numpy arrays, torch tensors). Large
    images never become a full-size float, 16-bit or padded copy: conversions, the bicubic resize of pad / square
    mode and the bilinear resize of slice mode run in row blocks. The blocks give exactly the pixels of the
    one-call bicubic resize; the bilinear resize follows torch's single-threaded CPU kernel (the one the original's
    data loaders ran) to within a few float32 roundings. torch's multi-threaded kernel differs from both by up to a
    float32 step of the source position in its weights (up to ~1e-4 in normalised units on HD sizes, see
    [`_bilinear_taps`]). The slice-mode thumbnail made from the canvas is the original's own `F.interpolate` call.
    """

    valid_kwargs = TokenPackerImagesKwargs
    model_input_names = ["pixel_values", "image_grids"]

    @property
    def size(self) -> dict[str, int]:
        """`{"height": tile_size, "width": tile_size}`: the size every tile is resized to. Derived from `tile_size`
        (so it cannot go stale); serving engines read it to size their profiling images, as for other HF image
        processors. Assigning is accepted only when it agrees with `tile_size`."""
        return {"height": self.tile_size, "width": self.tile_size}

    @size.setter
    def size(self, value: Any) -> None:
        _check_size(value, self.tile_size)

    def to_dict(self) -> dict[str, Any]:
        """The settings as saved in `preprocessor_config.json`, with the derived `size` written out so the file
        states the tiles' size as other image processors' configs do (it is checked against `tile_size` on load)."""
        return {**super().to_dict(), "size": self.size}

    def __init__(
        self,
        image_mode: str = "pad",
        max_slices: int = 9,
        tile_size: int = 336,
        image_mean: list[float] | tuple[float, ...] | None = None,
        image_std: list[float] | tuple[float, ...] | None = None,
        thumbnail_from: str = "canvas",
        box_reduce_large_images: bool = False,
        **kwargs,
    ):
        # Keys written by `to_dict` that are not settings of this class.
        for key in ("image_processor_type", "_valid_kwargs_names"):
            kwargs.pop(key, None)
        # `size` is derived from `tile_size` (see the property); a saved or passed one must agree with it.
        size = kwargs.pop("size", None)
        super().__init__(**kwargs)
        self.image_mode = image_mode
        self.max_slices = max_slices
        self.tile_size = tile_size
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)
        self.thumbnail_from = thumbnail_from
        self.box_reduce_large_images = box_reduce_large_images
        self._check_settings(image_mode, max_slices, tile_size, thumbnail_from, box_reduce_large_images)
        _check_size(size, tile_size)

    @classmethod
    def from_vision_config(cls, vision_config: Any, **kwargs) -> "TokenPackerImageProcessor":
        """Builds the processor whose tile size is the vision tower's `image_size` (other settings via kwargs)."""
        kwargs.setdefault("tile_size", vision_config.image_size)
        return cls(**kwargs)

    @staticmethod
    def _check_settings(
        image_mode: str, max_slices: int, tile_size: int, thumbnail_from: str, box_reduce_large_images: bool
    ) -> None:
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if max_slices not in SLICE_GRIDS:
            raise ValueError(f"max_slices must be one of {sorted(SLICE_GRIDS)}, got {max_slices!r}")
        if not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
        if thumbnail_from not in THUMBNAIL_SOURCES:
            raise ValueError(f"thumbnail_from must be one of {THUMBNAIL_SOURCES}, got {thumbnail_from!r}")
        if not isinstance(box_reduce_large_images, bool):
            raise ValueError(f"box_reduce_large_images must be True or False, got {box_reduce_large_images!r}")

    def get_slice_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the slice-mode grid for a `height`×`width` image with this processor's settings."""
        return get_slice_grid(height, width, max_slices=self.max_slices, tile_size=self.tile_size)

    def get_image_grid(
        self,
        height: int,
        width: int,
        image_mode: str | None = None,
        max_slices: int | None = None,
        tile_size: int | None = None,
    ) -> tuple[int, int]:
        """(rows, cols) the processor gives a `height`×`width` image: the slice grid, or (1, 1) otherwise; the
        optional arguments override the settings as in a call."""
        if (image_mode or self.image_mode) == "slice":
            return get_slice_grid(
                height, width, max_slices=max_slices or self.max_slices, tile_size=tile_size or self.tile_size
            )
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
        box_reduce_large_images: bool | None = None,
        size: dict[str, int] | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Tiles of a batch of images.

        Args:
            images: one image or a (possibly nested, one list per prompt) list of images; see [`to_rgb_image`].
            image_mode, max_slices, tile_size, thumbnail_from, box_reduce_large_images: override the instance
                settings for this call.
            size: only checked: it must be `{"height": S, "width": S}` for this call's tile size S (a processor
                passes the `size` of its images kwargs along); set `tile_size` to change the tiles' size.

        Returns:
            `BatchFeature` with `pixel_values` `[total_tiles, 3, S, S]` float32 and `image_grids`
            `[num_images, 2]` int64 (always torch tensors: the tile count varies per image).
        """
        image_mode = image_mode or self.image_mode
        max_slices = max_slices or self.max_slices
        tile_size = tile_size or self.tile_size
        thumbnail_from = thumbnail_from or self.thumbnail_from
        if box_reduce_large_images is None:
            box_reduce_large_images = self.box_reduce_large_images
        self._check_settings(image_mode, max_slices, tile_size, thumbnail_from, box_reduce_large_images)
        _check_size(size, tile_size)
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None (tiles are torch tensors), got {return_tensors!r}")

        tiles, grids = [], []
        for image in flatten_images(images):
            image = load_image(image)
            if image_mode == "slice":
                grid = get_slice_grid(image.height, image.width, max_slices=max_slices, tile_size=tile_size)
                tiles.append(self._slice(image, grid, tile_size, thumbnail_from, box_reduce_large_images))
            else:
                grid = (1, 1)
                tiles.append(self._clip_preprocess(image, tile_size, pad=image_mode == "pad"))
            grids.append(grid)
        if not tiles:
            raise ValueError("expected at least one image, got none")
        data = {
            "pixel_values": torch.cat(tiles, dim=0),
            "image_grids": torch.tensor(grids, dtype=torch.long),
        }
        return BatchFeature(data=data)

    def _clip_preprocess(self, image: Image.Image, tile_size: int, pad: bool) -> torch.Tensor:
        """Pad / square path: `[1, 3, S, S]`, the CLIPImageProcessor pipeline of the original (PIL bicubic) on the
        image, pasted centred on a square of the mean colour first when `pad` (LLaVA-1.5's `expand2square`)."""
        padded = pad and image.width != image.height
        side = max(image.height, image.width)
        size = get_resize_output_image_size(
            np.broadcast_to(np.uint8(0), (side, side, 3) if padded else (image.height, image.width, 3)),
            size=tile_size,
            default_to_square=False,
            input_data_format=ChannelDimension.LAST,
        )  # only the shape of the (virtual) canvas is read
        if padded:
            background = tuple(int(mean * 255) for mean in self.image_mean)
            pixels = _bicubic_resize_padded(image, side, background, size)
        else:
            pixels = _bicubic_resize(image, size)
        pixels = center_crop(pixels, (tile_size, tile_size), input_data_format=ChannelDimension.LAST)
        pixels = rescale(pixels, 1 / 255, input_data_format=ChannelDimension.LAST)
        pixels = normalize(pixels, self.image_mean, self.image_std, input_data_format=ChannelDimension.LAST)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float()

    def _normalization_table(self) -> np.ndarray:
        """`[256, 3]` float32: ToTensor + Normalize of the original (float32 torch: / 255, - mean, / std) applied
        to every 8-bit level of each channel. Looking pixels up in it gives exactly the original's values, at a
        fraction of the cost of the arithmetic per pixel."""
        levels = torch.arange(256, dtype=torch.float32)[:, None].expand(256, 3)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        return levels.div(255).sub(mean).div(std).numpy()

    def _bilinear_resize(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        """`[1, 3, h, w]`: the original's normalised float32 image resized to `size` (h, w) as
        `F.interpolate(mode="bilinear")` (align_corners=False, no antialias) computes it, one block of output rows
        at a time, so that only the source rows a block reads are ever held, and only the pixels it reads are
        normalised.

        Each output pixel blends two source rows, each first blended along the width, with the indices and
        weights of [`_bilinear_taps`], in float32 with one rounding per product and per sum. A block's source
        rows take about `_ROW_BLOCK_BYTES` as float32.
        """
        table = self._normalization_table()
        row_low, row_high, row_low_weight, row_high_weight = _bilinear_taps(image.height, size[0])
        col_low, col_high, col_low_weight, col_high_weight = _bilinear_taps(image.width, size[1])
        # Normalising costs a table lookup per pixel: of whole source rows when upscaling, of the two gathered
        # columns of each output column when shrinking by more than 2.
        gather_first = 2 * size[1] < image.width
        rows_per_block = max(2, _ROW_BLOCK_BYTES // (image.width * 3 * 4))
        resized = np.empty((size[0], size[1], 3), dtype=np.float32)
        for start, stop in _output_row_blocks(row_low, row_high, rows_per_block):
            first, last = row_low[start], row_high[stop - 1] + 1
            # The distinct source rows of this block (sorted), and where each output row's two rows are among them.
            read, where = np.unique(np.concatenate([row_low[start:stop], row_high[start:stop]]) - first,
                                    return_inverse=True)  # fmt: skip
            rgb = _rgb_rows(image, int(first), int(last))[read]
            if gather_first:
                left = table[np.take(rgb, col_low, axis=1), _RGB]
                right = table[np.take(rgb, col_high, axis=1), _RGB]
            else:
                pixels = table[rgb, _RGB]
                left, right = np.take(pixels, col_low, axis=1), np.take(pixels, col_high, axis=1)
            across = _blend(left, right, col_low_weight[:, None], col_high_weight[:, None])
            low, high = where[: stop - start], where[stop - start :]
            weights = row_low_weight[start:stop, None, None], row_high_weight[start:stop, None, None]
            resized[start:stop] = _blend(np.take(across, low, axis=0), np.take(across, high, axis=0), *weights)
        return torch.from_numpy(resized).permute(2, 0, 1)[None]

    def _slice(
        self,
        image: Image.Image,
        grid: tuple[int, int],
        tile_size: int,
        thumbnail_from: str,
        box_reduce_large_images: bool,
    ) -> torch.Tensor:
        """Slice path: `[rows·cols (+1 thumbnail if > 1), 3, S, S]` tiles of one image."""
        rows, cols = grid
        height, width = image.height, image.width
        target = fit_size(height, width, rows * tile_size, cols * tile_size)
        thumbnail_size = fit_size(height, width, tile_size, tile_size)
        source = image
        if box_reduce_large_images:
            # The reduced source must stay large enough for the biggest resize it feeds.
            needed = target if thumbnail_from == "canvas" else (
                max(target[0], thumbnail_size[0]), max(target[1], thumbnail_size[1])
            )  # fmt: skip
            source = reduce_for_target(image, needed)
        canvas = torch.zeros(1, 3, rows * tile_size, cols * tile_size)
        canvas[:, :, : target[0], : target[1]] = self._bilinear_resize(source, target)
        tiles = canvas.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(rows * cols, 3, tile_size, tile_size)
        if not has_thumbnail(grid):
            return tiles
        # The original resizes the padded canvas (not the image) into the image's thumbnail box: the global view
        # carries the padding band squashed into the image's aspect ratio, as in the original.
        thumbnail = canvas.new_zeros(1, 3, tile_size, tile_size)
        thumbnail[:, :, : thumbnail_size[0], : thumbnail_size[1]] = (
            F.interpolate(canvas, size=thumbnail_size, mode="bilinear")
            if thumbnail_from == "canvas"
            else self._bilinear_resize(source, thumbnail_size)
        )
        return torch.cat([tiles, thumbnail], dim=0)


def _bilinear_taps(source_size: int, output_size: int) -> tuple[np.ndarray, ...]:
    """Along one axis of a bilinear resize (align_corners=False, no antialias), the two source indices each output
    index reads and their weights: `(low, high, low_weight, high_weight)`, `[output_size]` each, int64, int64,
    float32, float32; `low` and `high` are non-decreasing.

    As torch's single-threaded CPU kernel computes them, in float32: scale = in / out, s = max(0, scale · (i + 0.5)
    - 0.5) rounded once (that kernel fuses the multiply-add), low = floor(s), high = min(low + 1, in - 1),
    high_weight = s - low, low_weight = 1 - high_weight. That is the kernel the original ran, in its data loaders'
    one-thread workers. torch's multi-threaded kernel rounds the product first, which moves its weights by up to
    one float32 step of s.
    """
    scale = np.float32(source_size) / np.float32(output_size)
    # In float64, scale · (i + 0.5) (at most 48 significant bits) and the subtraction are exact: one rounding.
    position = np.maximum((np.float64(scale) * (np.arange(output_size) + 0.5) - 0.5).astype(np.float32), 0)
    low = np.minimum(np.floor(position).astype(np.int64), source_size - 1)
    high_weight = np.clip(position - low.astype(np.float32), 0, 1, dtype=np.float32)
    return low, np.minimum(low + 1, source_size - 1), np.float32(1) - high_weight, high_weight


def _blend(low: np.ndarray, high: np.ndarray, low_weight: np.ndarray, high_weight: np.ndarray) -> np.ndarray:
    """`low · low_weight + high · high_weight` (float32 arrays, weights broadcast), each product and the sum rounded
    to float32 as torch's kernel does; computed in place in `low` and `high`, and returned in `low`."""
    low *= low_weight
    high *= high_weight
    low += high
    return low


def _output_row_blocks(low: np.ndarray, high: np.ndarray, rows_per_block: int) -> list[tuple[int, int]]:
    """`(start, stop)` ranges covering the output rows, each at least one row and, beyond that, only rows whose
    source rows (`low`, `high` of [`_bilinear_taps`]) lie within `rows_per_block` rows."""
    blocks, start = [], 0
    while start < len(low):
        stop = int(np.searchsorted(high, low[start] + rows_per_block - 1, side="right"))
        blocks.append((start, max(start + 1, stop)))
        start = blocks[-1][1]
    return blocks


def _bicubic_resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`[h, w, 3]` uint8: the image resized to `size` (h, w) with PIL bicubic, in one PIL call on the image itself.

    An "L" image is resized as it is and its result repeated into 3 channels: bicubic works per channel, so this
    equals resizing its RGB copy, which is never made.
    """
    source = image if image.mode in ("RGB", "L") else _as_rgb(image)
    pixels = resize(source, size, resample=PILImageResampling.BICUBIC, input_data_format=ChannelDimension.LAST)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def _bicubic_resize_padded(
    image: Image.Image, side: int, background: tuple[int, ...], size: tuple[int, int]
) -> np.ndarray:
    """`[h, w, 3]` uint8: the image pasted centred on a `side`×`side` square of colour `background`, resized to
    `size` (h, w) with PIL bicubic, exactly as one PIL call on that square, without ever making the square.

    PIL resizes in two passes, each rounding to 8 bits: along the width, then along the height (the order it takes
    for a square resized to a square). The first pass runs here one row block of the square at a time; the
    second runs on its result, only `w` pixels wide.
    """
    top, left = (side - image.height) // 2, (side - image.width) // 2
    rows = np.empty((side, size[1], 3), dtype=np.uint8)
    for first, last in _row_blocks(side, side * 3):
        block = np.empty((last - first, side, 3), dtype=np.uint8)
        block[:] = background
        image_first, image_last = max(first - top, 0), min(last - top, image.height)
        if image_first < image_last:
            block[image_first + top - first : image_last + top - first, left : left + image.width] = _rgb_rows(
                image, image_first, image_last
            )
        rows[first:last] = resize(
            block, (last - first, size[1]), resample=PILImageResampling.BICUBIC, input_data_format=ChannelDimension.LAST
        )
    return resize(rows, size, resample=PILImageResampling.BICUBIC, input_data_format=ChannelDimension.LAST)


def _check_size(size: Any, tile_size: int) -> None:
    """Raises unless `size` is None or `{"height": tile_size, "width": tile_size}`: every tile is resized to the
    tile size, so another `size` could only be ignored."""
    if size is None:
        return
    expected = {"height": tile_size, "width": tile_size}
    if not isinstance(size, dict) or dict(size) != expected:
        raise ValueError(
            f"size must be {expected} (tiles are tile_size × tile_size), got {size!r}; set tile_size to change the "
            f"tiles' size"
        )


def flatten_images(images: Any) -> list[Any]:
    """A flat list of images from one image, a list, a list of per-prompt lists, or a 4-D batch array."""
    if isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
        return [image for item in images for image in flatten_images(item)]
    return [images]


# The slice-mode layout rules live here; the processor's token layout and the model's tile split
# (`tiles_per_image`, tested against `num_tiles`) follow them.
def has_thumbnail(grid: tuple[int, int]) -> bool:
    """Whether an image sliced into `grid` (rows, cols) also gets the global thumbnail: only when it has more
    than one tile (a 1×1 grid's tile already is the whole image)."""
    rows, cols = grid
    return rows * cols > 1


def num_tiles(grid: tuple[int, int]) -> int:
    """Tiles one image contributes to `pixel_values`: rows·cols, plus the thumbnail (`has_thumbnail`)."""
    rows, cols = grid
    return rows * cols + int(has_thumbnail(grid))


__all__ = ["TokenPackerImageProcessor", "get_slice_grid", "has_thumbnail", "num_tiles", "SLICE_GRIDS"]
