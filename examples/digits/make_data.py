"""Build the "read the handwritten digits" dataset for the TokenPacker demo, offline, in LLaVA format.

Each image is a G×G grid of real handwritten digits from scikit-learn's bundled copy of the UCI optical
recognition data (1,797 8×8 scans, 0–16 grey levels), and the answer is the digits in raster order:

    OUT_DIR/images/train_00000.png   RGB, G·cell px square, bright strokes on a dark background
    OUT_DIR/train.json               [{"id", "image", "conversations": [human "<image>\\nRead the digits.",
                                      gpt "3805"], "digit_indices": [sklearn sample index per cell]}]
    OUT_DIR/test.json, images/test_*.png

The handwriting is split once, stratified by digit, into 1,400 training and 397 test samples with a fixed seed
(`SPLIT_SEED`), independent of `--seed`: test grids only ever use scans never seen in training, whatever seeds
the two splits were generated with. `--seed` drives which samples fill each grid and the pixel noise.

    python examples/digits/make_data.py OUT_DIR --train 4000 --test 500 --grid 2 --cell 16 --noise 0.05 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

PROMPT = "<image>\nRead the digits."
SPLITS = ("train", "test")
SPLIT_SEED = 0
TEST_SAMPLES = 397  # of 1,797: leaves 1,400 scans for training
DIGIT_SIDE = 8
GREY_LEVELS = 16.0


def split_indices(seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted sklearn sample indices of the training and test handwriting, stratified by digit."""
    labels = load_digits().target
    train, test = train_test_split(np.arange(len(labels)), test_size=TEST_SAMPLES, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def load_digit_split(seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels): images float32 [N, 8, 8] scaled to [0, 1], labels
    int64 [N], in the order of `split_indices(seed)`."""
    digits = load_digits()
    images = (digits.images / GREY_LEVELS).astype(np.float32)
    train, test = split_indices(seed)
    return images[train], digits.target[train], images[test], digits.target[test]


def make_grid(digit_images: np.ndarray, cell: int, noise: float, rng: np.random.Generator) -> Image.Image:
    """Tiles G·G digits ([G*G, 8, 8] in [0, 1], raster order) into an RGB image of side G·cell.

    Upscaling is nearest-neighbour: every one of the 8×8 grey levels stays exactly as scanned (no invented
    detail), and the result does not depend on Pillow's resampling filters. Gaussian noise of std `noise` is then
    added per output pixel, so it is finer than the digit's own pixels, and the image is clipped to [0, 1].
    """
    count = len(digit_images)
    grid = round(count**0.5)
    if grid * grid != count or digit_images.shape[1:] != (DIGIT_SIDE, DIGIT_SIDE):
        raise ValueError(f"expected [G*G, 8, 8] digit images, got shape {tuple(digit_images.shape)}")
    source_rows = np.arange(cell) * DIGIT_SIDE // cell  # which of the 8 source pixels each output pixel shows
    cells = digit_images[:, source_rows][:, :, source_rows]  # [G*G, cell, cell]
    canvas = cells.reshape(grid, grid, cell, cell).transpose(0, 2, 1, 3).reshape(grid * cell, grid * cell)
    if noise > 0:
        canvas = canvas + rng.normal(0.0, noise, canvas.shape)
    grey = np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")  # uint8 [H, W] is read as mode "L"


def write_split(
    out_dir: str | Path,
    split: str,
    n: int,
    grid: int = 2,
    cell: int = 16,
    noise: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Writes `n` grids of `split` ("train" or "test") handwriting to `out_dir/images/` and their records to
    `out_dir/{split}.json`; returns the json path. Same arguments, same bytes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images = (digits.images / GREY_LEVELS).astype(np.float32)
    pool = split_indices()[SPLITS.index(split)]
    # One stream per split, so the train and test grids of one seed are not the same draws of different pools.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    records = []
    for i in tqdm(range(n), desc=f"{split} grids", unit="img", disable=not progress):
        chosen = pool[rng.integers(0, len(pool), size=grid * grid)]  # with replacement: any G fits any pool
        name = f"images/{split}_{i:05d}.png"
        make_grid(images[chosen], cell, noise, rng).save(out_dir / name)
        # No separators: the k-th answer digit then sits at the same distance from the k-th image token for every
        # k, a pattern a small language model with rotary positions learns far sooner than that of "3 8 0 5".
        answer = "".join(str(label) for label in digits.target[chosen])
        records.append(
            {
                "id": f"{split}_{i:05d}",
                "image": name,
                "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": answer}],
                "digit_indices": chosen.tolist(),
            }
        )
    json_path = out_dir / f"{split}.json"
    # One record per line: still a JSON list, and diffs/greps of a dataset stay readable.
    json_path.write_text("[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n")
    return json_path


class _OneLineErrorParser(argparse.ArgumentParser):
    """Reports bad input as one line on stderr and exit code 2, like `parser.error` but without the usage block,
    so the message that matters is the whole output."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, found {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="make_data.py", description="Write the handwritten-digit grid dataset (LLaVA json + PNG images)."
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new or empty folder to write into")
    parser.add_argument("--train", type=_positive_int, default=4000, help="number of training grids")
    parser.add_argument("--test", type=_positive_int, default=500, help="number of test grids")
    parser.add_argument("--grid", type=_positive_int, default=2, help="digits per side of a grid image (G)")
    parser.add_argument("--cell", type=_positive_int, default=16, help="pixels per digit side (image side = G*cell)")
    parser.add_argument("--noise", type=_non_negative_float, default=0.05, help="Gaussian noise std on [0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="drives grid sampling and noise (not the split)")
    parser.add_argument("--overwrite", action="store_true", help="replace images/ and the split jsons in OUT_DIR")
    return parser


def _prepare_out_dir(parser: argparse.ArgumentParser, out_dir: Path, overwrite: bool) -> None:
    """Refuses to mix a new dataset into existing files, unless --overwrite, which clears only what this script
    writes (a larger earlier run would otherwise leave stale images behind)."""
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"OUT_DIR: expected a folder, found a file at {out_dir}")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    if entries and not overwrite:
        parser.error(
            f"OUT_DIR: expected a new or empty folder, found {out_dir} with {len(entries)} entries "
            f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); pass --overwrite to replace"
        )
    shutil.rmtree(out_dir / "images", ignore_errors=True)
    for split in SPLITS:
        (out_dir / f"{split}.json").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _prepare_out_dir(parser, args.out_dir, args.overwrite)
    for split in SPLITS:
        count = getattr(args, split)
        path = write_split(args.out_dir, split, count, args.grid, args.cell, args.noise, args.seed, progress=True)
        print(f"wrote {count} {split} grids to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
