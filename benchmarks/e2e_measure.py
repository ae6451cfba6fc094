"""Measuring one request of the end-to-end benchmark (`bench_e2e.py`) with the models' own code paths: seconds
per stage (vision, projector, prefill, decode), KV-cache bytes, and peak memory."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from bench_projector import synchronize
from e2e_models import IMAGE_TOKEN_ID, Request, Shapes, base_request, build_one, prompt_ids
from torch import nn
from transformers import DynamicCache

# --------------------------------------------------------------------------------------------------------- timing


@contextmanager
def projector_clock(model: nn.Module, device: str) -> Iterator[dict]:
    """Records when the projector starts, so one `get_image_features` call splits into vision and projector."""
    marks: dict[str, float] = {}

    def start(*_):
        synchronize(device)
        marks["projector_start"] = time.perf_counter()

    handle = model.model.multi_modal_projector.register_forward_pre_hook(start)
    try:
        yield marks
    finally:
        handle.remove()


def image_features(model: nn.Module, request: Request, device: str) -> tuple[torch.Tensor, dict[str, float]]:
    """The model's own `get_image_features`, timed as vision (up to the projector) and projector (the rest)."""
    with projector_clock(model, device) as marks:
        synchronize(device)
        start = time.perf_counter()
        features = model.get_image_features(pixel_values=request.pixel_values, **request.image_kwargs)
        features = torch.cat(list(features.pooler_output))
        synchronize(device)
        end = time.perf_counter()
    return features, {"vision": marks["projector_start"] - start, "projector": end - marks["projector_start"]}


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of all key and value tensors held by the cache."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def prefill(model: nn.Module, input_ids: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """Merge as the models do (`masked_scatter` at `<image>` positions), LLM forward, first token."""
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    cache = DynamicCache(config=model.config.text_config)
    hidden = model.model.language_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    return model.lm_head(hidden.last_hidden_state[:, -1:]).argmax(-1), cache


def decode(model: nn.Module, token: torch.Tensor, cache: DynamicCache, steps: int) -> torch.Tensor:
    """Greedy decoding of `steps` tokens, one forward per token through the shared LLM and cache."""
    for _ in range(steps):
        hidden = model.model.language_model(input_ids=token, past_key_values=cache, use_cache=True)
        token = model.lm_head(hidden.last_hidden_state[:, -1:]).argmax(-1)
    return token


def run_request(model: nn.Module, request: Request, decode_tokens: int, device: str) -> dict[str, float]:
    """Seconds per stage of one request, plus `ttft`, `total` and the KV-cache bytes after prefill."""
    with torch.inference_mode():
        features, times = image_features(model, request, device)
        start = time.perf_counter()
        token, cache = prefill(model, request.input_ids, features)
        synchronize(device)
        times["prefill"] = time.perf_counter() - start
        kv_bytes = cache_bytes(cache)
        start = time.perf_counter()
        decode(model, token, cache, decode_tokens)
        synchronize(device)
        times["decode"] = time.perf_counter() - start
    times["ttft"] = times["vision"] + times["projector"] + times["prefill"]
    times["total"] = times["ttft"] + times["decode"]
    times["kv_cache_bytes"] = kv_bytes
    return times


def text_kv_cache_bytes(model: nn.Module, batch: int, device: str) -> int:
    """KV-cache bytes of the prompt's text alone (no image), which a request's cache holds besides the image's."""
    ids = prompt_ids([], batch, model.config.text_config.vocab_size, device)
    no_features = torch.empty(0, model.config.text_config.hidden_size, device=device, dtype=model.dtype)
    with torch.inference_mode():
        _, cache = prefill(model, ids, no_features)
    return cache_bytes(cache)


def check_pipeline(model: nn.Module, request: Request) -> bool:
    """The staged pipeline's first token equals the model's own forward (guards the timing code)."""
    with torch.inference_mode():
        features, _ = image_features(model, request, "cpu")
        token, _ = prefill(model, request.input_ids, features)
        kwargs = {
            ("image_sizes" if "image_sizes" in request.image_kwargs else "image_grids"): v
            for v in request.image_kwargs.values()
        }
        logits = model(input_ids=request.input_ids, pixel_values=request.pixel_values, **kwargs).logits
    return bool(torch.equal(logits[:, -1:].argmax(-1), token))


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


# --------------------------------------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """VmHWM of this process (resettable through /proc/self/clear_refs, unlike ru_maxrss)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) * 1024


def memory_probe(names: list[str], shapes: Shapes, decode_tokens: int, dtype: torch.dtype) -> dict[str, dict]:
    """Per model: RSS with the model loaded, and the peak above it during one request (batch 1)."""
    results = {}
    for name in names:
        model = build_one(name, shapes, dtype, "cpu")
        request = base_request(model, name, shapes, 1, dtype, "cpu")
        gc.collect()
        loaded = rss_bytes()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
        run_request(model, request, decode_tokens, "cpu")
        results[name] = {"loaded_rss_bytes": loaded, "peak_working_bytes": max(peak_rss_bytes() - loaded, 0)}
        del model, request
        gc.collect()
    return results


def measure_memory_cuda(models: dict[str, nn.Module], shapes: Shapes, args) -> dict[str, dict[str, int]]:
    """CUDA: the allocator's peak above what is allocated before the request, in-process."""
    results = {}
    for name, model in models.items():
        request = base_request(model, name, shapes, 1, model.dtype, args.device)
        torch.cuda.empty_cache()
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_request(model, request, args.decode_tokens, args.device)
        results[name] = {"loaded_rss_bytes": loaded, "peak_working_bytes": torch.cuda.max_memory_allocated() - loaded}
    return results
