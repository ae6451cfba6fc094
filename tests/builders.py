"""Builders several test files share: the tiny model, its processor, prompts and pixels for it, LLaVA-format data
files, a saved tiny model folder, and a LoRA adapter that looks trained."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokenpacker_hf import TokenPackerForConditionalGeneration, TokenPackerImageProcessor, TokenPackerProcessor
from tokenpacker_hf.training import apply_preset

from tiny import IMAGE_TOKEN_ID, make_tokenizer, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENS = 4  # image tokens per tile of tiny_config: its 4x4 patch grid packed at scale factor 2
PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"


# ----------------------------------------------------------------------------------------------------------------
# The tiny model and its processor


def make_model(seed: int = 0, **config_overrides) -> TokenPackerForConditionalGeneration:
    """The tiny model with the weights of `seed`, in eval mode."""
    torch.manual_seed(seed)
    return TokenPackerForConditionalGeneration(tiny_config(**config_overrides)).eval()


def make_processor(
    image_mode: str = "pad", padding_side: str = "left", tokenizer: Any = None, **kwargs
) -> TokenPackerProcessor:
    """The tiny model's processor: `tokenizer` (default: the byte-level one padding on `padding_side`), images in
    `image_mode` at the tiny tower's 16 px tiles (up to 9 slices), and processor `kwargs` (separators, chat
    template)."""
    config = tiny_config()
    image_processor = TokenPackerImageProcessor.from_vision_config(config.vision_config, image_mode=image_mode)
    return TokenPackerProcessor.from_config(
        config, image_processor=image_processor, tokenizer=tokenizer or make_tokenizer(padding_side), **kwargs
    )


def save_tiny_model(folder: Path) -> Path:
    """A tiny model (seed 0) and its right-padding processor saved to `folder`, as training starts from."""
    torch.manual_seed(0)
    TokenPackerForConditionalGeneration(tiny_config()).save_pretrained(folder)
    make_processor(padding_side="right").save_pretrained(folder)
    return folder


def prompt(images: int = 1, tokens: int = TOKENS, text: tuple[int, ...] = (70, 71, 72)) -> list[int]:
    """`<s> text <image>*tokens text ...` with one image block per image."""
    ids = [1]
    for _ in range(images):
        ids += list(text) + [IMAGE_TOKEN_ID] * tokens
    return ids + [73, 74]


def pixels(tiles: int, seed: int = 1) -> torch.Tensor:
    """Random pixel values of `tiles` 16 px tiles."""
    return torch.randn(tiles, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of uniform noise."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def example_inputs(processor: TokenPackerProcessor) -> dict[str, torch.Tensor]:
    """One chat-formatted question about a small solid image, as model inputs."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", (24, 16), (200, 30, 90))
    return dict(processor(images=[image], text=text, return_tensors="pt"))


def trained_looking_lora(base: TokenPackerForConditionalGeneration):
    """The lora preset with nonzero `lora_B` and a changed projector copy, as after some training steps (fresh
    LoRA is an identity, which would make every comparison with the base model trivially pass)."""
    peft_model = apply_preset(base, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


# ----------------------------------------------------------------------------------------------------------------
# LLaVA-format data


def qa(question: str, answer: str, image: str | None = None) -> dict:
    """A one-turn LLaVA record, with `image` when given."""
    record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


def write_llava_dataset(root: Path, records: list, images: dict[str, tuple[int, int, int]] | None = None) -> Path:
    """Writes `records` to root/data.json and each `images[name] = (width, height, red)` to root/images/name."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, (width, height, red) in (images or {}).items():
        Image.new("RGB", (width, height), (red, 40, 200 - red)).save(root / "images" / name)
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def small_dataset(root: Path) -> Path:
    """Four image samples and one text-only sample."""
    records = [qa("<image>\nWhat colour?", f"Shade {i}.", f"{i}.png") for i in range(4)]
    records.append(qa("Say hi.", "Hi."))
    return write_llava_dataset(root, records, {f"{i}.png": (16 + 4 * i, 16, 60 * i) for i in range(4)})


def free_port() -> int:
    """A loopback port nothing listens on now, for a multi-process run's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(processes: int = 2) -> list[str]:
    """The `torchrun` launcher (as this interpreter's module) for `processes` local processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]  # fmt: skip
