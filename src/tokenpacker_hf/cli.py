# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""`tokenpacker-hf`: read images with a TokenPacker model, describe a model folder, convert original checkpoints.

    tokenpacker-hf generate --model DIR_OR_REPO --image IMG [--image IMG ...] --prompt TEXT [--stream]
        [--do-sample --temperature T --top-p P --seed N] [--num-beams N] [--revision REV] [--verbose]
    tokenpacker-hf info DIR_OR_REPO
    tokenpacker-hf convert SRC DST [--vision-tower ID] [--scale-factor S] [--max-slices N] [--dtype bfloat16]
    tokenpacker-hf init --vision-tower ID --language-model ID OUT [--scale-factor S] [--image-mode pad|slice]
    tokenpacker-hf demo [--model DIR] [--port N]
    tokenpacker-hf --version

Errors a user can fix (a missing or damaged model folder, a Hub repo that does not exist or a Hub that cannot be
reached, an unusable image or device, a checkpoint that is not TokenPacker's) print one line `error: ...` on
stderr and exit with code 2. Ctrl-C or SIGTERM print one line and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from huggingface_hub.utils import (
    HFValidationError,
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    validate_repo_id,
)
from PIL import Image
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    TextStreamer,
    set_seed,
)
from transformers.utils import logging as transformers_logging

# The package's own import registers the Auto classes, so the installed code is used for any folder loaded here.
from . import __version__
from .compose import compose_pretrained
from .convert_tokenpacker_original import convert_original_checkpoint, remove_stale_staging, staging_folder
from .hub import ModelFiles, inherited_metadata, locate_repo, model_card, one_line
from .image_processing_tokenpacker import to_rgb_image

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
# The demo's defaults: the model this repo ships and a held-out grid it reads, relative to the repository root.
DEMO_MODEL = "examples/models/tokenpacker-digits"
DEMO_IMAGE = "examples/digits/sample_grid.png"
DEMO_PROMPT = "Read the digits."


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


def number(text: str) -> float:
    """`text` as a float, or the argparse error naming what was given."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    """argparse type for `--temperature`: a finite number above 0 (0 would divide the logits by zero)."""
    if not 0 < (value := number(text)) < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type for `--top-p`: a probability mass in (0, 1]."""
    if not 0 < (value := number(text)) <= 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0 and at most 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `tokenpacker-hf` argument parser: `--version` and one subcommand per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="tokenpacker-hf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer a prompt about one or more images")
    generate.add_argument("--model", required=True, help="model folder or Hub repo id")
    generate.add_argument("--image", required=True, action="append", help="image file; repeat for several")
    generate.add_argument("--prompt", required=True, help="the question, without <image> (added per image)")
    generate.add_argument("--max-new-tokens", type=positive_int, default=64)
    generate.add_argument("--stream", action="store_true", help="print the answer word by word as it is generated")
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument(
        "--temperature", type=positive_float, default=None, help="sampling temperature (with --do-sample)"
    )
    generate.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass (with --do-sample)")
    generate.add_argument("--num-beams", type=positive_int, default=1, help="beam search with this many beams")
    generate.add_argument("--seed", type=int, default=None, help="seed the random generators, for repeatable sampling")
    add_loading_arguments(generate)

    demo = commands.add_parser("demo", help="serve a page to ask a model about an image, in a browser")
    demo.add_argument("--model", default=DEMO_MODEL, help=f"model folder or Hub repo id (default: {DEMO_MODEL})")
    demo.add_argument("--image", default=DEMO_IMAGE, help=f"image shown when the page opens (default: {DEMO_IMAGE})")
    demo.add_argument(
        "--prompt", default=DEMO_PROMPT, help=f"question shown when the page opens (default: {DEMO_PROMPT})"
    )
    demo.add_argument("--max-new-tokens", type=positive_int, default=64)
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; "
                      "whoever reaches the page can load any folder or Hub repo this machine can)")  # fmt: skip
    demo.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free port)")
    add_loading_arguments(demo)

    info = commands.add_parser("info", help="print what a model folder holds: projector, token budget, towers")
    info.add_argument("model", help="model folder or Hub repo id")

    convert = commands.add_parser("convert", help="convert an original (LLaVA-format) TokenPacker checkpoint")
    convert.add_argument(
        "src", help="original checkpoint folder or Hub repo id (e.g. sunshine-lwt/TokenPacker-7b-144token)"
    )
    convert.add_argument("dst", help="output folder (must not exist or be empty)")
    convert.add_argument(
        "--vision-tower",
        default=None,
        help="CLIP tower to take when the checkpoint holds none (default: openai/clip-vit-large-patch14-336)",
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


def add_loading_arguments(command: argparse.ArgumentParser) -> None:
    """The options of commands that load a model for generation: where, how, and how much to print."""
    command.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo (default: main)")
    command.add_argument("--dtype", choices=DTYPES, default="float32")
    command.add_argument(
        "--device", default=None, help=f"one of {', '.join(DEVICE_TYPES)}, optionally with an index such as cuda:1 "
        "(default: cuda when available, else cpu)"
    )  # fmt: skip
    command.add_argument("--attn-implementation", default=None, help="eager, sdpa, flex_attention, flash_attention_2, "
                         "... (default: transformers' choice)")  # fmt: skip
    command.add_argument("--verbose", action="store_true", help="show transformers' loading progress and warnings")


@contextlib.contextmanager
def quiet_transformers(quiet: bool) -> Iterator[None]:
    """While `quiet`, silences transformers' per-load noise: the "Loading weights" bar and info/warning logs.

    Hub download bars stay on: downloading is long work a user wants to see progress of (transformers'
    `disable_progress_bar` also turns those off, so they are turned back on). Everything is restored on exit,
    since `main` also runs inside other programs (and tests).
    """
    if not quiet:
        yield
        return
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    enable_progress_bars() if hub_bars else disable_progress_bars()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
        enable_progress_bars() if hub_bars else disable_progress_bars()


def locate_model(model: str, revision: str | None = None) -> ModelFiles:
    """The model folder `model`, or the Hub repo it names at `revision` (one quick request, see
    `tokenpacker_hf.hub`).

    A path that does not exist is only taken for a repo id when it could be one (`owner/name`).
    """
    path = Path(model)
    if path.exists():
        if revision is not None:
            raise UsageError(f"--revision {revision} names a version of a Hub repo, but {model} is a local folder")
        if not (path / "config.json").is_file():
            raise UsageError(f"{model} is not a model folder: it has no config.json")
        files = frozenset(item.relative_to(path).as_posix() for item in path.rglob("*") if item.is_file())
        return ModelFiles(model, files, cached_only=False)
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UsageError(f"no model folder at {model}") from None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UsageError(f"no model folder at {model}")
    return locate_repo(model, revision=revision)


def available_devices() -> list[str]:
    """The devices this machine can run on, as `--device` spells them: cpu, then each CUDA/XPU index, then mps."""
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
    try:
        return loader.from_pretrained(
            source.name,
            revision=source.revision,
            local_files_only=source.cached_only,
            trust_remote_code=False,
            **kwargs,
        )
    except SafetensorError as error:
        raise UsageError(
            f"cannot load the {what} of {source.name}: a .safetensors file is truncated or damaged ({one_line(error)})"
        ) from None
    except (OSError, ValueError, StrictDataclassError) as error:
        raise UsageError(f"cannot load the {what} of {source.name}: {one_line(error)}") from None


def load_tokenpacker_config(source: ModelFiles) -> Any:
    """The model's config, refused unless it is a TokenPacker one."""
    config = load_pretrained(AutoConfig, source, "config")
    if config.model_type != "tokenpacker":
        raise UsageError(f"{source.name} holds a {config.model_type!r} model, not a TokenPacker one")
    return config


def check_generation_options(args: argparse.Namespace) -> None:
    """Refuses option combinations `generate` would otherwise ignore or fail on deep inside transformers."""
    if not args.do_sample:
        options = (("--temperature", args.temperature), ("--top-p", args.top_p))
        given = [flag for flag, value in options if value is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise UsageError(f"{' and '.join(given)} {verb} only when sampling: add --do-sample, or drop "
                             f"{'them' if len(given) > 1 else 'it'} for greedy decoding")  # fmt: skip
    if getattr(args, "stream", False) and args.num_beams > 1:
        raise UsageError(f"--stream prints one sequence as it is generated, but --num-beams {args.num_beams} "
                         "searches several at once: drop one of them")  # fmt: skip


def load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The model (in eval mode, on its device) and processor that `args` name, and that device.

    Everything the user can get wrong (device, folder or repo, revision, dtype, attention implementation) is a
    UsageError or one of `USER_ERRORS` naming it.
    """
    device = resolve_device(args.device)
    source = locate_model(args.model, revision=args.revision)
    load_tokenpacker_config(source)
    processor = load_pretrained(AutoProcessor, source, "processor")
    options = {"dtype": getattr(torch, args.dtype)}
    if args.attn_implementation:
        options["attn_implementation"] = args.attn_implementation
    model = load_pretrained(AutoModelForImageTextToText, source, "weights", **options)
    return model.to(device).eval(), processor, device


def chat_inputs(processor: Any, images: list[Any], prompt: str, device: str) -> Any:
    """The processor's inputs for one user turn: an `<image>` per image, then `prompt`, then the answer prompt."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=images, text=text, return_tensors="pt").to(device)


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """`generate` keyword arguments for the decoding flags; unset ones keep the model's generation config."""
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                               "num_beams": args.num_beams}  # fmt: skip
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_p is not None:
        options["top_p"] = args.top_p
    return options


class StrippedStreamer(TextStreamer):
    """`TextStreamer` that prints the answer trimmed like the non-streamed one (`str.strip`): leading whitespace
    is dropped and trailing whitespace held back until more text follows it, so `--stream` prints byte for byte
    what `generate` without it prints, only sooner."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.started = False
        self.pending = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text = self.pending + text
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        body = text.rstrip()
        self.pending = text[len(body) :]
        print(body, end="\n" if stream_end else "", flush=True)


def generate(args: argparse.Namespace) -> str | None:
    """The model's answer to `args.prompt` about `args.image`, decoded without special tokens and stripped; with
    `--stream` it is printed as it is generated instead, and None returned."""
    check_generation_options(args)
    images = load_images(args.image)
    model, processor, device = load_model(args)
    if args.seed is not None:
        set_seed(args.seed)
    inputs = chat_inputs(processor, images, args.prompt, device)
    streamer = StrippedStreamer(processor.tokenizer) if args.stream else None
    with torch.inference_mode():
        output = model.generate(**inputs, **decoding_options(args), streamer=streamer)
    if streamer is not None:
        return None
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def demo(args: argparse.Namespace) -> None:
    """Serves the demo page until interrupted (see `tokenpacker_hf.demo`)."""
    from .demo import serve  # here, not at the top: `demo` imports this module

    serve(args)


def describe_image_processor(source: ModelFiles) -> str:
    """The image mode line of `info`: "none saved" only when no processor config exists; a damaged one is an
    error, since a folder whose processor cannot load cannot be used for generation."""
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
    dst = Path(args.output)
    remove_stale_staging(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty folder; choose a new destination")
    parts = (args.vision_tower, args.language_model)
    model, processor = compose_pretrained(
        *parts,
        scale_factor=args.scale_factor,
        region_feature_layers=args.region_feature_layers,
        image_mode=args.image_mode,
        max_slices=args.max_slices,
        dtype=getattr(torch, args.dtype),
    )
    license, datasets = inherited_metadata(parts)
    card = model_card(model.config, str(dst), image_processor=processor.image_processor, license=license,
                      base_models=[part for part in parts if not Path(part).exists()], datasets=datasets,
                      description=UNTRAINED_NOTE)  # fmt: skip
    with staging_folder(dst) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        card.save(staging / "README.md")
    return str(dst)


COMMANDS = {"generate": generate, "info": info, "convert": convert, "init": init, "demo": demo}
# Everything a user can cause and fix: bad arguments, files, configs (StrictDataclassError: a config field that
# fails validation), images, repos and an unreachable Hub (HubError and the converter's UploadError are OSErrors,
# ConversionError a ValueError).
USER_ERRORS = (UsageError, ValueError, OSError, KeyError, StrictDataclassError, Image.DecompressionBombError)


def main(argv: list[str] | None = None) -> int:
    """Runs one `tokenpacker-hf` command; returns the exit code (0, 2 for a user's error, 128 + signal)."""
    args = build_parser().parse_args(argv)
    try:
        # Commands that load a model for generation are quiet unless --verbose; convert and init show progress.
        with quiet_transformers(getattr(args, "verbose", True) is False):
            result = COMMANDS[args.command](args)
        if result is not None:
            print(result)
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
