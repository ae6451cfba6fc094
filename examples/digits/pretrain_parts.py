"""Pretrain the two parts of the miniature recipe: a small CLIP vision tower and a small Llama, saved as ordinary
`CLIPVisionModel` and `LlamaForCausalLM` folders that know nothing of TokenPacker.

The paper starts from CLIP and Vicuna. Neither can be downloaded here, so this script makes stand-ins on the
digits data, each trained the way its real counterpart was: on its own modality, without the other.

- The tower (32 px, 4 px patches, 4 layers of width 128, as in `train.py`) learns digit classification on the
  training scans: each quadrant of a 2×2 grid is classified from the mean of its 4×4 patch features (a linear
  head, discarded afterwards). It is saved with a `CLIPImageProcessor` that normalises as it was trained.
- The Llama (2 layers of width 128) learns the task's text with each image replaced by its transcription,
  `USER: 3168\\nRead the digits. ASSISTANT: 3168</s>`, on random digit strings: it can copy digits from its
  prompt and knows the answer format, but has never seen an image. Its tokenizer is the package's byte-level
  vocabulary without `<image>`, as a real LLM's has none; composing adds it.

    python examples/digits/pretrain_parts.py --data_dir DATA --output_dir PARTS   # PARTS/clip-digits, llama-digits
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
import train
from torch import nn
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from tokenpacker_hf.image_processing_tokenpacker import to_rgb_image
from tokenpacker_hf.tiny import make_tokenizer

GRID = 2  # digits per side of an image


def tower_config() -> CLIPVisionConfig:
    """The digits model's tower (see `train.digits_config`)."""
    return CLIPVisionConfig(**train.digits_config().vision_config.to_dict())


def llm_config(vocab_size: int) -> LlamaConfig:
    """The digits model's language model (see `train.digits_config`), sized for `vocab_size` tokens."""
    text = train.digits_config().text_config.to_dict()
    text.update(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**text)


def load_split(data_dir: Path, split: str, image_processor: CLIPImageProcessor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [N, 3, 32, 32], labels [N, 4]) of a make_data split; labels are the digits in raster order."""
    records = json.loads((data_dir / f"{split}.json").read_text())
    images = [to_rgb_image(data_dir / record["image"]) for record in records]
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.tensor([[int(digit) for digit in record["conversations"][1]["value"]] for record in records])
    return pixels, labels


class QuadrantClassifier(nn.Module):
    """The tower plus a linear head that names the digit in each quadrant from its patches' mean feature."""

    def __init__(self, tower: CLIPVisionModel):
        super().__init__()
        self.tower = tower
        width = tower.config.hidden_size
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> logits [B, GRID², 10], quadrants in raster order."""
        patches = self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop the class token
        batch, count, width = patches.shape
        side = int(count**0.5)
        cell = side // GRID
        grid = patches.reshape(batch, GRID, cell, GRID, cell, width)
        quadrants = grid.mean(dim=(2, 4)).reshape(batch, GRID * GRID, width)
        return self.head(self.norm(quadrants))


def fit(model: nn.Module, batch_loss: Callable[[], torch.Tensor], steps: int, lr: float, description: str) -> float:
    """`steps` AdamW steps on `batch_loss()` (a fresh batch each call) with a cosine schedule after a 5% warm-up,
    as the Trainer's defaults here; leaves `model` in eval mode and returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    model.train()
    for _ in (bar := tqdm(range(steps), desc=description, unit="step")):
        loss = batch_loss()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def pretrain_tower(data_dir: Path, out: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Trains the tower on quadrant classification (see `QuadrantClassifier`); saves it and its image processor to
    `out`."""
    torch.manual_seed(seed)
    config = tower_config()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": config.image_size}, crop_size={"height": config.image_size, "width": config.image_size}
    )
    train_pixels, train_labels = load_split(data_dir, "train", image_processor)
    test_pixels, test_labels = load_split(data_dir, "test", image_processor)
    model = QuadrantClassifier(CLIPVisionModel(config))
    generator = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        index = torch.randint(len(train_pixels), (batch_size,), generator=generator)
        logits = model(train_pixels[index])
        return nn.functional.cross_entropy(logits.flatten(0, 1), train_labels[index].flatten())

    fit(model, batch_loss, steps, lr, "pretraining the tower")
    with torch.inference_mode():
        predicted = torch.cat([model(chunk).argmax(-1) for chunk in test_pixels.split(256)])
    model.tower.save_pretrained(out)
    image_processor.save_pretrained(out)
    return {"steps": steps, "held_out_digit_accuracy": (predicted == test_labels).float().mean().item()}


def llm_tokenizer() -> PreTrainedTokenizerFast:
    """The package's byte-level tokenizer without `<image>` (vocab 260), with the digits chat template."""
    tokenizer = make_tokenizer(padding_side="right", image_token=False)
    tokenizer.chat_template = train.CHAT_TEMPLATE
    return tokenizer


def transcribed_conversation(tokenizer: PreTrainedTokenizerFast, rng: random.Random) -> str:
    """The task's conversation with its image replaced by its transcription (random digits)."""
    digits = "".join(rng.choice("0123456789") for _ in range(GRID * GRID))
    question = train.QUESTION
    messages = [{"role": "user", "content": f"{digits}\n{question}"}, {"role": "assistant", "content": digits}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def pretrain_llm(out: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """Trains the Llama on transcribed conversations; saves it and its tokenizer to `out`."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = llm_tokenizer()
    model = LlamaForCausalLM(llm_config(len(tokenizer)))

    def batch_loss() -> torch.Tensor:
        texts = [transcribed_conversation(tokenizer, rng) for _ in range(batch_size)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels).loss

    loss = fit(model, batch_loss, steps, lr, "pretraining the LLM")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"steps": steps, "final_loss": loss}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, required=True, help="make_data.py folder (generated if empty)")
    parser.add_argument("--output_dir", type=Path, required=True, help="gets clip-digits/ and llama-digits/")
    parser.add_argument("--tower_steps", type=int, default=400)
    parser.add_argument("--llm_steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tower_lr", type=float, default=1e-3)
    parser.add_argument("--llm_lr", type=float, default=1e-3)
    parser.add_argument("--num_train", type=int, default=8000, help="grids generated when data_dir has none")
    parser.add_argument("--num_test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train.ensure_data(args.data_dir, args.num_train, args.num_test, seed=0)
    results = {
        "tower": pretrain_tower(
            args.data_dir, args.output_dir / "clip-digits", args.tower_steps, args.batch_size, args.tower_lr, args.seed
        ),
        "llm": pretrain_llm(args.output_dir / "llama-digits", args.llm_steps, args.batch_size, args.llm_lr, args.seed),
    }
    (args.output_dir / "pretraining.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
