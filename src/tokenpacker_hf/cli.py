# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""`tokenpacker-hf`: read images with a TokenPacker model, describe a model folder, convert original checkpoints.

    tokenpacker-hf generate --model DIR_OR_REPO --image IMG [--image IMG ...] --prompt TEXT
    tokenpacker-hf info DIR_OR_REPO
    tokenpacker-hf convert SRC DST [--vision-tower ID] [--scale-factor S] [--max-slices N] [--dtype bfloat16]
    tokenpacker-hf init --vision-tower ID --language-model ID OUT [--scale-factor S] [--image-mode pad|slice]

Errors a user can fix (a missing or damaged model folder, a Hub repo that does not exist or a Hub that cannot be
reached, an unusable image or device, a checkpoint that is not TokenPacker's) print one line `error: ...` on
stderr and exit with code 2. Ctrl-C or SIGTERM print one line and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from PIL import Image

from .hub import ModelFiles, locate_repo, one_line

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")


class UsageError(Exception):
    """Something the user passed cannot be used; the message is the whole explanation."""


def positive_int(text: str) -> int:
    """argparse type for counts and factors: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenpacker-hf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer a prompt about one or more images")
    generate.add_argument("--model", required=True, help="model folder or Hub repo id")
    generate.add_argument("--image", required=True, action="append", help="image file; repeat for several")
    generate.add_argument("--prompt", required=True, help="the question, without <image> (added per image)")
    generate.add_argument("--max-new-tokens", type=positive_int, default=64)
    generate.add_argument("--dtype", choices=DTYPES, default="float32")
    generate.add_argument(
        "--device", default=None, help=f"one of {', '.join(DEVICE_TYPES)}, optionally with an index such as cuda:1 "
        "(default: cuda when available, else cpu)"
    )  # fmt: skip

    info = commands.add_parser("info", help="print what a model folder holds: projector, token budget, towers")
    info.add_argument("model", help="model folder or Hub repo id")

    convert = commands.add_parser("convert", help="convert an original (LLaVA-format) TokenPacker checkpoint")
    convert.add_argument("src", help="original checkpoint folder or Hub repo id (e.g. sunshine-lwt/TokenPacker-7b-144token)")
    convert.add_argument("dst", help="output folder (must not exist or be empty)")
    convert.add_argument(
        "--vision-tower", default=None, help="CLIP tower to take when the checkpoint holds none "
        "(default: openai/clip-vit-large-patch14-336)"
    )
    convert.add_argument("--scale-factor", type=positive_int, default=None, help="override the resolved scale factor")
    convert.add_argument("--max-slices", type=positive_int, default=None, help="override the resolved HD slice count")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="default: keep the checkpoint's dtype")
    convert.add_argument(
        "--push-to-hub", default=None, metavar="REPO",
        help="also upload the result to this repo (if the upload fails, the converted folder is kept)",
    )  # fmt: skip

    init = commands.add_parser("init", help="compose a new, untrained model from a pretrained vision tower and LLM")
    init.add_argument("output", help="new model folder (must not exist or be empty)")
    init.add_argument("--vision-tower", required=True, help="CLIP / SigLIP checkpoint: folder or Hub repo id")
    init.add_argument("--language-model", required=True, help="causal LM checkpoint: folder or Hub repo id")
    init.add_argument("--scale-factor", type=positive_int, default=2, help="s: (G/s)² tokens per image tile")
    init.add_argument("--region-feature-layers", type=int, nargs="+", default=None,
                      help="tower layers for the region keys (default 12 16 22 23, for 24-layer towers)")  # fmt: skip
    init.add_argument("--image-mode", choices=("pad", "slice"), default="pad", help="slice: TokenPacker-HD")
    init.add_argument("--max-slices", type=positive_int, default=9, help="HD tiles per image (slice mode)")
    init.add_argument("--dtype", choices=DTYPES, default="float32")
    return parser


def locate_model(model: str) -> ModelFiles:
    """The model folder `model`, or the Hub repo it names (one quick request, see `tokenpacker_hf.hub`).

    A path that does not exist is only taken for a repo id when it could be one (`owner/name`).
    """
    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{model} is not a model folder: it has no config.json")
        files = frozenset(item.relative_to(path).as_posix() for item in path.rglob("*") if item.is_file())
        return ModelFiles(model, files, cached_only=False)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UsageError(f"no model folder at {model}") from None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UsageError(f"no model folder at {model}")
    return locate_repo(model)


def available_devices() -> list[str]:
    """The devices this machine can run on, as `--device` spells them: cpu, then each CUDA/XPU index, then mps."""
    import torch

    devices = ["cpu"]
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            devices += [f"{kind}:{index}" for index in range(backend.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(name: str | None) -> str:
    """`--device` checked before anything is loaded: a known device type that this machine has."""
    import torch

    devices = available_devices()
    if name is None:
        return "cuda" if any(device.startswith("cuda") for device in devices) else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {name!r} is not a device: expected one of {', '.join(DEVICE_TYPES)}, optionally "
                         "with an index such as cuda:1")  # fmt: skip
    present = {entry.split(":")[0] for entry in devices} | set(devices)
    if (device.type if device.index is None else str(device)) not in present:
        raise UsageError(f"--device {name}: this machine has no such device; available: {', '.join(devices)}")
    return str(device)


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


def load_pretrained(loader: Any, source: ModelFiles, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(source)`; a damaged or invalid folder is one UsageError naming `what` failed.

    The installed package's classes are used, never the folder's own code: `trust_remote_code=False` also keeps
    transformers from asking on stdin whether to run it.
    """
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(
            source.name, local_files_only=source.cached_only, trust_remote_code=False, **kwargs
        )
    except SafetensorError as error:
        raise UsageError(
            f"cannot load the {what} of {source.name}: a .safetensors file is truncated or damaged ({one_line(error)})"
        ) from None
    except (OSError, ValueError, StrictDataclassError) as error:
        raise UsageError(f"cannot load the {what} of {source.name}: {one_line(error)}") from None


def load_tokenpacker_config(source: ModelFiles) -> Any:
    """The model's config, refused unless it is a TokenPacker one."""
    from transformers import AutoConfig

    import tokenpacker_hf  # noqa: F401  (registers the Auto classes, so the installed code is used)

    config = load_pretrained(AutoConfig, source, "config")
    if config.model_type != "tokenpacker":
        raise UsageError(f"{source.name} holds a {config.model_type!r} model, not a TokenPacker one")
    return config


def generate(args: argparse.Namespace) -> str:
    """Greedy answer of the model to `args.prompt` about `args.image`, decoded without special tokens."""
    device = resolve_device(args.device)
    source = locate_model(args.model)
    images = load_images(args.image)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    load_tokenpacker_config(source)
    processor = load_pretrained(AutoProcessor, source, "processor")
    model = load_pretrained(AutoModelForImageTextToText, source, "weights", dtype=getattr(torch, args.dtype))
    model.to(device).eval()
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def describe_image_processor(source: ModelFiles) -> str:
    """The image mode line of `info`: "none saved" only when no processor config exists; a damaged one is an
    error, since a folder whose processor cannot load cannot be used for generation."""
    from transformers import AutoImageProcessor

    if not source.files.intersection(PROCESSOR_CONFIGS):
        return "image processor: none saved"
    image_processor = load_pretrained(AutoImageProcessor, source, "image processor")
    mode = getattr(image_processor, "image_mode", "?")
    slices = f", up to {image_processor.max_slices} slices + thumbnail" if mode == "slice" else ""
    return f"image mode: {mode}{slices}"


def info(args: argparse.Namespace) -> str:
    """A few lines describing a model folder from its config and processor config, without loading weights."""
    source = locate_model(args.model)
    config = load_tokenpacker_config(source)
    vision, text = config.vision_config, config.text_config
    lines = [
        f"projector: {config.projector_type}, scale factor {config.scale_factor}, "
        f"{config.num_image_tokens} tokens per {vision.image_size} px tile "
        f"(from {config.patch_grid_size}x{config.patch_grid_size} patches)",
        f"vision tower: {vision.model_type}, {vision.num_hidden_layers} layers, width {vision.hidden_size}; "
        f"point queries from layer {config.vision_feature_layer}, region keys from {config.region_feature_layers}",
        f"language model: {text.model_type}, {text.num_hidden_layers} layers, width {text.hidden_size}, "
        f"vocabulary {text.vocab_size}",
        describe_image_processor(source),
    ]
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


UNTRAINED_NOTE = (
    "Its projector is freshly initialised and untrained: train stage 1 (projector only, caption data) and stage 2 "
    "(projector and LLM, instruction data) before using it, e.g. with `examples/train.py` of tokenpacker-hf."
)


def init(args: argparse.Namespace) -> str:
    """Composes a new model folder (weights, config, remote code, processor, model card) from a pretrained vision
    tower and LLM; returns the folder. Nothing is left at OUTPUT when anything fails."""
    import torch

    from . import TokenPackerForConditionalGeneration, TokenPackerProcessor
    from .convert_tokenpacker_original import remove_stale_staging, staging_folder
    from .training import model_card

    dst = Path(args.output)
    remove_stale_staging(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty folder; choose a new destination")
    parts = (args.vision_tower, args.language_model)
    config = {"scale_factor": args.scale_factor}
    if args.region_feature_layers:
        config["region_feature_layers"] = args.region_feature_layers
    processor = TokenPackerProcessor.from_vision_text_pretrained(
        *parts, image_mode=args.image_mode, max_slices=args.max_slices, **config
    )
    model = TokenPackerForConditionalGeneration.from_vision_text_pretrained(
        *parts, processor=processor, dtype=getattr(torch, args.dtype), **config
    )
    card = model_card(model.config, dst.name, image_processor=processor.image_processor,
                      base_models=[part for part in parts if not Path(part).exists()], description=UNTRAINED_NOTE)
    with staging_folder(dst) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        card.save(staging / "README.md")
    return str(dst)


COMMANDS = {"generate": generate, "info": info, "convert": convert, "init": init}
# Everything a user can cause and fix: bad arguments, files, configs (StrictDataclassError: a config field that
# fails validation), images, repos and an unreachable Hub (HubError and the converter's UploadError are OSErrors,
# ConversionError a ValueError).
USER_ERRORS = (UsageError, ValueError, OSError, KeyError, StrictDataclassError, Image.DecompressionBombError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(COMMANDS[args.command](args))
    except KeyboardInterrupt as interrupt:
        # Ctrl-C, or SIGTERM during a conversion (which raises a KeyboardInterrupt carrying `signum`).
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(f"interrupted by {signal.Signals(signum).name}{': ' + str(interrupt) if str(interrupt) else ''}",
              file=sys.stderr)  # fmt: skip
        return 128 + signum
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else one_line(error)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
