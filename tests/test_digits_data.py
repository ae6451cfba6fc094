"""The digits demo's data generator (`examples/digits/make_data.py`): LLaVA records whose answers are the labels of
the recorded sklearn scans, images that show those scans in raster order, disjoint train/test handwriting,
byte-for-byte determinism, and the CLI's exit codes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "digits" / "make_data.py"


def _load_module():
    # examples/ is not a package, so import the script by path, as the demo's training script will.
    spec = importlib.util.spec_from_file_location("make_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data = _load_module()
DIGITS = load_digits()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    for split, n in (("train", 20), ("test", 10)):
        make_data.write_split(out, split, n, grid=2, cell=16, noise=0.05, seed=0)
    return out


def records(dataset: Path, split: str) -> list[dict]:
    return json.loads((dataset / f"{split}.json").read_text())


def test_records_are_llava_conversations_with_rgb_images(dataset):
    for split, n in (("train", 20), ("test", 10)):
        rows = records(dataset, split)
        assert [row["id"] for row in rows] == [f"{split}_{i:05d}" for i in range(n)]
        for row in rows:
            assert row["image"] == f"images/{row['id']}.png"
            human, gpt = row["conversations"]
            assert human == {"from": "human", "value": "<image>\nRead the digits."}
            assert gpt["from"] == "gpt"
            assert len(gpt["value"]) == 4 and gpt["value"].isdigit(), gpt["value"]
            with Image.open(dataset / row["image"]) as image:
                assert (image.mode, image.size) == ("RGB", (32, 32))


def test_answers_are_the_labels_of_the_recorded_scans(dataset):
    for split in make_data.SPLITS:
        for row in records(dataset, split):
            labels = [str(DIGITS.target[index]) for index in row["digit_indices"]]
            assert row["conversations"][1]["value"] == "".join(labels)


def test_train_and_test_grids_use_disjoint_handwriting(dataset):
    train_pool, test_pool = make_data.split_indices()
    assert (len(train_pool), len(test_pool)) == (1400, 397)
    assert not set(train_pool) & set(test_pool) and len(set(train_pool) | set(test_pool)) == len(DIGITS.target)
    # Stratified: every digit keeps about its share (~22%) of scans in the test pool.
    counts = np.bincount(DIGITS.target[test_pool], minlength=10) / np.bincount(DIGITS.target, minlength=10)
    assert np.all(np.abs(counts - 397 / 1797) < 0.01)

    used = {split: {i for row in records(dataset, split) for i in row["digit_indices"]} for split in make_data.SPLITS}
    assert used["train"] <= set(train_pool) and used["test"] <= set(test_pool)


def test_load_digit_split_matches_the_pools():
    train_images, train_labels, test_images, test_labels = make_data.load_digit_split()
    train_pool, test_pool = make_data.split_indices()
    np.testing.assert_array_equal(train_labels, DIGITS.target[train_pool])
    np.testing.assert_array_equal(test_labels, DIGITS.target[test_pool])
    np.testing.assert_allclose(test_images, DIGITS.images[test_pool] / 16)
    assert train_images.shape == (1400, 8, 8) and train_images.dtype == np.float32
    assert 0 <= train_images.min() and train_images.max() == 1


@pytest.mark.parametrize("cell", [16, 12])
def test_a_noiseless_grid_shows_the_scans_in_raster_order(cell):
    images = DIGITS.images[[0, 1, 2, 3]] / 16
    grid = np.asarray(make_data.make_grid(images, cell, 0.0, np.random.default_rng(0)))
    assert grid.shape == (2 * cell, 2 * cell, 3)
    assert np.all(grid[..., 0] == grid[..., 1]) and np.all(grid[..., 0] == grid[..., 2])
    rows = np.arange(cell) * 8 // cell  # nearest neighbour
    for position, image in enumerate(images):
        top, left = divmod(position, 2)
        tile = grid[top * cell : (top + 1) * cell, left * cell : (left + 1) * cell, 0]
        np.testing.assert_array_equal(tile, np.round(image[rows][:, rows] * 255))


def test_noise_has_the_requested_spread():
    flat = np.full((4, 8, 8), 0.5, dtype=np.float32)
    grid = np.asarray(make_data.make_grid(flat, 16, 0.05, np.random.default_rng(0)))[..., 0] / 255
    assert abs(grid.std() - 0.05) < 0.005 and abs(grid.mean() - 0.5) < 0.005


def test_make_grid_rejects_a_non_square_count():
    with pytest.raises(ValueError, match=r"\[G\*G, 8, 8\]"):
        make_data.make_grid(np.zeros((3, 8, 8)), 16, 0.0, np.random.default_rng(0))


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    def build(folder: str, seed: int) -> dict[str, bytes]:
        make_data.write_split(tmp_path / folder, "test", 5, grid=2, cell=16, noise=0.05, seed=seed)
        return {p.relative_to(tmp_path / folder).as_posix(): p.read_bytes() for p in (tmp_path / folder).rglob("*.*")}

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert len(first) == 6 and first == again
    assert first["test.json"] != other["test.json"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_cli_writes_the_dataset_and_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "data"
    args = [str(out), "--train", "6", "--test", "3", "--grid", "3", "--cell", "10", "--noise", "0", "--seed", "2"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert len(records(out, "train")) == 6 and len(records(out, "test")) == 3
    with Image.open(out / "images" / "test_00002.png") as image:
        assert image.size == (30, 30)

    refused = run_cli(*args)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "expected a new or empty folder" in refused.stderr and "--overwrite" in refused.stderr
    assert run_cli(*args, "--overwrite").returncode == 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--train", "0"], "argument --train: expected a positive integer, found '0'"),
        (["--test", "-5"], "argument --test: expected a positive integer, found '-5'"),
        (["--grid", "0"], "argument --grid: expected a positive integer, found '0'"),
        (["--noise", "-0.1"], "argument --noise: expected a number >= 0, found '-0.1'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        make_data.main([str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and expected in stderr
    assert not (tmp_path / "out").exists()


def test_a_file_as_out_dir_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        make_data.main([str(tmp_path / "file"), "--train", "1", "--test", "1"])
    assert exit_info.value.code == 2 and "expected a folder, found a file" in capsys.readouterr().err
