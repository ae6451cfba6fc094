"""Bad input to the converter: damaged or unsafe shards, broken config and index files, impossible options, a
destination that cannot be written, Hub failures for the source and for `--push-to-hub`, and conversions killed
mid-write (real SIGKILL, SIGTERM and SIGINT of a `tokenpacker-hf convert` process).

The API raises one exception naming what was expected and what was found, the command line prints it as one
line `error: ...` with exit code 2, and nothing is left next to DST, except after SIGKILL, whose staging folder
the next conversion into the same DST removes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tokenpacker_hf import TokenPackerForConditionalGeneration
from tokenpacker_hf.cli import main
from tokenpacker_hf.convert_tokenpacker_original import (
    STAGING_MARKER,
    ConversionError,
    UploadError,
    convert_original_checkpoint,
    remove_stale_staging,
)
from tokenpacker_hf.hub import HubError

from hub_server import closed_port_url, point_clients_at
from original_checkpoint import TINY_LM, TINY_TOWER, Original

HUB_SECONDS = 10  # a Hub failure is one or two local requests, never the client's minutes of retries


class Pickled:
    """An arbitrary object in a `.bin` file: what `torch.load(weights_only=True)` refuses to unpickle."""


def leftovers(dst: Path) -> list[str]:
    """DST and everything next to it that a conversion into DST made (its hidden staging folders)."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name == dst.name or p.name.startswith(f".{dst.name}."))


def assert_refused(src: Path | str, dst: Path, error: type[Exception], *fragments: str, capsys=None, **kwargs) -> str:
    """The API raises `error` with every fragment in its message and leaves nothing; so does the command line,
    as one line `error: ...` with exit code 2, when `capsys` is given and the options have CLI spellings."""
    with pytest.raises(error) as raised:
        convert_original_checkpoint(src, dst, **kwargs)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message, message
    if dst.parent.is_dir():
        assert leftovers(dst) == []
    if capsys is not None:
        options = [arg for key, value in kwargs.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
        capsys.readouterr()
        assert main(["convert", str(src), str(dst), *options]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert lines[-1] == f"error: {message}", lines
        assert not any(line.startswith("Traceback") for line in lines)
        if dst.parent.is_dir():
            assert leftovers(dst) == []
    return message


# ----------------------------------------------------------------------------------------------------------------
# Shards that cannot be read


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def resave_bin(path: Path, edit: Callable[[dict], object]) -> None:
    """Rewrites a `.bin` shard with `edit(its state dict)` (which may return something else to save instead)."""
    state = torch.load(path, weights_only=True)
    replacement = edit(state)
    torch.save(state if replacement is None else replacement, path)


SHARD_DAMAGE: dict[str, tuple[str, Callable[[Path], None], list[str]]] = {
    "truncated_safetensors": ("safetensors", truncate, ["the file is truncated or not a safetensors file"]),
    "garbage_safetensors": ("safetensors", lambda p: p.write_bytes(b"\x00\xff" * 300),
                            ["the file is truncated or not a safetensors file"]),
    "empty_safetensors": ("safetensors", lambda p: p.write_bytes(b""),
                          ["the file is truncated or not a safetensors file"]),
    "truncated_bin": ("bin", truncate, ["the file is truncated or damaged", "failed finding central directory"]),
    "empty_bin": ("bin", lambda p: p.write_bytes(b""), ["the file is truncated or damaged"]),
    "truncated_legacy_bin": ("bin", lambda p: (torch.save(torch.load(p, weights_only=True), p,
                                                          _use_new_zipfile_serialization=False), truncate(p)),
                             ["the file is truncated or damaged", "unexpected EOF"]),
    "garbage_bin": ("bin", lambda p: p.write_bytes(bytes(range(256)) * 4), ["it is not a PyTorch checkpoint"]),
    "bin_with_arbitrary_object": ("bin", lambda p: resave_bin(p, lambda s: s.update(config=Pickled())),
                                  ["refused to unpickle", "it holds a test_bad_input_convert.Pickled object",
                                   "torch.load(weights_only=True)"]),
    "bin_with_a_number": ("bin", lambda p: resave_bin(p, lambda s: s.update({next(iter(s)): 5})),
                          ["expected only tensors, found 1 other value(s):", "(int)"]),
    "bin_with_a_string": ("bin", lambda p: resave_bin(p, lambda s: s.update(note="converted by hand")),
                          ["expected only tensors, found 1 other value(s): note (str)"]),
    "bin_holding_a_list": ("bin", lambda p: resave_bin(p, lambda s: list(s.values())),
                           ["expected a state dict (weight names -> tensors), found a list"]),
    "bin_holding_a_tensor": ("bin", lambda p: resave_bin(p, lambda s: torch.zeros(3)),
                             ["expected a state dict (weight names -> tensors), found a Tensor"]),
}  # fmt: skip


@pytest.mark.parametrize("case", SHARD_DAMAGE)
def test_unreadable_shard_is_named(case, tmp_path, tiny_original, capsys):
    fmt, damage, fragments = SHARD_DAMAGE[case]
    src = tiny_original.write(tmp_path / "src", fmt=fmt, shards=3)
    stem, suffix = ("pytorch_model", ".bin") if fmt == "bin" else ("model", ".safetensors")
    shard = src / f"{stem}-00002-of-00003{suffix}"
    damage(shard)
    assert_refused(src, tmp_path / "out", ConversionError, str(shard), *fragments, capsys=capsys)


# ----------------------------------------------------------------------------------------------------------------
# Broken config.json and shard index


@pytest.mark.parametrize(
    "file, content, fragments",
    [
        ("config.json", b"{garbage", ["config.json: not valid JSON (Expecting property name", "at line 1 column 2"]),
        ("config.json", b"", ["config.json: not valid JSON (Expecting value at line 1 column 1)"]),
        ("config.json", b"[1, 2]", ["config.json: expected a JSON object, found a list"]),
        ("config.json", b'{"vocab_size": "caf\xe9"}',
         ["config.json: expected UTF-8 JSON, found a byte 0xE9 at offset 19"]),
        ("model.safetensors.index.json", b"{", ["model.safetensors.index.json: not valid JSON"]),
        ("model.safetensors.index.json", b'{"metadata": {}}',
         ['model.safetensors.index.json: expected a "weight_map"']),
        ("model.safetensors.index.json", b'{"weight_map": {"a": 3}}',
         ['expected a "weight_map" of weight names to shard']),
    ],
)  # fmt: skip
def test_broken_json_file_is_named(file, content, fragments, tmp_path, tiny_original, capsys):
    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=2)
    (src / file).write_bytes(content)
    assert_refused(src, tmp_path / "out", ConversionError, *fragments, capsys=capsys)


# ----------------------------------------------------------------------------------------------------------------
# Impossible options and config values


def test_scale_factor_that_does_not_divide_the_grid_is_refused(tmp_path, tiny_original, capsys):
    """Neither config.json nor the name tells the scale factor, so `--scale-factor` decides, and 5 does not divide
    the tower's 12x12 patch grid."""
    src = tiny_original.write(tmp_path / "my-model", scale_factor=None)
    assert_refused(src, tmp_path / "out", ConversionError, "the checkpoint does not make a valid TokenPacker config",
                   "scale_factor must divide the patch grid side 12", "allowed values: [1, 2, 3, 4, 6, 12], got 5",
                   capsys=capsys, scale_factor=5)  # fmt: skip


@pytest.mark.parametrize(
    "layer, fragments",
    [
        (30, ["vision_feature_layer must index the vision tower's 25 hidden states", "got 30"]),
        (-40, ["vision_feature_layer must index the vision tower's 25 hidden states", "got -40"]),
        ("abc", ["mm_vision_select_layer must be a whole number (a tower layer), found 'abc'"]),
        (1.5, ["mm_vision_select_layer must be a whole number (a tower layer), found 1.5"]),
    ],
)
def test_impossible_select_layer_is_refused(layer, fragments, tmp_path, tiny_original, capsys):
    src = tiny_original.write(tmp_path / "src", mm_vision_select_layer=layer)
    assert_refused(src, tmp_path / "out", ConversionError, *fragments, capsys=capsys)


def test_impossible_max_slices_is_refused(tmp_path, tiny_original, capsys):
    src = tiny_original.write(tmp_path / "src", image_aspect_ratio="slice")
    assert_refused(src, tmp_path / "out", ValueError, "max_slices must be one of [9, 16, 25], got 4", capsys=capsys,
                   max_slices=4)  # fmt: skip


@pytest.mark.parametrize("option", ["--scale-factor", "--max-slices"])
def test_cli_counts_must_be_positive(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), option, "0"])
    assert exit_info.value.code == 2
    assert f"error: argument {option}: expected a number of at least 1, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# A destination that cannot be written


def test_destination_under_a_file_is_refused(tmp_path, tiny_original, capsys):
    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=1)
    (tmp_path / "a_file").write_text("not a folder")
    assert_refused(src, tmp_path / "a_file" / "sub" / "out", ConversionError,
                   f"cannot write {tmp_path / 'a_file' / 'sub' / 'out'}: {tmp_path / 'a_file'} is a file, not a folder",
                   capsys=capsys)  # fmt: skip
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_destination_name_too_long_for_the_file_system_is_refused(tmp_path, tiny_original, capsys):
    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=1)
    assert_refused(src, tmp_path / ("x" * 250), ConversionError, "cannot write", "File name too long", capsys=capsys)


def test_destination_that_is_a_file_is_refused(tmp_path, tiny_original, capsys):
    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=1)
    (tmp_path / "out").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder"):
        convert_original_checkpoint(src, tmp_path / "out")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {tmp_path / 'out'} already exists")
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_destination_in_a_read_only_folder_is_refused(tmp_path, tiny_original, capsys):
    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=1)
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o500)
    try:
        assert_refused(src, tmp_path / "locked" / "out", ConversionError, "cannot write", "Permission denied",
                       capsys=capsys)  # fmt: skip
    finally:
        (tmp_path / "locked").chmod(0o700)


# ----------------------------------------------------------------------------------------------------------------
# The Hub: source repos and --push-to-hub


def timed_refusal(*args, **kwargs) -> str:
    start = time.monotonic()
    message = assert_refused(*args, **kwargs)
    assert time.monotonic() - start < 2 * HUB_SECONDS, "waited for retries"  # API and command line
    return message


def test_source_repo_that_does_not_exist_fails_at_once(hub, tmp_path, capsys):
    timed_refusal(
        "nobody/TokenPacker-7b-144token",
        tmp_path / "out",
        HubError,
        f"checkpoint 'nobody/TokenPacker-7b-144token': the Hub at {hub.url} has no model repo",
        capsys=capsys,
    )


def test_vision_tower_repo_that_does_not_exist_fails_at_once(hub, tmp_path, tiny_original, capsys):
    src = tiny_original.write(tmp_path / "src", with_tower=False)
    timed_refusal(src, tmp_path / "out", HubError, "vision tower 'nobody/no-clip': ",
                  "has no model repo nobody/no-clip", capsys=capsys, vision_tower="nobody/no-clip")  # fmt: skip


@pytest.mark.parametrize("status", [500, 502])
def test_source_on_a_hub_answering_5xx_fails_at_once(status, hub, tmp_path, capsys):
    hub.outage = status
    timed_refusal(
        "sunshine-lwt/TokenPacker-7b-144token",
        tmp_path / "out",
        HubError,
        f"the Hub at {hub.url} answered {status}",
        "is not in the local cache",
        capsys=capsys,
    )


def test_source_behind_a_closed_port_fails_at_once(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    url = closed_port_url()
    with point_clients_at(url):
        timed_refusal(
            "sunshine-lwt/TokenPacker-7b-144token",
            tmp_path / "out",
            HubError,
            f"the Hub at {url} cannot be reached",
            "is not in the local cache",
            capsys=capsys,
        )


@pytest.mark.parametrize("failure", ["outage_500", "closed_port"])
def test_failed_upload_keeps_the_converted_folder_and_says_so(failure, hub, tmp_path, tiny_original, capsys):
    """The conversion succeeded; only the upload failed. DST is kept (loadable) and the error says so and how to
    upload it, so the user need not convert again."""
    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=1)
    url = closed_port_url() if failure == "closed_port" else hub.url
    hub.outage = 500 if failure == "outage_500" else None
    with point_clients_at(url):
        start = time.monotonic()
        with pytest.raises(UploadError) as raised:
            convert_original_checkpoint(src, tmp_path / "api", push_to_hub="user/tokenpacker-tiny")
        assert main(["convert", str(src), str(tmp_path / "cli"), "--push-to-hub", "user/tokenpacker-tiny"]) == 2
        assert time.monotonic() - start < 60
    for dst, message in ((tmp_path / "api", str(raised.value)), (tmp_path / "cli", capsys.readouterr().err)):
        assert f"converted into {dst}, but uploading it to user/tokenpacker-tiny on the Hub at {url} failed" in message
        assert f"the converted folder is kept: upload it with `hf upload user/tokenpacker-tiny {dst}`" in message
        assert TokenPackerForConditionalGeneration.from_pretrained(dst).config.scale_factor == 2
        assert leftovers(dst) == [dst.name]
    assert message.splitlines()[-1].startswith("error: converted into")


# ----------------------------------------------------------------------------------------------------------------
# Killed mid-conversion: SIGKILL leaves a staging folder that the next run removes; SIGTERM and SIGINT leave nothing

SLOW_SHARDS = 8


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint that takes a moment to convert (8 `.bin` shards, 134 MB, cast to bfloat16), so a signal
    reliably arrives after the first output shard is written and before the last."""
    lm = dict(TINY_LM, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=4)  # fmt: skip
    original = Original(TINY_TOWER, lm, scale_factor=2, seed=21)
    return original.write(tmp_path_factory.mktemp("slow") / "TokenPacker-slow-144token", fmt="bin",
                          shards=SLOW_SHARDS)  # fmt: skip


def start_conversion(src: Path, dst: Path, log: Path) -> subprocess.Popen:
    """`tokenpacker-hf convert` in its own process, stderr (progress bars, errors) into `log`.

    SIGINT is reset to its default in the child: a test run started in the background of a shell inherits it
    ignored, and Python then never turns Ctrl-C into KeyboardInterrupt, as a user's terminal would."""
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "tokenpacker_hf.cli", "convert", str(src), str(dst), "--dtype", "bfloat16"],
            stdout=subprocess.DEVNULL, stderr=stderr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip


def wait_mid_conversion(process: subprocess.Popen, dst: Path, log: Path, timeout: float = 300) -> Path:
    """The staging folder, as soon as the first output shard exists in it: the conversion is mid-write."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dst.parent.is_dir():
            for staging in dst.parent.glob(f".{dst.name}.converting-*"):
                if (staging / f"model-00001-of-{SLOW_SHARDS:05d}.safetensors").exists():
                    return staging
        assert process.poll() is None, f"the conversion ended before it could be interrupted: {log.read_text()}"
        time.sleep(0.005)
    process.kill()
    raise AssertionError("the conversion never started writing")


def test_sigkill_leaves_staging_that_the_next_run_removes(slow_checkpoint, tmp_path, caplog):
    dst, log = tmp_path / "out", tmp_path / "convert.log"
    process = start_conversion(slow_checkpoint, dst, log)
    staging = wait_mid_conversion(process, dst, log)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    # What a killed process leaves: a half-written staging folder with the marker naming it, and no DST.
    assert leftovers(dst) == [staging.name]
    assert json.loads((staging / STAGING_MARKER).read_text())["pid"] == process.pid
    assert not (staging / "config.json").exists()

    with caplog.at_level(logging.WARNING, logger="tokenpacker_hf.convert_tokenpacker_original"):
        convert_original_checkpoint(slow_checkpoint, dst, dtype="bfloat16")
    assert f"Removed {staging}, left by a conversion into {dst} that was killed (process {process.pid})" in caplog.text
    assert leftovers(dst) == ["out"] and not (dst / STAGING_MARKER).exists()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == SLOW_SHARDS
    assert TokenPackerForConditionalGeneration.from_pretrained(dst).config.scale_factor == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_remove_everything_and_exit_with_the_signal(signum, slow_checkpoint, tmp_path):
    """DST sits under folders that do not exist yet: they go too."""
    dst, log = tmp_path / "new" / "sub" / "out", tmp_path / "convert.log"
    process = start_conversion(slow_checkpoint, dst, log)
    wait_mid_conversion(process, dst, log)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum, log.read_text()
    last_line = log.read_text().splitlines()[-1]
    assert last_line == f"interrupted by {signal.Signals(signum).name}" + (
        ": the unfinished conversion was removed" if signum == signal.SIGTERM else ""
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert.log"]


# ----------------------------------------------------------------------------------------------------------------
# Which staging folders count as stale


def finished_process_id() -> int:
    """The pid of a process that has run and been reaped, so no process has it (barring reuse)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def make_staging(parent: Path, name: str, marker: dict | str | None) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"half")
    if marker is not None:
        (folder / STAGING_MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    return folder


@pytest.mark.parametrize(
    "name, marker, removed",
    [
        (".out.converting-dead", "dead", True),
        (".out.converting-nomarker", None, False),
        (".out.converting-alive", "alive", False),
        (".out.converting-elsewhere", "other_host", False),
        (".out.converting-garbled", "{not json", False),
        (".out2.converting-dead", "dead", False),
    ],
)
def test_only_stale_staging_of_this_converter_and_destination_is_removed(name, marker, removed, tmp_path):
    """Removed: a staging folder for DST `out` whose marker names a process of this host that is gone. Kept: one
    without a marker (not this converter's), of a running process (a conversion in progress), of another host
    (its processes cannot be checked), with an unreadable marker, or for another destination."""
    markers = {
        "dead": {"pid": finished_process_id(), "host": socket.gethostname()},
        "alive": {"pid": os.getpid(), "host": socket.gethostname()},
        "other_host": {"pid": finished_process_id(), "host": socket.gethostname() + "-elsewhere"},
    }
    folder = make_staging(tmp_path, name, markers.get(marker, marker))
    assert remove_stale_staging(tmp_path / "out") == ([folder] if removed else [])
    assert folder.exists() is not removed
