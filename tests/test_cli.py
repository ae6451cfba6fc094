"""The `tokenpacker-hf` command line: `generate` prints what the model generates, `info` describes a folder,
and input a user can fix gives one line on stderr and exit code 2."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tokenpacker_hf import TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker_hf.cli import main
from tokenpacker_hf.image_processing_tokenpacker import TokenPackerImageProcessor

from tokenpacker_hf.tiny import make_tokenizer, tiny_config


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A saved tiny model (random weights) with a slice-mode processor."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = tiny_config()
    TokenPackerForConditionalGeneration(config).save_pretrained(folder)
    image_processor = TokenPackerImageProcessor.from_vision_config(config.vision_config, image_mode="slice")
    TokenPackerProcessor.from_config(config, image_processor=image_processor, tokenizer=make_tokenizer()).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(24, 40), (16, 16)]):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


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
    command = [sys.executable, "-m", "tokenpacker_hf.cli", "generate", "--model", str(model_folder),
               "--image", str(image_files[0]), "--prompt", "What is it?", "--max-new-tokens", "4"]
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
    command = [sys.executable, "-m", "tokenpacker_hf.cli", "generate", "--model", str(model_folder),
               "--image", str(tmp_path / "missing.png"), "--prompt", "x"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert completed.stderr == f"error: image not found: {tmp_path / 'missing.png'}\n"


def test_info_refuses_a_model_that_is_not_tokenpacker(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 2
    assert "holds a 'llama' model, not a TokenPacker one" in capsys.readouterr().err
