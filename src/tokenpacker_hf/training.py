# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""Finetuning TokenPacker with `transformers.Trainer`: a LLaVA-format dataset, a padding collator, the freezing
presets of the original two-stage recipe (paper §4, after LLaVA-1.5) plus LoRA. Model cards and
`push_to_hub` are in `tokenpacker_hf.hub`.

Samples are rendered as the original's training path renders them (`preprocess_multimodal` + the `vicuna_v1`
prompt of `preprocess_v1`, see `llava_to_messages`) and tokenised as its `tokenizer_image_token` did (see
`TokenPackerProcessor.encode_prompt`), so the ids equal the original's. Labels follow the original
`preprocess_v1`: only what the model has to generate after each `ASSISTANT:` generation prompt (the answer and its
`</s>`) is supervised; the system prompt, user turns and every image position are -100. The one deliberate
difference: the original finds each answer by splitting a round at the first `" ASSISTANT: "`, so a user turn
that itself holds that text gets its tail supervised; here answers are located by rendering turn by turn, and
user text is never supervised.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .image_processing_tokenpacker import to_rgb_image
from .processing_tokenpacker import pad_expanded, pad_row

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PRESETS = ("stage1", "stage2", "lora")
# LoRA on the language model's attention and MLP Linears only. PEFT reads a list of names as suffixes, so
# ["q_proj", ...] would also hit the vision tower's and the projector's q/k/v projections; a regex is matched
# against the whole module name.
LORA_TARGET_MODULES = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SkipSample(Exception):
    """A sample that cannot be trained on; `reason` is the key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Conversations and labels


def llava_to_messages(conversations: list[dict[str, str]], image_token: str = "<image>") -> list[dict[str, Any]]:
    """LLaVA turns (`{"from": "human"|"gpt"|"system", "value": str}`) -> chat-template messages whose content is
    the turn's text exactly as the original's training path renders it (`preprocess_multimodal`).

    A turn holding `image_token` becomes `"<image>\\n" + the rest of its text stripped`, then stripped again: the
    image moves to the front and the turn loses its outer whitespace. Every other turn, and every turn of a
    text-only sample, is kept as it is, whitespace included. One quirk of the original is kept on purpose: a turn
    that is only `<image>` renders as `USER: <image> ASSISTANT:` in training (the final strip removes the "\\n"),
    while the original's evaluation prompt (and this package's chat template with an image item) has
    `<image>\\n`. A turn with n > 1 markers (the original trains one image per sample) gets n `<image>\\n` in front.

    A leading assistant turn is dropped, as the original does. Raises `SkipSample("malformed")` for turns that
    are not `{"from", "value"}` dicts with a known role, or a conversation without a user and an assistant turn.
    """
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise SkipSample(
                "malformed", f"expected turns {{'from': one of {sorted(LLAVA_ROLES)}, 'value': str}}, got {turn!r}"
            )
        role, value = LLAVA_ROLES[turn["from"]], turn["value"]
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            continue
        if image_token in value:
            count = value.count(image_token)
            value = ((image_token + "\n") * count + value.replace(image_token, "").strip()).strip()
        messages.append({"role": role, "content": value})
    roles = {m["role"] for m in messages}
    if not {"user", "assistant"} <= roles:
        raise SkipSample("malformed", f"a conversation needs a user and an assistant turn, got roles {sorted(roles)}")
    return messages


def supervised_char_spans(processor: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model must generate (each assistant turn after its
    generation prompt, through its end token).

    Rendered turn by turn: for assistant message k the span runs from the end of `messages[:k]` + generation
    prompt to the end of `messages[:k+1]`. This needs a prefix-stable chat template, which is checked.
    """

    def render(prefix: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return processor.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through = render(messages[:k], generation_prompt=True), render(messages[: k + 1])
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ValueError(
                "the chat template is not prefix-stable: rendering the conversation turn by turn does not give "
                f"prefixes of the full rendering (turn {k}), so answer boundaries cannot be located"
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def token_labels(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Per token, its id if its characters overlap a supervised span, else -100 (special tokens added by the
    tokenizer, such as BOS, have empty offsets and are never supervised)."""
    labels = []
    for token_id, (start, end) in zip(input_ids, offsets, strict=True):
        inside = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return labels


def expanded_spans(spans: list[tuple[int, int]], replacements: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Character spans of a prompt moved into the text where each `<image>` is written as its token layout
    (the processor's `text_replacement_offsets` for that prompt: `span` before, `new_span` after)."""
    placeholder_ends = [entry["span"][1] for entry in replacements]
    gained = [0] + [entry["new_span"][1] - entry["span"][1] for entry in replacements]
    return [
        tuple(char + gained[bisect.bisect_right(placeholder_ends, char)] for char in span)  # type: ignore[misc]
        for span in spans
    ]


def image_tokens_end(offsets: list[tuple[int, int]], replacements: list[dict[str, Any]]) -> int:
    """Position after the last image's last token (separators included; 0 without images): a sequence cut before
    it would lose part of an image."""
    if not replacements:
        return 0
    last_start, last_end = replacements[-1]["new_span"]
    return 1 + max(index for index, (begin, end) in enumerate(offsets) if last_start <= begin and end <= last_end)


def encode_conversation(
    processor: Any, messages: list[dict[str, Any]], images: list[Image.Image], max_length: int | None = None
) -> dict[str, Any]:
    """One training example: the processor's ids (each `<image>` expanded to its token layout) and labels.

    Returns `input_ids [L]`, `labels [L]` (-100 outside the answers and on every image position), and with
    images `pixel_values [tiles, 3, S, S]` and `image_grids [num_images, 2]`, plus `truncated` (bool).
    A sequence over `max_length` (default `tokenizer.model_max_length`) loses text from its end only; it is
    skipped (`SkipSample`) if that would cut an image's tokens or leave no answer token.

    The conversation is tokenised once: the processor's character offsets (in the text with each image written
    out) place the supervised spans on the expanded ids, as transformers' assistant masks do for TRL.
    """
    tokenizer = processor.tokenizer
    if not tokenizer.is_fast:
        raise ValueError(
            f"label masking needs character offsets, i.e. a fast tokenizer; got {type(tokenizer).__name__}"
        )
    text, spans = supervised_char_spans(processor, messages)
    features = processor(
        images=images or None, text=text, return_offsets_mapping=True, return_text_replacement_offsets=True
    )
    ids, offsets, replacements = (
        features[key][0] for key in ("input_ids", "offset_mapping", "text_replacement_offsets")
    )
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.tensor(token_labels(ids, offsets, expanded_spans(spans, replacements)), dtype=torch.long)

    max_length = max_length or tokenizer.model_max_length
    truncated = len(input_ids) > max_length
    if truncated:
        image_end = image_tokens_end(offsets, replacements)
        if image_end > max_length:
            raise SkipSample(
                "image_tokens_exceed_max_length",
                f"the image tokens end at position {image_end}, beyond max_length={max_length}",
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise SkipSample("no_answer_tokens", f"no answer token within max_length={max_length}")
    example = {"input_ids": input_ids, "labels": labels, "truncated": truncated}
    if images:
        example["pixel_values"] = features["pixel_values"]
        example["image_grids"] = torch.stack(features["image_grids"])  # one per image with replacement offsets
    return example


# ----------------------------------------------------------------------------------------------------------------
# Dataset and collator


@dataclass(frozen=True)
class UnparsableLine:
    """A `.jsonl` line that is not valid JSON, kept in place of its record so the dataset counts it as a skip."""

    line_number: int
    error: str


def read_utf8_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); anything else is a ValueError naming the
    file and the line of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}: expected UTF-8 text, but line {line} holds the byte 0x{data[error.start]:02X}, which is not "
            "UTF-8; re-save the file as UTF-8"
        ) from None


def load_llava_records(data_path: str | os.PathLike) -> list[Any]:
    """Records of a LLaVA-format `.json` (a list) or `.jsonl` (one record a line) file.

    A `.jsonl` line that is not valid JSON becomes an [`UnparsableLine`], which the dataset skips and counts,
    like any other unusable record. A file that is empty, not UTF-8, or (`.json`) not a valid JSON list raises a
    ValueError naming the file and, for JSON errors, the line and column.
    """
    text = read_utf8_text(data_path)
    if not text.strip():
        raise ValueError(
            f"{data_path}: the file is empty; expected LLaVA samples (a JSON list, or one per line in .jsonl)"
        )
    if str(data_path).endswith(".jsonl"):
        # Split on "\n" only: JSON strings may hold other line separators (U+2028) unescaped.
        return [_parse_jsonl_line(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (one sample per line? name the file .jsonl)" if error.msg == "Extra data" else ""
        raise ValueError(
            f"{data_path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}{hint}"
        ) from None
    if not isinstance(records, list):
        raise ValueError(f"{data_path}: expected a JSON list of samples, got a {type(records).__name__}")
    return records


def _parse_jsonl_line(number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return UnparsableLine(number, f"{error.msg} at column {error.colno}")


def image_paths(record: dict[str, Any], image_folder: str | os.PathLike | None) -> list[str]:
    """The record's image files (`"image"`: a path or a list of paths, relative to `image_folder`); any other
    value is a `SkipSample("malformed")`."""
    images = record.get("image")
    if images is None:
        return []
    names = [images] if isinstance(images, str) else images
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise SkipSample("malformed", f"expected 'image' to be a path or a list of paths, got {str(images)[:200]}")
    return [os.path.join(image_folder or "", name) for name in names]


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format conversations with images, encoded for [`TokenPackerCollator`].

    Records: `{"image": "rel/path.jpg" | [paths] (optional), "conversations": [{"from": "human", "value":
    "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`.

    A scan at construction drops (and counts in `skipped`, by reason) `.jsonl` lines that are not valid JSON
    (`invalid_json`, logged with their line number), malformed records, records whose `<image>` count differs
    from their number of images, and records with a missing image file. A sample that fails later (an image that
    is unreadable, truncated, too large to decode safely or gone, or a sample too long to keep its image tokens
    whole) is counted as well and replaced by the next usable one, so an epoch never stops on one bad sample.
    `truncated` counts samples whose text was cut to `max_length`. With dataloader workers, counts after
    construction stay in the workers (each skip is still logged).

    Raises `ValueError` naming the file when it is empty, not UTF-8, not valid JSON (`.json`), or holds no
    sample or no usable one.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        processor: Any,
        image_folder: str | os.PathLike | None = None,
        max_length: int | None = None,
    ):
        self.data_path, self.processor = data_path, processor
        self.image_folder, self.max_length = image_folder, max_length
        records = load_llava_records(data_path)
        if not records:
            raise ValueError(f"{data_path}: the dataset holds no samples")
        self.skipped: Counter[str] = Counter()
        self.truncated: set[int] = set()
        self.samples: list[tuple[list[dict[str, Any]], list[str]]] = []
        for index, record in enumerate(records):
            try:
                self.samples.append(self._scan(record))
            except SkipSample as skip:
                self.skipped[skip.reason] += 1
                logger.warning("%s: skipping sample %d (%s): %s", data_path, index, skip.reason, skip)
        if not self.samples:
            raise ValueError(
                f"{data_path}: none of its {len(records)} samples is usable (skipped: {dict(self.skipped)})"
            )
        if self.skipped:
            logger.warning("%s: kept %d samples, skipped %s", data_path, len(self.samples), dict(self.skipped))
        self._failed: set[int] = set()

    def _scan(self, record: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """(messages, image paths) of a record, or `SkipSample` for what can be checked without decoding."""
        if isinstance(record, UnparsableLine):
            raise SkipSample("invalid_json", f"line {record.line_number} is not valid JSON: {record.error}")
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise SkipSample("malformed", f"expected {{'conversations': [...]}}, got {str(record)[:200]}")
        image_token = self.processor.image_token
        messages = llava_to_messages(record["conversations"], image_token)
        paths = image_paths(record, self.image_folder)
        markers = sum(turn["value"].count(image_token) for turn in record["conversations"])
        placed = sum(m["content"].count(image_token) for m in messages if m["role"] == "user")
        if markers != len(paths) or placed != markers:
            raise SkipSample(
                "image_count_mismatch",
                f"{markers} {image_token} marker(s) ({placed} in user turns) but {len(paths)} image(s) {paths}",
            )
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise SkipSample("missing_image", f"image file(s) not found: {missing}")
        return messages, paths

    def __len__(self) -> int:
        return len(self.samples)

    def encode(self, index: int) -> dict[str, Any]:
        """Sample `index` encoded; raises `SkipSample` when it cannot be used."""
        messages, paths = self.samples[index]
        images = []
        for path in paths:
            try:
                images.append(to_rgb_image(path))
            # OSError includes FileNotFoundError (an image removed after the scan); the loader raises ValueError for
            # everything else it cannot use, a decompression bomb included.
            except (OSError, ValueError) as error:
                raise SkipSample("unreadable_image", f"cannot read {path}: {error}") from error
        example = encode_conversation(self.processor, messages, images, self.max_length)
        if example.pop("truncated"):
            self.truncated.add(index)
        return example

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            if candidate in self._failed:
                continue
            try:
                return self.encode(candidate)
            except SkipSample as skip:
                self._failed.add(candidate)
                self.skipped[skip.reason] += 1
                logger.warning("%s: skipping sample %d (%s): %s", self.data_path, candidate, skip.reason, skip)
        raise RuntimeError(f"{self.data_path}: no usable sample left (skipped: {dict(self.skipped)})")


@dataclass
class TokenPackerCollator:
    """Pads encoded examples into a batch for `TokenPackerForConditionalGeneration.forward`.

    Returns `input_ids`, `attention_mask`, `labels` `[B, L]` (padding: pad id / 0 / -100, on `padding_side`),
    and when any example has images `pixel_values [Σtiles, 3, S, S]` and `image_grids [Σimages, 2]` in batch
    order; text-only examples contribute no tiles.

    `blank_image_for_text_only=True` (for several processes) gives a batch without images one blank image that
    changes nothing: see `add_blank_image`.
    """

    processor: Any
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    blank_image_for_text_only: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.processor.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (the original uses unk)")
        sequences = [torch.as_tensor(example["input_ids"]).tolist() for example in examples]
        tokenizer, side = self.processor.tokenizer, self.padding_side
        padded = pad_expanded(
            tokenizer, sequences, pad_to_multiple_of=self.pad_to_multiple_of, padding_side=side, return_tensors="pt"
        )
        batch = dict(padded)
        length = batch["input_ids"].shape[1]
        labels = [torch.as_tensor(example["labels"]).tolist() for example in examples]
        batch["labels"] = torch.tensor([pad_row(row, length - len(row), IGNORE_INDEX, side) for row in labels])
        with_images = [example for example in examples if "pixel_values" in example]
        if with_images:
            batch["pixel_values"] = torch.cat([example["pixel_values"] for example in with_images])
            batch["image_grids"] = torch.cat([example["image_grids"] for example in with_images])
        elif self.blank_image_for_text_only:
            batch = add_blank_image(batch, self.processor)
        return batch


def add_blank_image(batch: dict[str, torch.Tensor], processor: Any) -> dict[str, torch.Tensor]:
    """`batch` (text only, no `pixel_values`) with one blank image whose tokens follow the end of row 0, masked
    out (attention 0, labels -100); the other rows are padded to the new length.

    Under FSDP or DeepSpeed ZeRO-3 every rank must run the same sharded modules in the same order: a rank whose
    batch is text only would skip the vision tower and projector while the others gather their parameters (a
    hang on NCCL; gloo's "Received data size doesn't match expected size"), and under DDP it would leave the
    projector without gradients. With the blank image every rank runs them. It changes no loss or gradient:
    its positions come after every real token, which causal attention never lets read them, and they are
    unsupervised, so the projector gets exact zeros from this rank, as from a rank that had no image.
    """
    encoded = processor.image_processor(Image.new("RGB", (1, 1)))
    grid = tuple(encoded["image_grids"][0].tolist())
    image_ids = torch.tensor(processor.image_token_layout(grid), dtype=torch.long)
    rows, length = batch["input_ids"].shape
    extra = {
        "input_ids": torch.full((rows, len(image_ids)), processor.tokenizer.pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((rows, len(image_ids)), dtype=torch.long),
        "labels": torch.full((rows, len(image_ids)), IGNORE_INDEX, dtype=torch.long),
    }
    extra["input_ids"][0] = image_ids
    padded = {key: torch.cat([batch[key], extra[key]], dim=1) for key in extra}
    return {**batch, **padded, "pixel_values": encoded["pixel_values"], "image_grids": encoded["image_grids"]}


# ----------------------------------------------------------------------------------------------------------------
# Freezing presets


def vision_tower_used_modules(tower: nn.Module, config: Any) -> list[nn.Module]:
    """The tower modules that shape the projector's input: embeddings, CLIP's pre-norm and the encoder layers up
    to the deepest one read. Deeper layers and the post-norm never run, and would leave DDP waiting for grads."""
    used = [tower.embeddings, *tower.encoder.layers[: max(config.vision_layers_needed)]]
    if getattr(tower, "pre_layrnorm", None) is not None:
        used.append(tower.pre_layrnorm)
    return used


def apply_preset(
    model: nn.Module,
    preset: str,
    *,
    unfreeze_vision_tower: bool = False,
    lora_r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str = LORA_TARGET_MODULES,
) -> nn.Module:
    """Sets which parameters of a `TokenPackerForConditionalGeneration` train, as in the paper's recipe.

    - `stage1`: the projector only (alignment pre-training).
    - `stage2`: the projector, the language model and its head (instruction tuning).
    - `lora`: LoRA (`lora_r`, `lora_alpha`, `lora_dropout`) on the LLM's attention and MLP Linears, the projector
      trained fully through `modules_to_save`; returns the `PeftModel`.

    The vision tower stays frozen (the model then runs it without autograd, also under gradient checkpointing)
    unless `unfreeze_vision_tower`, which trains the tower layers that are actually run.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    model.requires_grad_(False)
    base = model.model
    if preset == "lora":
        from peft import LoraConfig, get_peft_model

        modules_to_save = ["multi_modal_projector"] + (["vision_tower"] if unfreeze_vision_tower else [])
        lora_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_target_modules,
            modules_to_save=modules_to_save,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
        if unfreeze_vision_tower:
            # modules_to_save copies the whole tower trainable; only the layers that run may need grads.
            saved_tower = model.base_model.model.model.vision_tower.modules_to_save["default"]
            saved_tower.requires_grad_(False)
            for module in vision_tower_used_modules(saved_tower, base.config):
                module.requires_grad_(True)
        return model
    base.multi_modal_projector.requires_grad_(True)
    if preset == "stage2":
        base.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if unfreeze_vision_tower:
        for module in vision_tower_used_modules(base.vision_tower, base.config):
            module.requires_grad_(True)
    return model
