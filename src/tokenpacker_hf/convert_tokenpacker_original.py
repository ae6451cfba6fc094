# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""Convert the authors' LLaVA-format TokenPacker checkpoints into this package's layout (docs/conversion.md).

`convert_original_checkpoint(src, dst)` turns a released folder (`sunshine-lwt/TokenPacker-*`: a
`LlavaLlamaForCausalLM` saved by the authors' fork of LLaVA-1.5) into a folder that loads anywhere with
`AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True)`:

1. read the original `config.json` as plain JSON (its `model_type` "llava" collides with transformers' LLaVA) and
   resolve the scale factor, image mode and slice limit the original code reads from it or from the repo name;
2. plan the conversion from the shard headers alone: every original key is renamed on a meta tensor and checked
   against a meta-device `TokenPackerForConditionalGeneration`, so missing, unexpected or mis-shaped weights fail
   before anything is read or written;
3. stream the shards one by one (read, rename, split the attention in-projection, pad the vocabulary for
   `<image>`, cast, write one safetensors shard), so peak memory stays near the largest input shard;
4. write config (with `auto_map`), remote code, generation config, processor, tokenizer and a model card into a
   hidden staging folder next to `dst` (`.DST.converting-*`), renamed into place only when everything succeeded.
   Any failure, Ctrl-C or SIGTERM removes it; one left by a conversion killed outright (SIGKILL) is removed by the
   next conversion into the same `dst`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from itertools import takewhile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AddedToken, AutoTokenizer, CLIPVisionConfig, GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from .configuration_tokenpacker import TokenPackerConfig
from .hub import HubError, inherited_metadata, locate_repo, model_card, one_line
from .image_processing_tokenpacker import TokenPackerImageProcessor
from .modeling_tokenpacker import TokenPackerForConditionalGeneration
from .processing_tokenpacker import TokenPackerProcessor

logger = logging.getLogger(__name__)

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IMAGE_TOKEN = "<image>"

# The original's `feature_select` hard-codes its key/value levels and `TokenPacker` its head width
# (`num_heads = 1024 // 128`); OpenAI's CLIP towers all use 64-wide heads.
ORIGINAL_REGION_LAYERS = [12, 16, 22, 23]
ORIGINAL_HEAD_DIM = 128
CLIP_HEAD_DIM = 64
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, image_size=336, patch_size=14)

# Token budget in the released repo names -> scale factor.
_NAME_SCALE_FACTORS = {144: 2, 64: 3, 36: 4}
_IMAGE_MODES = {"pad": "pad", "slice": "slice", "square": "square"}

# Original projector sub-keys (`builder.py`, class TokenPacker) -> this package's TokenPackerProjector.
_PROJECTOR_RENAMES = {
    "q_proj_1.": "point_query_proj.",
    "ln_q_1.": "point_query_norm.",
    "k_proj_1.0.": "region_key_proj.fc1.",
    "k_proj_1.2.": "region_key_proj.fc2.",
    "ln_k_1.": "region_key_norm.",
    "v_proj_1.0.": "region_value_proj.fc1.",
    "v_proj_1.2.": "region_value_proj.fc2.",
    "ln_v_1.": "region_value_norm.",
    "clip_attn.out_proj.": "region_attn.o_proj.",
    "mlp.0.": "output_proj.fc1.",
    "mlp.2.": "output_proj.fc2.",
}
_IN_PROJ = re.compile(r"^clip_attn\.in_proj_(weight|bias)$")

# Full-checkpoint prefixes, most specific first. transformers 5 stores CLIPVisionModel without `vision_model.`.
_PREFIX_RENAMES = (
    ("model.mm_projector.", "model.multi_modal_projector."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
_DROPPED = re.compile(r"rotary_emb\.inv_freq$|vision_tower\..*position_ids$")
_ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
# Keys of a CLIPModel / CLIPVisionModel folder that are not the vision transformer.
_TOWER_SKIPPED = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)|position_ids$")


# The staging folder is `.{dst.name}{STAGING_INFIX}<random>`; the marker inside names the process writing it.
STAGING_INFIX = ".converting-"
STAGING_MARKER = ".tokenpacker-conversion.json"


class ConversionError(ValueError):
    """The conversion cannot be done as asked (the source is not a convertible TokenPacker checkpoint, a shard
    cannot be read, `dst` cannot be written); the message says what was expected and found."""


class UploadError(OSError):
    """The conversion succeeded and `dst` holds its result, but uploading it to the Hub failed."""


class ConversionTerminated(KeyboardInterrupt):
    """SIGTERM arrived during a conversion. Raised like Ctrl-C's KeyboardInterrupt, so the staging folder is
    removed on the way out; `signum` tells the command line which exit status to give."""

    signum = signal.SIGTERM


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_original_projector_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original projector keys (no prefix, e.g. `clip_attn.in_proj_weight`) -> TokenPackerProjector keys.

    `nn.MultiheadAttention`'s stacked `in_proj_weight [3E, E]` / `in_proj_bias [3E]` is split into the
    `q_proj`, `k_proj`, `v_proj` thirds, in that order.
    """
    converted, unexpected = {}, []
    for key, tensor in state_dict.items():
        in_proj = _IN_PROJ.match(key)
        if in_proj:
            for name, third in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                converted[f"region_attn.{name}.{in_proj.group(1)}"] = third.clone()
            continue
        for old, new in _PROJECTOR_RENAMES.items():
            if key.startswith(old):
                converted[new + key[len(old) :]] = tensor
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise ConversionError(
            f"unexpected TokenPacker projector keys: {_listing(unexpected)}; expected keys under "
            f"{sorted(_PROJECTOR_RENAMES) + ['clip_attn.in_proj_weight', 'clip_attn.in_proj_bias']}"
        )
    return converted


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original full-checkpoint keys (`LlavaLlamaForCausalLM`) -> `TokenPackerForConditionalGeneration` keys.

    `model.mm_projector.*` -> `model.multi_modal_projector.*` (in-projection split), the CLIP tower
    `model.vision_tower.vision_tower.vision_model.*` -> `model.vision_tower.*`, the rest of `model.*` ->
    `model.language_model.*`, `lm_head.*` unchanged; Llama's persistent `rotary_emb.inv_freq` buffers dropped.
    Works on any subset of the keys (one shard at a time), and on meta tensors.
    """
    projector, converted, unexpected = {}, {}, []
    for key, tensor in state_dict.items():
        if _DROPPED.search(key):
            continue
        rename = next(((old, new) for old, new in _PREFIX_RENAMES if key.startswith(old)), None)
        if rename is None:
            unexpected.append(key)
            continue
        old, new = rename
        if old == "model.mm_projector.":
            projector[key[len(old) :]] = tensor
        else:
            converted[new + key[len(old) :]] = tensor
    if unexpected:
        raise ConversionError(
            f"unexpected checkpoint keys: {_listing(unexpected)}; expected keys under "
            f"{[prefix for prefix, _ in _PREFIX_RENAMES]}"
        )
    for key, tensor in convert_original_projector_state_dict(projector).items():
        converted["model.multi_modal_projector." + key] = tensor
    return converted


def convert_vision_tower_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPModel or CLIPVisionModel checkpoint (with or without the `vision_model.` prefix) -> the keys of
    `model.vision_tower`; the text tower, projections and `position_ids` buffers are dropped."""
    converted = {}
    for key, tensor in state_dict.items():
        if _TOWER_SKIPPED.search(key):
            continue
        converted["model.vision_tower." + key.removeprefix("vision_model.")] = tensor
    return converted


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints


def resolve_folder(name_or_path: str | os.PathLike, what: str) -> Path:
    """A local folder, or a Hub repo downloaded with huggingface_hub (configs, tokenizer, model card for its
    license, and one weight format: safetensors when the repo has them, else the `.bin` shards)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"{what} {name!r} is neither a folder nor a Hugging Face Hub repo id (owner/name)")
    # One quick request first: a missing repo or an unreachable Hub is a clear error in seconds, where the
    # download below would retry each file for minutes.
    try:
        repo = locate_repo(name)
    except HubError as error:
        raise HubError(f"{what} {name!r}: {error}") from None
    has_safetensors = any(file.endswith(".safetensors") for file in repo.files)
    weights = ["*.safetensors", "*.safetensors.index.json"] if has_safetensors else ["*.bin", "*.bin.index.json"]
    try:
        patterns = ["*.json", "tokenizer.model", "*.jinja", "README.md", *weights]
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=repo.cached_only))
    # The Hub client's network errors differ between huggingface_hub releases (httpx, httpx2).
    except Exception as error:
        raise FileNotFoundError(f"{what} {name!r} could not be downloaded: {one_line(error)}") from error


def find_weight_files(folder: Path) -> list[Path]:
    """The weight shards of a checkpoint folder, in index order: a safetensors index or file, else a `.bin`
    index or `pytorch_model.bin`."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
                raise ConversionError(f"{index}: expected a \"weight_map\" of weight names to shard files, found "
                                      f"{str(weight_map)[:200]}")  # fmt: skip
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {missing}")
            return [folder / name for name in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json), found "
        f"{sorted(p.name for p in folder.iterdir())}"
    )


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard; a truncated or damaged file, or a `.bin` holding anything but a dict of tensors,
    is a ConversionError naming it."""
    if path.suffix == ".safetensors":
        with open_safetensors(path) as shard:
            return {key: shard.get_tensor(key) for key in shard.keys()}
    return check_state_dict(path, load_bin(path))


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open(path)`, whose header check catches truncated and damaged files, as a ConversionError."""
    try:
        shard = safe_open(path, framework="pt")
    except SafetensorError as error:
        raise ConversionError(
            f"cannot read {path}: the file is truncated or not a safetensors file ({one_line(error)})"
        ) from None
    with shard as opened:
        yield opened


_ZIP_MAGIC = b"PK\x03\x04"
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_bin(path: Path) -> Any:
    """A `.bin` file through `torch.load(weights_only=True)`: memory-mapped for torch's zip format (tensors are
    paged in as they are used), read whole for the legacy format, which cannot be mapped."""
    with open(path, "rb") as handle:
        zip_format = handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused:
            raise ConversionError(
                f"refused to unpickle {path}: it holds a {refused.group(1).rstrip('.')} object, and only tensors and "
                "plain containers are loaded (torch.load(weights_only=True)), since unpickling other objects can run "
                "code; re-save the state dict with torch.save or as safetensors"
            ) from None
        raise ConversionError(
            f"cannot read {path}: it is not a PyTorch checkpoint ({_first_sentence(error)})"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ConversionError(
            f"cannot read {path}: the file is truncated or damaged ({_first_sentence(error)})"
        ) from None


def _first_sentence(error: BaseException) -> str:
    """torch.load's messages run to a paragraph of advice; the first sentence says what went wrong."""
    return one_line(error).split(". ")[0].rstrip(".")


def check_state_dict(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    """`loaded` if it is a state dict (weight names -> tensors), else a ConversionError naming what is not."""
    if not isinstance(loaded, dict):
        raise ConversionError(
            f"{path}: expected a state dict (weight names -> tensors), found a {type(loaded).__name__}"
        )
    wrong = [f"{key} ({type(value).__name__})" for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if wrong:
        raise ConversionError(f"{path}: expected only tensors, found {len(wrong)} other value(s): {_listing(wrong)}")
    return loaded


def shard_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Meta tensors with the shapes and dtypes of one shard's weights, read from its header only."""
    if path.suffix == ".safetensors":
        with open_safetensors(path) as shard:
            return {key: _meta_like(shard.get_slice(key)) for key in shard.keys()}
    return {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in load_shard(path).items()}


def _meta_like(tensor_slice) -> torch.Tensor:
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}.get(
        tensor_slice.get_dtype(), torch.float32
    )
    return torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")


def read_json(path: Path) -> dict:
    """A JSON object from a UTF-8 file; anything else is a ConversionError naming the file and the problem."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConversionError(f"{path}: expected UTF-8 JSON, found a byte 0x{error.object[error.start]:02X} "
                              f"at offset {error.start} that is not UTF-8") from None  # fmt: skip
    except json.JSONDecodeError as error:
        raise ConversionError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    if not isinstance(content, dict):
        raise ConversionError(f"{path}: expected a JSON object, found a {type(content).__name__}")
    return content


def read_original_config(folder: Path) -> dict:
    """The original `config.json` as plain JSON (never through AutoConfig: "llava" is transformers' LLaVA)."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}; expected an original TokenPacker checkpoint folder")
    return read_json(path)


# ----------------------------------------------------------------------------------------------------------------
# Resolving what the original code reads from the config


def _resolve(field: str, override: int | None, found: int | None, source: str) -> int | None:
    if override is not None and found is not None and override != found:
        raise ConversionError(f"{field}={override} was requested but the checkpoint's {source} says {found}")
    return override if override is not None else found


def resolve_scale_factor(original: dict, name: str, override: int | None = None) -> int:
    """`scale_factor` from config.json, else its pre-July-2024 name `down_rate`, else the token budget in the repo
    name (`144token` -> 2, `64token` -> 3, `36token` -> 4)."""
    for key in ("scale_factor", "down_rate"):
        if original.get(key) is not None:
            return _resolve("scale_factor", override, int(original[key]), f"config.json {key}")
    match = re.search(r"(\d+)token", name)
    if match and int(match.group(1)) in _NAME_SCALE_FACTORS:
        return _resolve("scale_factor", override, _NAME_SCALE_FACTORS[int(match.group(1))], f"name {name!r}")
    if override is None:
        raise ConversionError(
            f"cannot tell the scale factor: config.json has neither scale_factor nor down_rate and the name {name!r} "
            f"has no 144token/64token/36token; pass scale_factor (2, 3 or 4)"
        )
    return override


def resolve_image_mode(original: dict) -> str:
    """`image_aspect_ratio` "pad" (normal models), "slice" (TokenPacker-HD) or "square" (stage 1, the default)."""
    aspect = original.get("image_aspect_ratio") or "square"
    if aspect not in _IMAGE_MODES:
        raise ConversionError(f"image_aspect_ratio must be one of {sorted(_IMAGE_MODES)}, found {aspect!r}")
    return _IMAGE_MODES[aspect]


def resolve_max_slices(original: dict, name: str, override: int | None = None) -> int:
    """`patch_num` from config.json (the training code never writes it), else `9patch`/`16patch`/`25patch` in the
    repo name, else 9 (what the original evaluation falls back to)."""
    if original.get("patch_num") is not None:
        return _resolve("max_slices", override, int(original["patch_num"]), "config.json patch_num")
    match = re.search(r"(\d+)patch", name)
    if match:
        return _resolve("max_slices", override, int(match.group(1)), f"name {name!r}")
    return override if override is not None else 9


# ----------------------------------------------------------------------------------------------------------------
# Building the target config


def check_is_tokenpacker(keys: Iterable[str]) -> None:
    """Detects the projector from its keys: `mm_projector_type` is ignored by the original and often wrong."""
    projector = sorted(k.removeprefix("model.mm_projector.") for k in keys if k.startswith("model.mm_projector."))
    if "clip_attn.in_proj_weight" not in projector:
        found = _listing(projector) if projector else "no model.mm_projector.* keys at all"
        raise ConversionError(
            "not a TokenPacker checkpoint: expected the projector key model.mm_projector.clip_attn.in_proj_weight "
            f"(and q_proj_1, k_proj_1, v_proj_1, mlp), found {found}"
            + ("; this looks like LLaVA-1.5's mlp2x_gelu projector" if "0.weight" in projector else "")
        )


def infer_clip_vision_config(tower: Mapping[str, torch.Tensor]) -> dict:
    """CLIP vision config from the tower's weight shapes (keys of `model.vision_tower`): width, MLP width,
    depth, patch and image size. Heads are not visible in the weights; OpenAI's CLIP uses 64-wide heads."""
    patch = tower["model.vision_tower.embeddings.patch_embedding.weight"]
    positions = tower["model.vision_tower.embeddings.position_embedding.weight"].shape[0]
    depth = 1 + max(int(m.group(1)) for k in tower if (m := re.search(r"encoder\.layers\.(\d+)\.", k)))
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    grid = round((positions - 1) ** 0.5)
    config = dict(
        model_type="clip_vision_model",
        hidden_size=hidden,
        intermediate_size=tower["model.vision_tower.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
        num_channels=channels,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
    )
    if all(config[key] == value for key, value in CLIP_L_336.items()):
        config.update(num_attention_heads=16, projection_dim=768)
    return config


def load_vision_config(folder: Path) -> dict:
    """The vision config of a CLIPModel or CLIPVisionModel folder, as a dict."""
    try:
        return CLIPVisionConfig.from_pretrained(folder).to_dict()
    except (OSError, ValueError) as error:
        raise ConversionError(f"{folder} holds no CLIP vision config: {error}") from error


_LLAMA_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_theta", "rope_scaling",
    "attention_bias", "attention_dropout", "mlp_bias", "head_dim", "pretraining_tp", "bos_token_id", "eos_token_id",
    "pad_token_id", "tie_word_embeddings", "use_cache",
)  # fmt: skip


def text_config_from_original(original: dict, vocab_size: int) -> dict:
    """The Llama fields of the original config (an `LlavaLlamaForCausalLM` config is a LlamaConfig plus `mm_*`)."""
    config = {key: original[key] for key in _LLAMA_FIELDS if original.get(key) is not None}
    return dict(model_type="llama", vocab_size=vocab_size, **config)


def projector_settings(shapes: Mapping[str, torch.Tensor], vision_width: int) -> dict:
    """Projector width and heads from the original projector's shapes; checks the tower feeds it the width and
    number of levels it was trained on."""
    query = shapes["model.mm_projector.q_proj_1.weight"]
    region = shapes["model.mm_projector.k_proj_1.0.weight"]
    levels = len(ORIGINAL_REGION_LAYERS)
    if query.shape[1] != vision_width or region.shape[1] != levels * vision_width:
        raise ConversionError(
            f"the vision tower's width {vision_width} does not match the projector: model.mm_projector.q_proj_1.weight "
            f"is {list(query.shape)} (expects width {query.shape[1]}) and model.mm_projector.k_proj_1.0.weight is "
            f"{list(region.shape)} (expects {levels} levels x {query.shape[1]})"
        )
    return dict(
        projector_hidden_size=query.shape[0],
        projector_num_heads=max(1, query.shape[0] // ORIGINAL_HEAD_DIM),
        projector_layer_norm_eps=1e-6,
        projector_hidden_act="gelu",
    )


def build_config(original: dict, vision_config: dict, projector: dict, scale_factor: int, vocab_size: int,
                 image_token_id: int, dtype: torch.dtype):  # fmt: skip
    """The `TokenPackerConfig` of the converted model."""
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise ConversionError(
            f"mm_vision_select_feature must be 'patch' (the original cannot run 'cls_patch'), found {select_feature!r}"
        )
    select_layer = original.get("mm_vision_select_layer", -2)
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):
        raise ConversionError(f"mm_vision_select_layer must be a whole number (a tower layer), found {select_layer!r}")
    try:
        return TokenPackerConfig(
            vision_config=vision_config,
            text_config=text_config_from_original(original, vocab_size),
            image_token_index=image_token_id,
            vision_feature_layer=select_layer,
            vision_feature_select_strategy="default",
            region_feature_layers=list(ORIGINAL_REGION_LAYERS),
            scale_factor=scale_factor,
            projector_type="tokenpacker",
            tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
            dtype=str(dtype).removeprefix("torch."),
            **projector,
        )
    except (ValueError, StrictDataclassError) as error:
        raise ConversionError(f"the checkpoint does not make a valid TokenPacker config: {one_line(error)}") from error


CONVERT_EXTRA_INSTALL = "pip install 'tokenpacker-hf[convert]'"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_tokenizer_dependencies(folder: Path) -> None:
    """Raises `ConversionError` naming the `convert` extra when `folder` holds a SentencePiece `tokenizer.model`
    without a `tokenizer.json` (as the released repos do) and `sentencepiece` or `protobuf` is missing:
    transformers needs both to turn it into a fast tokenizer, and without them fails with an unrelated error."""
    if not (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
        return
    missing = [name for name, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if not _importable(module)]  # fmt: skip
    if missing:
        raise ConversionError(
            f"the tokenizer of {folder} is a SentencePiece tokenizer.model without tokenizer.json; converting it "
            f"needs sentencepiece and protobuf, but {' and '.join(missing)} is not installed: "
            f"{CONVERT_EXTRA_INSTALL}"
        )


def prepare_tokenizer(folder: Path, vocab_size: int):
    """The checkpoint's tokenizer with `<image>` added as a special token (the original splices images at id
    -200 and has none). Returns the tokenizer and the embedding rows the model needs."""
    check_tokenizer_dependencies(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load the tokenizer of {folder}: {error}") from error
    if len(tokenizer) > vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but config.json vocab_size is {vocab_size}")
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return tokenizer, image_token_id, max(vocab_size, image_token_id + 1)


def expected_shapes(config) -> dict[str, torch.Size]:
    """Key -> shape of every weight `TokenPackerForConditionalGeneration(config)` saves, from a meta-device
    model (no memory): the LM head is left out when it is tied to the embeddings."""
    with torch.device("meta"):
        model = TokenPackerForConditionalGeneration(config)
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_against_model(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> None:
    """Raises with every missing, unexpected and mis-shaped key (shapes after the vocabulary padding)."""
    missing, unexpected = set(expected) - set(converted), set(converted) - set(expected)
    wrong = [
        f"{key}: expected {list(expected[key])}, found {list(converted[key].shape)}"
        for key in sorted(set(expected) & set(converted))
        if converted[key].shape != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong[:12]))
    if problems:
        raise ConversionError(
            "the checkpoint does not match the TokenPacker model it describes: " + " | ".join(problems)
        )


# ----------------------------------------------------------------------------------------------------------------
# Streaming the weights


_VOCAB_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def pad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[V, D]` -> `[vocab_size, D]`, new rows set to the mean row. The `<image>` embedding row is never read
    (image positions are overwritten by image features); as an LM-head row the mean gives the mean logit, which
    is never the greedy choice, and generation_config suppresses the token anyway."""
    if weight.shape[0] >= vocab_size:
        return weight
    # Accumulate in float32 block by block: a float32 copy of a 13B model's embeddings would be 650 MB.
    total = torch.zeros(weight.shape[1:], dtype=torch.float32, device=weight.device)
    for block in weight.split(4096):
        total += block.sum(dim=0, dtype=torch.float32)
    mean = (total / weight.shape[0]).to(weight.dtype)
    return torch.cat([weight, mean.expand(vocab_size - weight.shape[0], -1)])


def convert_shard(tensors: dict[str, torch.Tensor], from_tower: bool, vocab_size: int, tie: bool) -> dict:
    """One shard's tensors (or meta tensors) renamed and reshaped for the target model."""
    converted = convert_vision_tower_state_dict(tensors) if from_tower else convert_original_state_dict(tensors)
    if tie:
        converted.pop("lm_head.weight", None)
    for key in _VOCAB_KEYS:
        if key in converted:
            converted[key] = pad_vocab(converted[key], vocab_size)
    return converted


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def write_weights(plan: list[tuple[Path, bool]], folder: Path, dtype: torch.dtype, vocab_size: int, tie: bool) -> None:
    """Streams each `(shard, from_tower)` of the plan into one output safetensors shard (+ index when several):
    only one input shard and its converted tensors are alive at a time."""
    weight_map, total_size = {}, 0
    for index, (path, from_tower) in enumerate(tqdm(plan, desc="Converting shards", unit="shard"), start=1):
        converted = convert_shard(load_shard(path), from_tower, vocab_size, tie)
        for key, tensor in converted.items():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            converted[key] = tensor.contiguous()
            total_size += tensor.numel() * tensor.element_size()
        name = _shard_name(index, len(plan))
        save_file(converted, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, name))
        del converted
    if len(plan) > 1:
        index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The folder around the weights


def write_model_files(config, folder: Path, original_folder: Path, image_token_id: int) -> None:
    """config.json with `auto_map`, the remote-code modules (through transformers' own `custom_object_save`,
    as `save_pretrained` does) and generation_config.json."""
    with torch.device("meta"):
        model = TokenPackerForConditionalGeneration(config)
    custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    if (original_folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(original_folder)
    else:
        generation = GenerationConfig.from_model_config(config.text_config)
    # The original model has no <image> token at all; never let generation produce one.
    generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | {image_token_id})
    generation.save_pretrained(folder)


def build_processor(config, tokenizer, image_mode: str, max_slices: int):
    """The processor of the converted model: image mode and slice limit of the original, its `,` / `\\n`
    separators (looked up in the tokenizer as the original does) and the vicuna_v1 chat template."""
    image_processor = TokenPackerImageProcessor.from_vision_config(
        config.vision_config, image_mode=image_mode, max_slices=max_slices
    )
    return TokenPackerProcessor.from_config(config, image_processor=image_processor, tokenizer=tokenizer)


def write_model_card(config, folder: Path, processor, sources: list[Path], name: str, hub_sources: list[str],
                     model_id: str) -> None:  # fmt: skip
    """Writes the card into `folder` (the staging folder). `model_id` is what the reader loads: the pushed repo,
    else the destination as the user named it, never the staging folder. The license and datasets are those the
    cards of the `sources` folders (the checkpoint `name`, and the vision tower when it came separately) state."""
    license, datasets = inherited_metadata([str(source) for source in sources])
    card = model_card(
        config,
        model_id,
        image_processor=processor.image_processor,
        base_models=hub_sources,
        datasets=datasets,
        license=license,
        description=f"Converted from the original checkpoint `{name}` with `tokenpacker-hf convert`.",
    )
    conversion = (
        "\n## Conversion\n\nConverted from the authors' LLaVA-format checkpoint with `tokenpacker-hf convert`: keys "
        "renamed, the projector's attention in-projection split into q/k/v, `<image>` added to the tokenizer (id "
        f"{config.image_token_id}; its embedding row is never read because image positions are replaced). With "
        "these weights the image features and logits equal the original code's within 1e-4 in float32.\n"
    )
    ModelCard(str(card) + conversion).save(folder / "README.md")


def _plan(shards: list[Path], from_tower: bool) -> list[tuple[Path, bool, dict]]:
    return [(path, from_tower, shard_shapes(path)) for path in shards]


# ----------------------------------------------------------------------------------------------------------------
# The staging folder


def remove_stale_staging(dst: Path) -> list[Path]:
    """Removes the staging folders that conversions into `dst` left when they were killed outright (SIGKILL, a
    power cut) and returns them: hidden `.DST.converting-*` siblings whose marker names a process of this host
    that no longer runs. Folders without the marker (not made by this converter), of a running process (another
    conversion in progress) or of another host (whose processes cannot be checked) are left alone."""
    if not dst.parent.is_dir():
        return []
    prefix, removed = f".{dst.name}{STAGING_INFIX}", []
    for folder in sorted(dst.parent.iterdir()):
        if not folder.name.startswith(prefix) or not folder.is_dir():
            continue
        owner = _staging_owner(folder)
        if owner is None or owner.get("host") != socket.gethostname() or _process_running(owner["pid"]):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning(
            "Removed %s, left by a conversion into %s that was killed (process %d)", folder, dst, owner["pid"]
        )
        removed.append(folder)
    return removed


def _staging_owner(folder: Path) -> dict | None:
    """The marker of a staging folder (`pid`, `host`), or None when there is no readable one."""
    try:
        owner = json.loads((folder / STAGING_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _process_running(pid: int) -> bool:
    """Whether process `pid` exists (a reused pid counts as running, which only ever keeps a folder)."""
    if os.name == "nt":  # os.kill(pid, 0) terminates the process on Windows; never remove anything there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises [`ConversionTerminated`], as SIGINT raises KeyboardInterrupt, so cleanup
    code runs instead of the process vanishing mid-write. Only the main thread can set signal handlers, and a
    handler the application installed itself is left in place."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise ConversionTerminated("the unfinished conversion was removed")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def staging_folder(dst: Path) -> Iterator[Path]:
    """A hidden folder next to `dst` to write into, renamed to `dst` when the block succeeds. When the block fails
    or is interrupted (Ctrl-C, SIGTERM) it is removed, with the parent folders it needed. A marker inside names
    this process, for [`remove_stale_staging`] to find after a SIGKILL."""
    created = list(takewhile(lambda folder: not folder.exists(), dst.parents))
    if not dst.parents[len(created)].is_dir():  # mkdir would only say "File exists"
        raise ConversionError(f"cannot write {dst}: {dst.parents[len(created)]} is a file, not a folder")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}{STAGING_INFIX}", dir=dst.parent))
    except OSError as error:
        _remove_empty_folders(created)
        # strerror, not the message: that names the staging folder's random name, which means nothing to the user.
        raise ConversionError(f"cannot write {dst}: {error.strerror or one_line(error)}") from error
    try:
        with sigterm_as_interrupt():
            marker = staging / STAGING_MARKER
            marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "dst": str(dst)}))
            yield staging
            marker.unlink()
            if dst.exists():
                dst.rmdir()
            staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty_folders(created)
        raise


def _remove_empty_folders(folders: list[Path]) -> None:
    """Removes `folders` (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def convert_original_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    vision_tower: str | None = DEFAULT_VISION_TOWER,
    scale_factor: int | None = None,
    max_slices: int | None = None,
    dtype: str | None = None,
    push_to_hub: str | None = None,
) -> Path:
    """Converts an original TokenPacker / TokenPacker-HD checkpoint into a `from_pretrained` folder.

    Args:
        src: a local folder or a Hub repo id in the original layout: `config.json`, `.bin` or safetensors
            shards (with index), tokenizer files.
        dst: the output folder; must not exist or be empty. Written to a hidden sibling `.DST.converting-*` and
            renamed at the end, so a failed or interrupted (Ctrl-C, SIGTERM) conversion leaves nothing; such
            siblings left by a killed conversion (SIGKILL) are removed first.
        vision_tower: folder or Hub id of the CLIP tower, read only when the checkpoint holds no
            `model.vision_tower.*` weights (None: openai/clip-vit-large-patch14-336, what the original loads).
        scale_factor, max_slices: only needed when neither config.json nor the name tells them; a value that
            contradicts the checkpoint is an error.
        dtype: "float32", "float16" or "bfloat16"; None keeps the checkpoint's `torch_dtype`.
        push_to_hub: a repo id to upload the finished folder to; if the upload fails, `dst` is kept and
            [`UploadError`] raised.
    Returns:
        The path of `dst`.
    """
    dst = Path(dst)
    remove_stale_staging(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty folder; choose a new destination")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")

    folder = resolve_folder(src, "checkpoint")
    original = read_original_config(folder)
    name = str(src).rstrip("/\\")
    plan = _plan(find_weight_files(folder), from_tower=False)
    source_shapes = {key: t for _, _, shapes in plan for key, t in shapes.items()}
    check_is_tokenpacker(source_shapes)

    hub_sources = [name] if not Path(src).is_dir() else []
    card_sources = [folder]
    if any(key.startswith(_ORIGINAL_TOWER_PREFIX) for key in source_shapes):
        tower_shapes = convert_original_state_dict(
            {k: t for k, t in source_shapes.items() if k.startswith(_ORIGINAL_TOWER_PREFIX)}
        )
        vision_config = infer_clip_vision_config(tower_shapes)
    else:
        vision_tower = vision_tower or DEFAULT_VISION_TOWER
        tower_folder = resolve_folder(vision_tower, "vision tower")
        card_sources.append(tower_folder)
        vision_config = load_vision_config(tower_folder)
        plan += _plan(find_weight_files(tower_folder), from_tower=True)
        if not Path(vision_tower).is_dir():
            hub_sources.append(str(vision_tower))

    target_dtype = DTYPES[dtype] if dtype else _checkpoint_dtype(original, source_shapes)
    tokenizer, image_token_id, vocab_size = prepare_tokenizer(folder, int(original.get("vocab_size", 32000)))
    projector = projector_settings(source_shapes, vision_config["hidden_size"])
    config = build_config(
        original, vision_config, projector, resolve_scale_factor(original, name, scale_factor), vocab_size,
        image_token_id, target_dtype,
    )  # fmt: skip
    image_mode = resolve_image_mode(original)
    slices = resolve_max_slices(original, name, max_slices)

    converted_shapes = {}
    for _, from_tower, shapes in plan:
        converted_shapes.update(convert_shard(shapes, from_tower, vocab_size, config.tie_word_embeddings))
    check_against_model(converted_shapes, expected_shapes(config))
    processor = build_processor(config, tokenizer, image_mode, slices)

    with staging_folder(dst) as staging:
        write_weights([(path, from_tower) for path, from_tower, _ in plan], staging, target_dtype, vocab_size,
                      config.tie_word_embeddings)  # fmt: skip
        write_model_files(config, staging, folder, image_token_id)
        processor.save_pretrained(staging)
        write_model_card(config, staging, processor, card_sources, name, hub_sources, push_to_hub or str(dst))
    if push_to_hub:
        upload_converted(dst, push_to_hub)
    return dst


def _checkpoint_dtype(original: dict, shapes: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The checkpoint's own dtype: config.json `torch_dtype`, else that of its embedding matrix."""
    declared = original.get("torch_dtype") or original.get("dtype")
    if declared in DTYPES:
        return DTYPES[declared]
    embeddings = shapes.get("model.embed_tokens.weight")
    return embeddings.dtype if embeddings is not None and embeddings.is_floating_point() else torch.float32


def upload_converted(folder: Path, repo_id: str) -> None:
    """Uploads the converted `folder` to `repo_id`. A failure is an [`UploadError`] that says the folder is kept:
    the conversion itself succeeded, and redoing it to retry the upload would waste the user's time."""
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          commit_message="Convert the original TokenPacker checkpoint")  # fmt: skip
    # The Hub client's network errors differ between huggingface_hub releases (httpx, httpx2).
    except Exception as error:
        raise UploadError(
            f"converted into {folder}, but uploading it to {repo_id} on the Hub at {constants.ENDPOINT} failed "
            f"({one_line(error)}); the converted folder is kept: upload it with `hf upload {repo_id} {folder}`"
        ) from error


__all__ = [
    "ConversionError",
    "ConversionTerminated",
    "UploadError",
    "DEFAULT_VISION_TOWER",
    "convert_original_checkpoint",
    "convert_original_projector_state_dict",
    "convert_original_state_dict",
    "convert_vision_tower_state_dict",
]
