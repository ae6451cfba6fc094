# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""`tokenpacker-hf`: read images with a TokenPacker model, describe a model folder, convert original checkpoints.

    tokenpacker-hf generate --model DIR_OR_REPO --image IMG [--image IMG ...] --prompt TEXT
    tokenpacker-hf info DIR_OR_REPO
    tokenpacker-hf convert SRC DST [--vision-tower ID] [--scale-factor S] [--max-slices N] [--dtype bfloat16]

Errors a user can fix (a missing folder or image, an unreadable image, a checkpoint that is not TokenPacker's)
print one line `error: ...` on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """Something the user passed cannot be used; the message is the whole explanation."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenpacker-hf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer a prompt about one or more images")
    generate.add_argument("--model", required=True, help="model folder or Hub repo id")
    generate.add_argument("--image", required=True, action="append", help="image file; repeat for several")
    generate.add_argument("--prompt", required=True, help="the question, without <image> (added per image)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--dtype", choices=DTYPES, default="float32")
    generate.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")

    info = commands.add_parser("info", help="print what a model folder holds: projector, token budget, towers")
    info.add_argument("model", help="model folder or Hub repo id")

    convert = commands.add_parser("convert", help="convert an original (LLaVA-format) TokenPacker checkpoint")
    convert.add_argument("src", help="original checkpoint folder or Hub repo id (e.g. sunshine-lwt/TokenPacker-7b-144token)")
    convert.add_argument("dst", help="output folder (must not exist or be empty)")
    convert.add_argument(
        "--vision-tower", default=None, help="CLIP tower to take when the checkpoint holds none "
        "(default: openai/clip-vit-large-patch14-336)"
    )
    convert.add_argument("--scale-factor", type=int, default=None, help="override the resolved scale factor")
    convert.add_argument("--max-slices", type=int, default=None, help="override the resolved HD slice count")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="default: keep the checkpoint's dtype")
    convert.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the result to this repo")
    return parser


def check_model_reference(model: str) -> None:
    """A path that does not exist is only accepted when it could be a Hub repo id (`owner/name`)."""
    if Path(model).exists():
        if not (Path(model) / "config.json").is_file():
            raise UsageError(f"{model} is not a model folder: it has no config.json")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UsageError(f"no model folder at {model}") from None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UsageError(f"no model folder at {model}")


def load_images(paths: list[str]) -> list[Any]:
    """Opens each image as RGB, naming the file that is missing or unreadable."""
    from .image_processing_tokenpacker import to_rgb_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"image not found: {path}")
        try:
            images.append(to_rgb_image(path))
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read image {path}: {error}") from None
    return images


def generate(args: argparse.Namespace) -> str:
    """Greedy answer of the model to `args.prompt` about `args.image`, decoded without special tokens."""
    check_model_reference(args.model)
    images = load_images(args.image)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import tokenpacker_hf  # noqa: F401  (registers the Auto classes, so the installed code is used)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    except OSError as error:
        raise UsageError(f"cannot load {args.model}: {str(error).splitlines()[0]}") from None
    model.to(device).eval()
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def info(args: argparse.Namespace) -> str:
    """A few lines describing a model folder from its config and processor config, without loading weights."""
    check_model_reference(args.model)
    from transformers import AutoConfig, AutoImageProcessor

    import tokenpacker_hf  # noqa: F401

    config = AutoConfig.from_pretrained(args.model)
    if config.model_type != "tokenpacker":
        raise UsageError(f"{args.model} holds a {config.model_type!r} model, not a TokenPacker one")
    vision, text = config.vision_config, config.text_config
    lines = [
        f"projector: {config.projector_type}, scale factor {config.scale_factor}, "
        f"{config.num_image_tokens} tokens per {vision.image_size} px tile "
        f"(from {config.patch_grid_size}x{config.patch_grid_size} patches)",
        f"vision tower: {vision.model_type}, {vision.num_hidden_layers} layers, width {vision.hidden_size}; "
        f"point queries from layer {config.vision_feature_layer}, region keys from {config.region_feature_layers}",
        f"language model: {text.model_type}, {text.num_hidden_layers} layers, width {text.hidden_size}, "
        f"vocabulary {text.vocab_size}",
    ]
    try:
        image_processor = AutoImageProcessor.from_pretrained(args.model)
    except OSError:
        lines.append("image processor: none saved")
    else:
        mode = getattr(image_processor, "image_mode", "?")
        slices = f", up to {image_processor.max_slices} slices + thumbnail" if mode == "slice" else ""
        lines.append(f"image mode: {mode}{slices}")
    return "\n".join(lines)


def convert(args: argparse.Namespace) -> str:
    """Converts an original checkpoint; returns the output folder."""
    from .convert_tokenpacker_original import convert_original_checkpoint

    dst = convert_original_checkpoint(
        args.src,
        args.dst,
        vision_tower=args.vision_tower,
        scale_factor=args.scale_factor,
        max_slices=args.max_slices,
        dtype=args.dtype,
        push_to_hub=args.push_to_hub,
    )
    return str(dst)


COMMANDS = {"generate": generate, "info": info, "convert": convert}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(COMMANDS[args.command](args))
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
