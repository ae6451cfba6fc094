"""Bad training data for `LlavaDataset`: data files that are empty, not UTF-8 or not valid JSON raise one error
naming the file (and the line); a broken `.jsonl` line, a record of the wrong shape and an image that cannot be
used (a decompression bomb, truncated, empty, removed mid-epoch) are counted skips, never a crash mid-epoch."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokenpacker_hf.training import LlavaDataset, TokenPackerCollator

from builders import make_processor, qa, write_llava_dataset

GOOD = qa("<image>\nWhat colour?", "Red.", "good.png")


def write_data(root: Path, name: str, content: bytes) -> Path:
    """A data file with exactly `content`, next to an images folder holding good.png."""
    write_llava_dataset(root, [], {"good.png": (16, 16, 200)})
    path = root / name
    path.write_bytes(content)
    return path


def jsonl(*lines: object) -> bytes:
    """JSON Lines: each item dumped as JSON, except str items, which are written as they are (broken lines)."""
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode() + b"\n"


# ----------------------------------------------------------------------------------------------------------------
# Files that cannot be read: one error naming the file


@pytest.mark.parametrize(
    "name, content, error, fragments",
    [
        ("data.json", b"", ValueError, ["data.json: the file is empty; expected LLaVA samples"]),
        ("data.jsonl", b"", ValueError, ["data.jsonl: the file is empty"]),
        ("data.json", b" \n\t\n", ValueError, ["data.json: the file is empty"]),
        ("data.json", b'[\n{"a": 1},\n{"caf\xe9": 2}\n]', ValueError,
         ["data.json: expected UTF-8 text, but line 3 holds the byte 0xE9, which is not UTF-8"]),
        ("data.jsonl", jsonl(GOOD) + b'{"caf\xe9": 1}\n', ValueError,
         ["data.jsonl: expected UTF-8 text, but line 2 holds the byte 0xE9"]),
        ("data.json", b'[\n  {"conversations": []}\n  {"conversations": []}\n]', ValueError,
         ["data.json: not valid JSON: Expecting ',' delimiter at line 3 column 3"]),
        ("data.json", jsonl(GOOD, GOOD), ValueError,
         ["data.json: not valid JSON: Extra data at line 2 column 1 (one sample per line? name the file .jsonl)"]),
        ("data.json", json.dumps({"data": [GOOD]}).encode(), ValueError,
         ["data.json: expected a JSON list of samples, got a dict"]),
        ("data.json", b"42", ValueError, ["data.json: expected a JSON list of samples, got a int"]),
        ("data.json", b'"samples.json"', ValueError, ["data.json: expected a JSON list of samples, got a str"]),
    ],
)  # fmt: skip
def test_unreadable_data_file_names_the_file(name, content, error, fragments, tmp_path):
    path = write_data(tmp_path, name, content)
    with pytest.raises(error) as raised:
        LlavaDataset(path, make_processor(padding_side="right"), tmp_path / "images")
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert str(path) in str(raised.value)


def test_missing_data_file_and_folder_in_its_place_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.json"):
        LlavaDataset(tmp_path / "no-such.json", make_processor(padding_side="right"))
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.json"):
        LlavaDataset(tmp_path / "folder.json", make_processor(padding_side="right"))


# ----------------------------------------------------------------------------------------------------------------
# Files that are fine although unusual: the correct samples


@pytest.mark.parametrize(
    "name, content",
    [
        ("data.json", b"\xef\xbb\xbf" + json.dumps([GOOD, GOOD]).encode()),  # a byte-order mark, as Windows tools write
        ("data.jsonl", b"\xef\xbb\xbf" + jsonl(GOOD, GOOD)),
        ("data.jsonl", jsonl(GOOD, GOOD).replace(b"\n", b"\r\n")),  # Windows line ends
        ("data.jsonl", b"\n\n" + jsonl(GOOD) + b"   \n" + jsonl(GOOD)),  # blank lines
    ],
)  # fmt: skip
def test_unusual_but_valid_files_give_every_sample(name, content, tmp_path):
    dataset = LlavaDataset(
        write_data(tmp_path, name, content), make_processor(padding_side="right"), tmp_path / "images"
    )
    assert len(dataset) == 2 and not dataset.skipped
    assert torch.equal(dataset[0]["input_ids"], dataset[1]["input_ids"])


def test_jsonl_line_separator_inside_a_string_does_not_split_the_record(tmp_path):
    """U+2028 may stand unescaped in a JSON string; only "\\n" ends a JSON Lines record."""
    record = qa("<image>\nRead\u2028this.", "Done.", "good.png")
    content = json.dumps(record, ensure_ascii=False).encode() + b"\n"
    assert "\u2028".encode() in content
    dataset = LlavaDataset(
        write_data(tmp_path, "data.jsonl", content), make_processor(padding_side="right"), tmp_path / "images"
    )
    assert len(dataset) == 1 and not dataset.skipped


# ----------------------------------------------------------------------------------------------------------------
# Broken JSON Lines and records of the wrong shape: counted skips


def test_broken_jsonl_line_is_skipped_and_named_by_its_line_number(tmp_path, caplog):
    content = jsonl(GOOD, "", '{"conversations": [', GOOD, "{'single': 'quotes'}")
    path = write_data(tmp_path, "data.jsonl", content)
    with caplog.at_level(logging.WARNING, logger="tokenpacker_hf.training"):
        dataset = LlavaDataset(path, make_processor(padding_side="right"), tmp_path / "images")
    assert len(dataset) == 2
    assert dataset.skipped == {"invalid_json": 2}
    assert "line 3 is not valid JSON: Expecting value at column 20" in caplog.text
    assert "line 5 is not valid JSON: Expecting property name enclosed in double quotes at column 2" in caplog.text


def test_jsonl_with_only_broken_lines_is_unusable(tmp_path):
    path = write_data(tmp_path, "data.jsonl", jsonl("{", "[1, 2"))
    expected = r"data\.jsonl: none of its 2 samples is usable \(skipped: \{'invalid_json': 2\}\)"
    with pytest.raises(ValueError, match=expected):
        LlavaDataset(path, make_processor(padding_side="right"), tmp_path / "images")


WRONG_RECORDS = {
    "record_is_a_list": [GOOD],
    "record_is_a_string": "a sample",
    "record_is_null": None,
    "record_is_a_number": 7,
    "conversations_missing": {"image": "good.png"},
    "conversations_is_a_string": {"conversations": "human: hi, gpt: hello"},
    "conversations_is_a_dict": {"conversations": {"from": "human", "value": "hi"}},
    "turn_is_a_string": {"conversations": ["hi", "hello"]},
    "turn_value_is_a_number": {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "3"}]},
    "turn_from_is_unknown": {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    "image_is_a_number": {**GOOD, "image": 5},
    "image_list_holds_a_number": {**GOOD, "image": ["good.png", 5]},
    "image_is_a_dict": {**GOOD, "image": {"path": "good.png"}},
    "image_list_holds_a_list": {**GOOD, "image": [["good.png"]]},
}


@pytest.mark.parametrize("case", WRONG_RECORDS)
@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_record_of_the_wrong_shape_is_a_counted_skip(case, name, tmp_path):
    records = [GOOD, WRONG_RECORDS[case]]
    content = json.dumps(records).encode() if name == "data.json" else jsonl(*(json.dumps(r) for r in records))
    dataset = LlavaDataset(
        write_data(tmp_path, name, content), make_processor(padding_side="right"), tmp_path / "images"
    )
    assert len(dataset) == 1 and dataset.skipped == {"malformed": 1}
    assert dataset[0]["pixel_values"].shape[0] == 1


def test_image_path_that_is_a_folder_is_a_missing_image(tmp_path):
    records = [GOOD, qa("<image>\nAnd this?", "No.", "a_folder.png")]
    path = write_llava_dataset(tmp_path, records, {"good.png": (16, 16, 1)})
    (tmp_path / "images" / "a_folder.png").mkdir()
    dataset = LlavaDataset(path, make_processor(padding_side="right"), tmp_path / "images")
    assert len(dataset) == 1 and dataset.skipped == {"missing_image": 1}


# ----------------------------------------------------------------------------------------------------------------
# Images that turn out unusable mid-epoch: counted skips, replaced by the next usable sample


def make_180_megapixel_png(path: Path) -> None:
    """15000 x 12000 one-bit pixels: a 22 kB file over twice PIL's decompression-bomb limit (89 MP)."""
    Image.new("1", (15000, 12000)).save(path)


def truncate_image(path: Path, fmt: str) -> None:
    Image.effect_noise((64, 48), 60).convert("RGB").save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_IMAGES = {
    "decompression_bomb_180mp": make_180_megapixel_png,
    "truncated_png": lambda path: truncate_image(path, "PNG"),
    "truncated_jpeg": lambda path: truncate_image(path, "JPEG"),
    "empty_file": lambda path: path.write_bytes(b""),
    "text_file": lambda path: path.write_text("not an image"),
    "removed_after_the_scan": lambda path: path.unlink(),
    "replaced_by_a_folder_after_the_scan": lambda path: (path.unlink(), path.mkdir()),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_unusable_image_mid_epoch_is_a_counted_skip(case, tmp_path, caplog):
    records = [qa("<image>\nThis one?", "Broken.", "bad.png"), GOOD]
    path = write_llava_dataset(tmp_path, records, {"good.png": (16, 16, 3), "bad.png": (16, 16, 9)})
    dataset = LlavaDataset(path, make_processor(padding_side="right"), tmp_path / "images")
    assert len(dataset) == 2 and not dataset.skipped  # the scan saw a usable file
    BAD_IMAGES[case](tmp_path / "images" / "bad.png")

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=TokenPackerCollator(dataset.processor))
    with caplog.at_level(logging.WARNING, logger="tokenpacker_hf.training"):
        (batch,) = list(loader)
    assert dataset.skipped == {"unreadable_image": 1}
    assert "bad.png" in caplog.text
    good = dataset.encode(1)
    assert torch.equal(batch["input_ids"], torch.stack([good["input_ids"]] * 2))  # replaced by the usable one


def test_epoch_where_no_image_can_be_read_raises_naming_the_file(tmp_path):
    records = [qa("<image>\nA?", "B.", "a.png"), qa("<image>\nC?", "D.", "b.png")]
    path = write_llava_dataset(tmp_path, records, {"a.png": (16, 16, 1), "b.png": (16, 16, 2)})
    dataset = LlavaDataset(path, make_processor(padding_side="right"), tmp_path / "images")
    shutil.rmtree(tmp_path / "images")
    with pytest.raises(RuntimeError, match=r"data\.json: no usable sample left \(skipped: \{'unreadable_image': 2\}\)"):
        dataset[0]
