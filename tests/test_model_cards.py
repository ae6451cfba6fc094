"""Model cards run as written and carry the Hub's metadata: the shipped digits model's card (its snippet reads
the sample grid), and the cards `tokenpacker-hf convert` and `model_card` write (they name the folder or repo the
reader loads, never a staging folder)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard
from PIL import Image

from tokenpacker_hf import TokenPackerConfig, TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker_hf.hub import CardExample, model_card
from tokenpacker_hf.tiny import tiny_config

from builders import make_processor
from card_utils import image_proxy, python_block
from subprocess_utils import run_without_package

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "models" / "tokenpacker-digits"


def load_train_script():
    """examples/digits/train.py as a module: it imports its sibling make_data, and its dataclasses need the
    module registered while they are built."""
    folder = str(REPO / "examples" / "digits")
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("digits_train", REPO / "examples" / "digits" / "train.py")
    module = sys.modules["digits_train"] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)
        del sys.modules["digits_train"]


def test_digits_card_snippet_runs_as_written_and_reads_the_sample_grid(tmp_path):
    """From the repository root, as the card says, by a user without the package: it prints the grid's digits."""
    code = python_block((DIGITS / "README.md").read_text())
    child = run_without_package(code, cwd=REPO, env_extra={"HF_HOME": str(tmp_path / "hf_home")}, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines()[-1] == "3168"


def test_digits_card_is_train_py_s_card_with_the_measured_metadata():
    train = load_train_script()
    results = json.loads((DIGITS / "eval_results.json").read_text())
    written = train.digits_model_card(
        TokenPackerConfig.from_pretrained(DIGITS), TokenPackerProcessor.from_pretrained(DIGITS), results
    )
    assert (DIGITS / "README.md").read_text() == str(written)

    card = ModelCard.load(DIGITS / "README.md")
    assert card.data.license == "apache-2.0"  # the package's: the model was trained here, from scratch
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert card.data.base_model is None
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert metrics == {"accuracy": results["digit_accuracy"], "exact_match": results["exact_match"]}
    assert {result.task_type for result in card.data.eval_results} == {"image-text-to-text"}


def photo(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8))


def run_generic_snippet(card: str, cwd: Path) -> subprocess.CompletedProcess:
    """The card's snippet as written; its image URL is fetched through a local proxy serving a photo."""
    with image_proxy(photo()) as (proxy_env, requested):
        child = run_without_package(python_block(card), cwd=cwd, env_extra=proxy_env, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert requested == [CardExample().image], requested
    return child


def test_generic_card_snippet_runs_as_written_on_a_saved_folder(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    folder = tmp_path / "my-tokenpacker"
    TokenPackerForConditionalGeneration(config).save_pretrained(folder)
    processor = make_processor()
    processor.save_pretrained(folder)
    card = model_card(
        config,
        "my-tokenpacker",
        image_processor=processor.image_processor,
        base_models=["openai/clip-vit-large-patch14-336"],
        datasets=["liuhaotian/LLaVA-Instruct-150K"],
    )
    card.save(folder / "README.md")

    run_generic_snippet(str(card), cwd=tmp_path)
    data = ModelCard.load(folder / "README.md").data
    assert data.license == "unknown"  # nobody stated one
    assert data.base_model == ["openai/clip-vit-large-patch14-336"]
    assert data.datasets == ["liuhaotian/LLaVA-Instruct-150K"]
    assert data.pipeline_tag == "image-text-to-text" and data.library_name == "transformers"


def test_converted_card_names_the_destination_inherits_the_license_and_runs(tmp_path, monkeypatch, tiny_original):
    """`convert SRC DST` with relative paths, as typed in a shell: the card's title and snippet say DST."""
    from tokenpacker_hf.convert_tokenpacker_original import convert_original_checkpoint

    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=1)
    (src / "README.md").write_text("---\nlicense: llama2\ndatasets:\n- liuhaotian/LLaVA-Pretrain\n---\n\n# original\n")
    monkeypatch.chdir(tmp_path)
    convert_original_checkpoint("src", "tp-converted")

    card = (tmp_path / "tp-converted" / "README.md").read_text()
    assert "converting" not in card
    assert "\n# tp-converted\n" in card and 'from_pretrained("tp-converted", trust_remote_code=True' in card
    data = ModelCard.load(tmp_path / "tp-converted" / "README.md").data
    assert data.license == "llama2" and data.datasets == ["liuhaotian/LLaVA-Pretrain"]
    assert data.pipeline_tag == "image-text-to-text" and data.library_name == "transformers"
    run_generic_snippet(card, cwd=tmp_path)
