"""The `tokenpacker-hf` command line: `generate` prints what the model generates, `info` describes a folder,
and input a user can fix gives one line on stderr and exit code 2."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from PIL import Image

import tokenpacker_hf
from tokenpacker_hf import TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker_hf.cli import StrippedStreamer, main
from tokenpacker_hf.tiny import make_tokenizer, tiny_config


def expected_answer(folder, paths, prompt: str, max_new_tokens: int) -> str:
    """The same request made with the library directly."""
    model = TokenPackerForConditionalGeneration.from_pretrained(folder).eval()
    processor = TokenPackerProcessor.from_pretrained(folder)
    images = [Image.open(path).convert("RGB") for path in paths]
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=text, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def test_generate_prints_the_models_greedy_answer(model_folder, image_files, capsys):
    argv = ["generate", "--model", str(model_folder), "--prompt", "What is it?", "--max-new-tokens", "6"]
    for path in image_files:
        argv += ["--image", str(path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed == expected_answer(model_folder, image_files, "What is it?", 6) + "\n"


def test_generate_runs_as_a_console_command(model_folder, image_files):
    """The installed entry point, in its own process, prints one answer line and nothing else on stdout."""
    command = [
        sys.executable,
        "-m",
        "tokenpacker_hf.cli",
        "generate",
        "--model",
        str(model_folder),
        "--image",
        str(image_files[0]),
        "--prompt",
        "What is it?",
        "--max-new-tokens",
        "4",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == expected_answer(model_folder, image_files[:1], "What is it?", 4) + "\n"


def test_info_describes_projector_token_budget_and_image_mode(model_folder, capsys):
    assert main(["info", str(model_folder)]) == 0
    printed = capsys.readouterr().out
    config = tiny_config()
    assert f"{config.num_image_tokens} tokens per {config.vision_config.image_size} px tile" in printed
    assert "projector: tokenpacker, scale factor 2" in printed
    assert "image mode: slice, up to 9 slices" in printed


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_model", "no model folder at"),
        ("folder_without_config", "is not a model folder: it has no config.json"),
        ("missing_image", "image not found:"),
        ("unreadable_image", "cannot read image"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(case, expected, model_folder, image_files, tmp_path, capsys):
    model, image = str(model_folder), str(image_files[0])
    if case == "missing_model":
        model = str(tmp_path / "no" / "such-model")
    elif case == "folder_without_config":
        model = str(tmp_path)
    elif case == "missing_image":
        image = str(tmp_path / "missing.png")
    else:
        (tmp_path / "broken.png").write_bytes(b"not an image")
        image = str(tmp_path / "broken.png")
    assert main(["generate", "--model", model, "--image", image, "--prompt", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err


def test_bad_input_in_a_real_process_has_no_traceback(model_folder, tmp_path):
    command = [
        sys.executable,
        "-m",
        "tokenpacker_hf.cli",
        "generate",
        "--model",
        str(model_folder),
        "--image",
        str(tmp_path / "missing.png"),
        "--prompt",
        "x",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert completed.stderr == f"error: image not found: {tmp_path / 'missing.png'}\n"


def test_info_refuses_a_model_that_is_not_tokenpacker(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path
    )
    assert main(["info", str(tmp_path)]) == 2
    assert "holds a 'llama' model, not a TokenPacker one" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Package conventions, decoding flags, streaming, a quiet success

REPO = Path(__file__).resolve().parents[1]
DIGITS_COMMAND = ["generate", "--model", "examples/models/tokenpacker-digits", "--image",
                  "examples/digits/sample_grid.png", "--prompt", "Read the digits."]  # fmt: skip


def run_module(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """`python -m tokenpacker_hf ARGS` in a fresh process, offline, as a user types it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "tokenpacker_hf", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_version_is_the_one_pyproject_declares(capsys):
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tokenpacker_hf.__version__ == declared
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr() == (f"tokenpacker-hf {declared}\n", "")


def test_shipped_model_streams_its_answer_and_nothing_else():
    """The README's main command with --stream, through `python -m`: the same answer alone on stdout and a silent
    stderr (test_digits_model runs the command as written and checks the same without --stream)."""
    completed = run_module(*DIGITS_COMMAND, "--stream")
    assert (completed.returncode, completed.stdout, completed.stderr) == (0, "3168\n", "")


def test_verbose_shows_the_loading_progress(model_folder, image_files, capsys):
    assert main(["generate", "--model", str(model_folder), "--image", str(image_files[0]), "--prompt", "x",
                 "--max-new-tokens", "2", "--verbose"]) == 0  # fmt: skip
    assert "Loading weights" in capsys.readouterr().err


def test_streamed_answer_equals_the_plain_one(model_folder, image_files, capsys):
    """Random weights answer with random bytes, spaces and newlines included: the streamed output is trimmed like
    the plain one. (The shipped model's streamed answer is checked in a real process above.)"""
    argv = ["generate", "--model", str(model_folder), "--image", str(image_files[0]), "--prompt", "What is it?",
            "--max-new-tokens", "24"]  # fmt: skip
    assert main(argv + ["--stream"]) == 0
    assert capsys.readouterr().out == expected_answer(model_folder, image_files[:1], "What is it?", 24) + "\n"


def test_the_quiet_default_is_undone_when_the_command_returns(model_folder, image_files, capsys):
    """`main` runs inside other programs too: transformers' logging and progress bars are left as they were."""
    from transformers.utils import logging

    before = (logging.get_verbosity(), logging.is_progress_bar_enabled())
    assert main(["generate", "--model", str(model_folder), "--image", str(image_files[0]), "--prompt", "x",
                 "--max-new-tokens", "1"]) == 0  # fmt: skip
    assert (logging.get_verbosity(), logging.is_progress_bar_enabled()) == before
    assert capsys.readouterr().err == ""


class RecordingStdout(io.StringIO):
    """stdout that remembers each write, to see text arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_streamer_prints_words_as_they_are_finalised_and_trims_like_strip(monkeypatch):
    tokenizer = make_tokenizer()
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    streamer = StrippedStreamer(tokenizer)
    streamer.put(torch.tensor([[1, 2]]))  # the prompt, skipped
    text = "  \n one two  three \n\n four  "
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert stdout.getvalue() == text.strip() + "\n"
    assert len([piece for piece in stdout.writes if piece.strip()]) >= 3  # word by word, not all at the end


def test_sampling_with_a_seed_repeats_and_beams_match_the_library(model_folder, image_files, capsys):
    base = ["generate", "--model", str(model_folder), "--image", str(image_files[0]), "--prompt", "What is it?",
            "--max-new-tokens", "8"]  # fmt: skip
    sampling = ["--do-sample", "--seed", "3", "--temperature", "1.5", "--top-p", "0.9"]
    assert main(base + sampling) == 0
    first = capsys.readouterr().out  # random weights sample any byte, newlines included
    assert main(base + sampling) == 0
    assert capsys.readouterr().out == first

    assert main(base + ["--num-beams", "3", "--attn-implementation", "eager"]) == 0
    model = TokenPackerForConditionalGeneration.from_pretrained(model_folder).eval()
    processor = TokenPackerProcessor.from_pretrained(model_folder)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[Image.open(image_files[0]).convert("RGB")], text=text, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=3)
    beams = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    assert capsys.readouterr().out == beams + "\n"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--stream", "--num-beams", "2"], "--stream prints one sequence as it is generated, but --num-beams 2"),
        (["--temperature", "0.5"], "--temperature applies only when sampling: add --do-sample"),
        (["--temperature", "0.5", "--top-p", "0.5"], "--temperature and --top-p apply only when sampling"),
        (["--revision", "v1"], "--revision v1 names a version of a Hub repo, but"),
        (["--attn-implementation", "bogus"], 'Specified `attn_implementation="bogus"` is not supported'),
    ],
)
def test_unusable_decoding_options_are_one_error_line(extra, expected, model_folder, image_files, capsys):
    argv = ["generate", "--model", str(model_folder), "--image", str(image_files[0]), "--prompt", "x", *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--num-beams", "0", "expected a number of at least 1, got 0"),
        ("--temperature", "-1", "expected a finite number above 0, got -1"),
        ("--temperature", "0", "expected a finite number above 0, got 0"),
        ("--temperature", "inf", "expected a finite number above 0, got inf"),
        ("--temperature", "nan", "expected a finite number above 0, got nan"),
        ("--temperature", "warm", "expected a number, got 'warm'"),
        ("--top-p", "1.5", "expected a number above 0 and at most 1, got 1.5"),
        ("--seed", "x", "invalid int value: 'x'"),
    ],
)
def test_out_of_range_decoding_values_name_the_flag(flag, value, expected, model_folder, image_files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(model_folder), "--image", str(image_files[0]), "--prompt", "x", flag, value])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert f"error: argument {flag}" in last and expected in last
