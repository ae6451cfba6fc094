"""Bad input to `tokenpacker-hf generate` and `info`: damaged model folders, configs that fail validation, bad
devices and images, and Hub failures (a repo that does not exist, a local Hub server answering 5xx, a closed
port). Each gives one line `error: ...` and exit code 2 within seconds, or, where the input is usable (a repo in
the local cache while the Hub is down), the correct result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokenpacker_hf.cli import main

from hub_server import LocalHub, closed_port_url, hub_env, point_clients_at

# A failure must not wait for the Hub client's retries (1 + 2 + 4 + 8 + 8 s per file): in-process it is a few
# local requests, in a fresh process the same plus importing torch and transformers.
IN_PROCESS_SECONDS = 10
SUBPROCESS_SECONDS = 60


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`main(argv)` in this process: exit code, stdout, stderr."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, out: str, err: str, *fragments: str) -> str:
    """Exit code 2, nothing on stdout, exactly one stderr line `error: ...` holding every fragment."""
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def generate_argv(model: str | Path, image: str | Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--image", str(image), "--prompt", "What is it?",
            "--max-new-tokens", "2", *extra]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Damaged or invalid model folders


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated_weights": lambda folder: truncate(folder / "model.safetensors"),
    "garbage_weights": lambda folder: (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4),
    "empty_weights": lambda folder: (folder / "model.safetensors").write_bytes(b""),
    "garbage_config": lambda folder: (folder / "config.json").write_text("{garbage"),
    "empty_config": lambda folder: (folder / "config.json").write_text(""),
    "config_is_a_list": lambda folder: (folder / "config.json").write_text("[1, 2]"),
    "config_scale_factor_does_not_divide_grid": lambda folder: edit_json(
        folder / "config.json", lambda config: config.update(scale_factor=5)),
    "config_feature_layer_out_of_range": lambda folder: edit_json(
        folder / "config.json", lambda config: config.update(vision_feature_layer=40)),
    "config_field_of_wrong_type": lambda folder: edit_json(
        folder / "config.json", lambda config: config.update(vision_config=5)),
    "garbage_processor_config": lambda folder: (folder / "processor_config.json").write_text("xx{"),
    "processor_config_fails_validation": lambda folder: edit_json(
        folder / "processor_config.json", lambda config: config["image_processor"].update(image_mode="zoom")),
    "no_tokenizer": lambda folder: [(folder / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
}  # fmt: skip


@pytest.mark.parametrize(
    "damage, command, expected",
    [
        ("truncated_weights", "generate", ["cannot load the weights of", ".safetensors file is truncated or damaged"]),
        ("garbage_weights", "generate", ["cannot load the weights of", ".safetensors file is truncated or damaged"]),
        ("empty_weights", "generate", ["cannot load the weights of"]),
        ("garbage_config", "info", ["cannot load the config of", "config.json' is not a valid JSON file"]),
        ("garbage_config", "generate", ["cannot load the config of", "config.json' is not a valid JSON file"]),
        ("empty_config", "info", ["cannot load the config of", "not a valid JSON file"]),
        ("config_is_a_list", "info", ["cannot load the config of", "model_type"]),
        ("config_scale_factor_does_not_divide_grid", "info",
         ["cannot load the config of", "scale_factor must divide the patch grid side 4",
          "allowed values: [1, 2, 4], got 5"]),
        ("config_scale_factor_does_not_divide_grid", "generate", ["scale_factor must divide the patch grid side 4"]),
        ("config_feature_layer_out_of_range", "info", ["vision_feature_layer must index", "got 40"]),
        ("config_field_of_wrong_type", "info", ["cannot load the config of", "'vision_config' with value 5"]),
        ("garbage_processor_config", "info",
         ["cannot load the image processor of", "processor_config.json' is not a valid JSON file"]),
        ("garbage_processor_config", "generate", ["cannot load the processor of", "processor_config.json'"]),
        ("processor_config_fails_validation", "info", ["image_mode must be one of", "got 'zoom'"]),
        ("no_tokenizer", "generate", ["cannot load the processor of"]),
    ],
)  # fmt: skip
def test_damaged_model_folder_is_one_error_line(damage, command, expected, model_folder, image_files, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    DAMAGES[damage](folder)
    argv = ["info", str(folder)] if command == "info" else generate_argv(folder, image_files[0])
    assert_one_error_line(*run_cli(argv, capsys), str(folder), *expected)


def test_model_that_is_not_tokenpacker_is_refused_by_generate(tmp_path, image_files, capsys):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.save_pretrained(tmp_path)
    code, out, err = run_cli(generate_argv(tmp_path, image_files[0]), capsys)
    assert_one_error_line(code, out, err, "holds a 'llama' model, not a TokenPacker one")


def test_info_says_none_saved_only_when_no_processor_config_exists(model_folder, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    (folder / "processor_config.json").unlink()
    code, out, err = run_cli(["info", str(folder)], capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == "image processor: none saved"


# ----------------------------------------------------------------------------------------------------------------
# Devices and arguments


@pytest.mark.parametrize(
    "device, expected",
    [
        ("foo", "--device 'foo' is not a device: expected one of cpu, cuda, mps, xpu"),
        ("meta", "--device 'meta' is not a device"),
        ("", "--device '' is not a device"),
        ("cuda:x", "--device 'cuda:x' is not a device"),
        pytest.param("cuda", "--device cuda: this machine has no such device; available: cpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        pytest.param("cuda:7", "--device cuda:7: this machine has no such device",
                     marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has 8 GPUs")),
    ],
)  # fmt: skip
def test_unusable_device_names_the_choices(device, expected, model_folder, image_files, capsys):
    argv = generate_argv(model_folder, image_files[0], "--device", device)
    assert_one_error_line(*run_cli(argv, capsys), expected)


@pytest.mark.parametrize("value, expected", [("0", "expected a number of at least 1, got 0"),
                                             ("many", "expected a whole number, got 'many'")])  # fmt: skip
def test_max_new_tokens_must_be_a_positive_whole_number(value, expected, model_folder, image_files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(generate_argv(model_folder, image_files[0], "--max-new-tokens", value))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "error: argument --max-new-tokens" in last and expected in last


# ----------------------------------------------------------------------------------------------------------------
# Images


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    """Image files a user might pass by mistake: a 180-megapixel PNG (a few kB, over PIL's decompression-bomb
    limit), a truncated PNG, an empty file, a folder."""
    folder = tmp_path_factory.mktemp("bad_images")
    Image.new("1", (15000, 12000)).save(folder / "180mp.png")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "a_folder.png").mkdir()
    return {path.stem: path for path in folder.iterdir()}


@pytest.mark.parametrize("name", ["180mp", "truncated", "empty", "a_folder"])
def test_unusable_image_is_one_error_line(name, bad_images, model_folder, capsys):
    assert_one_error_line(*run_cli(generate_argv(model_folder, bad_images[name]), capsys))


# ----------------------------------------------------------------------------------------------------------------
# The Hub: a repo that does not exist, a server answering errors, a closed port, offline mode


@pytest.fixture
def published(hub, model_folder) -> str:
    """The tiny model uploaded to the local Hub as `user/tiny-tp`."""
    from huggingface_hub import HfApi

    HfApi().create_repo("user/tiny-tp")
    HfApi().upload_folder(folder_path=str(model_folder), repo_id="user/tiny-tp")
    return "user/tiny-tp"


def timed_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    start = time.monotonic()
    result = run_cli(argv, capsys)
    assert time.monotonic() - start < IN_PROCESS_SECONDS, "the CLI waited for retries"
    return result


@pytest.mark.parametrize("command", ["info", "generate"])
def test_repo_that_does_not_exist_fails_at_once(command, hub, image_files, capsys):
    missing = "nobody/no-such-model"
    argv = ["info", missing] if command == "info" else generate_argv(missing, image_files[0])
    assert_one_error_line(*timed_cli(argv, capsys), f"the Hub at {hub.url} has no model repo nobody/no-such-model")


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("command", ["info", "generate"])
def test_hub_answering_5xx_fails_at_once_when_not_cached(command, status, hub, image_files, capsys):
    hub.outage = status
    argv = ["info", "user/tiny-tp"] if command == "info" else generate_argv("user/tiny-tp", image_files[0])
    assert_one_error_line(*timed_cli(argv, capsys), f"the Hub at {hub.url} answered {status} for user/tiny-tp",
                          "and user/tiny-tp is not in the local cache")  # fmt: skip


def test_hub_refusing_access_is_one_line(hub, capsys):
    hub.outage = 403
    assert_one_error_line(*timed_cli(["info", "user/tiny-tp"], capsys), f"the Hub at {hub.url} refused user/tiny-tp")


@pytest.mark.parametrize("command", ["info", "generate"])
def test_closed_port_fails_at_once_when_not_cached(command, tmp_path, monkeypatch, image_files, capsys):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    url = closed_port_url()
    argv = ["info", "user/tiny-tp"] if command == "info" else generate_argv("user/tiny-tp", image_files[0])
    with point_clients_at(url):
        result = timed_cli(argv, capsys)
    assert_one_error_line(*result, f"the Hub at {url} cannot be reached", "user/tiny-tp is not in the local cache")


def test_offline_mode_with_an_uncached_repo_is_one_line(hub, monkeypatch, capsys):
    import huggingface_hub.constants as hf_constants

    with monkeypatch.context() as patch:  # undone before the hub fixture restores the clients' own setting
        patch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        result = timed_cli(["info", "user/tiny-tp"], capsys)
    assert_one_error_line(*result, "offline mode is on (HF_HUB_OFFLINE), and user/tiny-tp is not in the local cache")
    assert hub.requests == []


def test_repo_without_config_is_one_line(hub, capsys):
    from huggingface_hub import HfApi

    HfApi().create_repo("user/empty")
    assert_one_error_line(*timed_cli(["info", "user/empty"], capsys), "cannot load the config of user/empty")


@pytest.mark.parametrize("failure", ["outage", "closed_port"])
def test_cached_repo_still_works_while_the_hub_is_down(failure, hub, published, model_folder, image_files, capsys):
    """Once downloaded, a repo is used from the local cache when the Hub answers 500 or cannot be reached, and
    gives the same answers as the folder it was uploaded from."""

    def answers(model: str, timed: bool = False) -> list[tuple[int, str]]:
        """Exit code and stdout of `info` and `generate` (stderr holds progress bars)."""
        call = timed_cli if timed else run_cli
        return [call(argv, capsys)[:2] for argv in (["info", model], generate_argv(model, image_files[0]))]

    expected = answers(str(model_folder))
    assert expected[0][0] == expected[1][0] == 0
    assert answers(published) == expected  # downloads the files into the cache
    if failure == "outage":
        hub.outage = 500
        assert answers(published, timed=True) == expected
    else:
        with point_clients_at(closed_port_url()):
            assert answers(published, timed=True) == expected


def test_revision_loads_that_commit_and_a_missing_one_is_one_line(hub, published, model_folder, image_files,
                                                                 tmp_path, capsys):  # fmt: skip
    """`--revision` picks the repo's files at that commit: after new weights are pushed, the first commit still
    answers as the folder it was uploaded from."""
    from huggingface_hub import HfApi

    from tokenpacker_hf import TokenPackerForConditionalGeneration
    from tokenpacker_hf.tiny import tiny_config

    first = HfApi().model_info(published).sha
    torch.manual_seed(1)
    retrained = tmp_path / "retrained"
    shutil.copytree(model_folder, retrained)
    TokenPackerForConditionalGeneration(tiny_config()).save_pretrained(retrained)
    HfApi().upload_folder(folder_path=str(retrained), repo_id=published)

    def answer(model, *extra):
        code, out, err = run_cli(generate_argv(model, image_files[0], *extra), capsys)
        assert code == 0, err
        return out

    assert answer(published, "--revision", first) == answer(model_folder)
    assert answer(published) == answer(retrained)
    missing_revision = generate_argv(published, image_files[0], "--revision", "0123456789abcdef")
    assert_one_error_line(
        *timed_cli(missing_revision, capsys), f"the Hub model repo {published} has no revision 0123456789abcdef"
    )


# ----------------------------------------------------------------------------------------------------------------
# A real process: no traceback, no minutes of retries


@pytest.mark.parametrize("failure", ["missing_repo", "closed_port"])
def test_real_process_fails_fast_with_one_line(failure, tmp_path, image_files):
    """`generate --model nobody/no-such-model` without HF_HUB_OFFLINE used to retry for over two minutes."""
    with LocalHub() as hub:
        endpoint = hub.url if failure == "missing_repo" else closed_port_url()
        command = [sys.executable, "-m", "tokenpacker_hf.cli", *generate_argv("nobody/no-such-model", image_files[0])]
        start = time.monotonic()
        completed = subprocess.run(command, env=hub_env(endpoint, tmp_path / "hf_home"), capture_output=True,
                                   text=True, timeout=300)  # fmt: skip
        elapsed = time.monotonic() - start
    assert completed.returncode == 2 and completed.stdout == "", completed.stderr
    expected = "has no model repo nobody/no-such-model" if failure == "missing_repo" else "cannot be reached"
    assert_one_error_line(completed.returncode, completed.stdout, completed.stderr, expected)
    assert elapsed < SUBPROCESS_SECONDS, f"took {elapsed:.0f} s"
