"""Fixtures shared by test files: the real LLaMA vocabulary (read from the cache the README's test command fills;
never downloaded at test time) and LLaMA tokenizers built from it, local Hub servers, a saved tiny model folder
with images to ask it about, and a synthetic original checkpoint. Plain builders are in `builders.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants as hf_constants
import numpy as np
import pytest
import torch
from PIL import Image

from tokenpacker_hf import TokenPackerForConditionalGeneration

from builders import make_processor
from hub_server import LocalHub, point_clients_at
from llama_vocab import llama_vocabulary, make_llama_tokenizer
from original_checkpoint import TINY_LM, TINY_TOWER, Original
from tiny import tiny_config


@pytest.fixture(scope="session")
def llama_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """(pieces in id order, merges) of the 32,000-token LLaMA tokenizer."""
    try:
        return llama_vocabulary()
    except FileNotFoundError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def llama_tokenizers(llama_vocab) -> dict[bool, object]:
    """{legacy: LlamaTokenizer} for legacy False (what the released TokenPacker repos ship) and True. Shared by the
    session: do not modify them."""
    return {legacy: make_llama_tokenizer(*llama_vocab, legacy=legacy) for legacy in (False, True)}


@pytest.fixture
def local_hub() -> Iterator[LocalHub]:
    """A local Hub server, reached only by clients given its url."""
    with LocalHub() as running:
        yield running


@pytest.fixture
def hub(local_hub, tmp_path, monkeypatch) -> Iterator[LocalHub]:
    """A local Hub server this process's clients talk to, with a private, empty download cache."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    with point_clients_at(local_hub):
        yield local_hub


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A saved tiny model (random weights) with a slice-mode processor."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    TokenPackerForConditionalGeneration(tiny_config()).save_pretrained(folder)
    make_processor("slice").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """Two noise images, 40x24 and 16x16."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(24, 40), (16, 16)]):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tiny_original() -> Original:
    """An original model at scale factor 2, for tests that only need some valid checkpoint to write or break."""
    return Original(TINY_TOWER, TINY_LM, scale_factor=2, seed=9)
