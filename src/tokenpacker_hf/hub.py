# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""The Hugging Face Hub side of the package: finding a repo quickly, and writing the model cards and pushes that
go to one.

`huggingface_hub` retries a download whose metadata request fails (a network error or a 5xx answer) five times
with exponential backoff, and transformers asks for a dozen files per model, so a repo id that does not exist or
a Hub that cannot be reached used to cost minutes before an error. [`locate_repo`] asks once: a missing repo is
an error at once, and an unreachable Hub falls back to the local cache, or is an error when the repo is not
cached.

[`model_card`] writes the card every model this package saves carries (`push_to_hub`, `convert`, `init`, the
digits example): metadata inherited from the source models' cards, the token budget, and a usage snippet that
runs as written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, try_to_load_from_cache
from huggingface_hub.errors import (
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    StrictDataclassError,
)
from torch import nn

logger = logging.getLogger(__name__)


class HubError(OSError):
    """A Hub repo that cannot be used: it does not exist, the Hub refused it, or the Hub cannot be reached and the
    repo is not in the local cache. The message says which."""


@dataclass(frozen=True)
class ModelFiles:
    """A model folder or Hub repo (`name`, what `from_pretrained` takes), the names of its files, and whether
    only the local cache can be used.

    `cached_only` is True when offline mode is on or the Hub could not be reached but the repo's `config.json`
    is cached; loaders must then be called with `local_files_only=True`, or they would retry the Hub again.
    `revision` is the branch, tag or commit of a repo to load (None: the default branch; always None for a folder).
    """

    name: str
    files: frozenset[str]
    cached_only: bool
    revision: str | None = None


def one_line(error: BaseException) -> str:
    """The error's message on one line: loaders and the Hub client often spread theirs over several lines.

    A config that fails validation raises huggingface_hub's `StrictDataclassError` around the `ValueError` that
    names the field; that inner message is the one a user needs.
    """
    if isinstance(error, StrictDataclassError) and error.__cause__ is not None:
        error = error.__cause__
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def locate_repo(repo_id: str, revision: str | None = None) -> ModelFiles:
    """The files of Hub model repo `repo_id` at `revision` (default: its main branch), from one request bounded by
    `HF_HUB_ETAG_TIMEOUT` (10 s by default).

    Raises [`HubError`] when the repo or the revision does not exist (or is private or gated without a token) or
    the Hub refuses it; when offline mode is on or the Hub cannot be reached (a network error, a timeout, a 5xx
    answer), the locally cached snapshot is used, and [`HubError`] raised if there is none.
    """
    endpoint = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        return _cached_repo(repo_id, "offline mode is on (HF_HUB_OFFLINE)", revision)
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RevisionNotFoundError:
        raise HubError(f"the Hub model repo {repo_id} has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"the Hub at {endpoint} has no model repo {repo_id} (a private or gated repo needs a token: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status is not None and status < 500 and status not in (408, 429):
            raise HubError(f"the Hub at {endpoint} refused {repo_id}: {one_line(error)}") from None
        return _cached_repo(repo_id, f"the Hub at {endpoint} answered {status} for {repo_id}", revision)
    # Network errors are the HTTP client's own types, which differ between huggingface_hub releases (httpx, httpx2).
    except Exception as error:
        return _cached_repo(repo_id, f"the Hub at {endpoint} cannot be reached ({one_line(error)})", revision)
    files = frozenset(sibling.rfilename for sibling in info.siblings or ())
    return ModelFiles(repo_id, files, cached_only=False, revision=revision)


def _cached_repo(repo_id: str, reason: str, revision: str | None = None) -> ModelFiles:
    """The locally cached snapshot of `repo_id` at `revision` (the one holding its cached `config.json`), or a
    HubError."""
    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config, str):
        at = f" at revision {revision}" if revision else ""
        raise HubError(f"{reason}, and {repo_id}{at} is not in the local cache")
    snapshot = Path(config).parent
    files = frozenset(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())
    return ModelFiles(repo_id, files, cached_only=True, revision=revision)


# ----------------------------------------------------------------------------------------------------------------
# Model cards and pushing


@dataclass(frozen=True)
class CardExample:
    """What a model card's usage snippet asks, so that the snippet runs as written.

    `image` is a URL or a path (relative to where the snippet runs, which `where` tells the reader).
    """

    image: str = "http://images.cocodataset.org/val2017/000000039769.jpg"
    prompt: str = "Describe the image."
    dtype: str = "bfloat16"
    max_new_tokens: int = 64
    where: str = "`load_image` takes a URL or a local file path."


def _usage_snippet(repo_id: str, adapter_base: str | None, example: CardExample) -> str:
    """The card's Python snippet: load, ask `example.prompt` about `example.image`, print the answer."""
    dtype = f"dtype=torch.{example.dtype}"
    if adapter_base is None:
        load = f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True, {dtype})'
    else:
        load = (
            f'base = AutoModelForImageTextToText.from_pretrained("{adapter_base}", trust_remote_code=True, {dtype})\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")  # or .merge_and_unload() for a plain model'
        )
    peft_import = "from peft import PeftModel\n" if adapter_base is not None else ""
    return (
        "```python\nimport torch\n"
        + peft_import
        + "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        + "from transformers.image_utils import load_image\n\n"
        + load
        + "\n"
        + f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        + f"image = load_image({json.dumps(example.image)})\n"
        + 'messages = [{"role": "user", "content": [{"type": "image"},\n'
        + f'                                          {{"type": "text", "text": {json.dumps(example.prompt)}}}]}}]\n'
        + "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
        + 'inputs = processor(images=[image], text=prompt, return_tensors="pt")\n'
        + f"output = model.generate(**inputs, max_new_tokens={example.max_new_tokens})\n"
        + 'answer = output[:, inputs["input_ids"].shape[1]:]\n'
        + "print(processor.batch_decode(answer, skip_special_tokens=True)[0].strip())\n```"
    )


def source_card(source: str | os.PathLike) -> ModelCardData | None:
    """The metadata of the model card of `source` (a folder, or a Hub repo already in the local cache), or None
    when there is none to read. Never asks the Hub: cards are written offline, after the weights were fetched."""
    readme = Path(source) / "README.md"
    if not readme.is_file():
        cached = try_to_load_from_cache(str(source), "README.md") if not Path(source).exists() else None
        if not isinstance(cached, str):
            return None
        readme = Path(cached)
    try:
        return ModelCard.load(readme).data
    except Exception as error:  # a card with broken YAML front matter only costs the metadata it would give
        logger.warning("cannot read the model card of %s: %s", source, error)
        return None


def inherited_metadata(sources: list[str] | tuple[str, ...]) -> tuple[str, list[str]]:
    """The license and datasets a model made from `sources` inherits from their cards.

    The license is the sources' one when they agree, else "unknown" (the Hub's value for a license nobody stated;
    a mix needs a person to decide). Datasets are the union, in order.
    """
    licenses, datasets = set(), []
    for source in sources:
        data = source_card(source)
        licenses.add(getattr(data, "license", None) if data else None)
        for dataset in (getattr(data, "datasets", None) or []) if data else []:
            if dataset not in datasets:
                datasets.append(dataset)
    license = licenses.pop() if len(licenses) == 1 else None
    return license or "unknown", datasets


def token_budget(config: Any, image_processor: Any) -> str:
    """One line on how many LLM tokens an image costs with this config and image processor."""
    tokens = config.num_image_tokens
    patches = config.patch_grid_size**2
    line = (
        f"{tokens} tokens per {config.vision_config.image_size} px tile (the tower's {patches} patches packed by "
        f"scale factor {config.scale_factor})"
    )
    if getattr(image_processor, "image_mode", None) == "slice":
        most = (image_processor.max_slices + 1) * (tokens + 1)
        line += (
            f"; slice mode (TokenPacker-HD, up to {image_processor.max_slices} tiles plus a thumbnail, each followed "
            f"by a separator): at most {most} positions per image"
        )
    return line


def model_card(
    config: Any,
    repo_id: str,
    *,
    image_processor: Any = None,
    base_models: list[str] | tuple[str, ...] = (),
    adapter_base: str | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    description: str = "",
    license: str = "unknown",
    example: CardExample = CardExample(),
    eval_results: list[EvalResult] | None = None,
) -> ModelCard:
    """A Hub model card for a TokenPacker model (or, with `adapter_base`, a PEFT adapter on that base model) that
    `from_pretrained(repo_id)` loads: a repo id, or the folder the card is saved in, as the reader will pass it.

    Metadata: `license` (a Hub license id; "unknown" when nobody stated one), `pipeline_tag: image-text-to-text`,
    `library_name` (`transformers` or `peft`), `base_model`, `datasets`, tags (`tokenpacker`, `custom_code`,
    `lora`) and, with `eval_results`, a `model-index`. Body: the token budget and a usage snippet that asks
    `example` and runs as written.
    """
    bases = list(base_models) or ([adapter_base] if adapter_base else [])
    tags = ["tokenpacker", "image-text-to-text", "custom_code"] + (["lora", "peft"] if adapter_base else [])
    name = repo_id.rstrip("/").split("/")[-1]
    data = ModelCardData(
        license=license,
        library_name="peft" if adapter_base else "transformers",
        pipeline_tag="image-text-to-text",
        base_model=bases or None,
        datasets=list(datasets) or None,
        tags=tags,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    kind = f"LoRA adapter for [{adapter_base}](https://huggingface.co/{adapter_base})" if adapter_base else "model"
    body = [
        f"# {name}",
        "",
        f"A TokenPacker ([arXiv 2407.02392](https://arxiv.org/abs/2407.02392)) {kind}: a "
        f"{config.vision_config.model_type} vision tower, the `{config.projector_type}` projector and a "
        f"{config.text_config.model_type} language model. {description}".rstrip(),
        "",
        f"**Token budget:** {token_budget(config, image_processor)}.",
        "",
        "**Base models:** " + (", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases) if bases else "none"),
        "",
        "## Usage",
        "",
        f"The modelling code ships with the checkpoint; load it with `trust_remote_code=True`. {example.where}",
        "",
        _usage_snippet(repo_id, adapter_base, example),
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def push_to_hub(
    model: nn.Module,
    processor: Any,
    repo_id: str,
    *,
    base_models: list[str] | tuple[str, ...] = (),
    adapter_base: str | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    description: str = "",
    license: str = "unknown",
    private: bool | None = None,
    token: str | None = None,
) -> ModelCard:
    """Pushes a model (or a `PeftModel`'s adapter, with `adapter_base` naming its base repo), its processor and
    a [`model_card`] to `repo_id`; returns the card. The card goes last since both pushes write a README."""
    model.push_to_hub(repo_id, private=private, token=token)
    processor.push_to_hub(repo_id, private=private, token=token)
    config = model.get_base_model().config if adapter_base else model.config
    card = model_card(
        config,
        repo_id,
        image_processor=processor.image_processor,
        base_models=base_models,
        adapter_base=adapter_base,
        datasets=datasets,
        description=description,
        license=license,
    )
    # A fresh HfApi, like the uploads above, rather than `card.push_to_hub`, whose module-level client keeps the
    # endpoint it was imported with.
    HfApi(token=token).upload_file(
        path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo_id, commit_message="Add model card"
    )
    return card
