"""End-to-end speed and memory: LLaVA-1.5's 576-token MLP projector against TokenPacker (s = 2, 3, 4), and
TokenPacker-HD slicing against LLaVA-NeXT anyres, with the same vision tower and language model.

All models share one CLIP vision tower, one Llama language model and one LM head (the very same modules, so the
weights are identical by construction); they differ only in the projector and in how many image tokens reach
the LLM. Weights are random: speed and memory depend on shapes, not values.

Stages, timed per request with the models' own code paths:
  vision     `get_image_features` up to the projector's input (LLaVA: all 24 layers; ours: only as deep as
             the projector needs, 23 for CLIP-L)
  projector  the projector and per-image splitting / packing
  prefill    merge image features into the prompt embeddings, LLM forward with an empty cache, LM head on the
             last position (the first token)
  decode     greedy single-token steps with the cache
TTFT = vision + projector + prefill. Peak memory on CPU is measured in a fresh subprocess per model (peak RSS
during one request above the RSS with the model loaded); on CUDA with the allocator's peak counter.

    python benchmarks/bench_e2e.py --smoke --out /tmp/e2e.json          # seconds, tiny shapes
    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_cpu.json --plot docs/performance_cpu.png
    python benchmarks/bench_e2e.py --from-json benchmarks/results/e2e_cpu.json   # re-print the tables
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
import transformers
from torch import nn
from tqdm import tqdm
from transformers import (
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from tokenpacker_hf import TokenPackerConfig, TokenPackerForConditionalGeneration
from tokenpacker_hf.processing_tokenpacker import count_image_tokens
from tokenpacker_hf.projector_tokenpacker import build_projector

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_projector import Shapes as ProjectorShapes  # noqa: E402
from bench_projector import synchronize  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "llava-1.5-mlp"
IMAGE_TOKEN_ID = 4  # any id the random prompt never uses
PROMPT_TEXT_TOKENS = 40  # "USER: <image>\n <question> ASSISTANT:" is about this long in LLaMA tokens
TEXT_BEFORE_IMAGE = 5


@dataclass
class Shapes:
    """Model shapes of one run. `vision`/`text` are config kwargs; `text_7b` (Vicuna-7B; a wider tiny LLM in
    smoke runs) sets the FLOP estimates "with a 7B LLM" and the width of the projector-step comparison."""

    vision: dict
    text: dict
    region_feature_layers: list[int]
    scale_factors: list[int]
    hd_grids: dict[str, tuple[int, int]]  # name -> (rows, cols) of a square image's slice grid
    text_7b: dict = field(default_factory=dict)

    @property
    def tile(self) -> int:
        return self.vision["image_size"]

    @property
    def grid(self) -> int:
        return self.vision["image_size"] // self.vision["patch_size"]


CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768,
)
# Vicuna-7B's shape, for the FLOP model only: what the ratios become where the LLM dominates.
VICUNA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000,
)
# A Llama a CPU runs in minutes: Vicuna's layout (MHA, SwiGLU ratio 2.75, vocab 32000) at 1/4 width, 1/4 depth.
LLAMA_CPU = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=16, vocab_size=32000,
)


def full_shapes(llm: str) -> Shapes:
    """CLIP-L/336 with the chosen LLM; HD grids are the largest of max_slices 9 and 16 (a square image)."""
    text = dict(VICUNA_7B if llm == "7b" else LLAMA_CPU, max_position_embeddings=16384)
    return Shapes(
        vision=dict(CLIP_L_336), text=text, region_feature_layers=[12, 16, 22, 23], scale_factors=[2, 3, 4],
        hd_grids={"max_slices=9": (3, 3), "max_slices=16": (4, 4)}, text_7b=dict(VICUNA_7B),
    )


def smoke_shapes() -> Shapes:
    """Seconds-long shapes that keep every code path: a 12×12 patch grid divisible by 2, 3 and 4."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  image_size=48, patch_size=4, projection_dim=32)
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=4096)
    return Shapes(vision=vision, text=text, region_feature_layers=[1, 2, 3], scale_factors=[2, 3, 4],
                  hd_grids={"max_slices=9": (3, 3), "max_slices=16": (4, 4)},
                  text_7b=dict(text, hidden_size=192, intermediate_size=384))


# ----------------------------------------------------------------------------------------------- models


def tokenpacker_config(shapes: Shapes, scale_factor: int) -> TokenPackerConfig:
    return TokenPackerConfig(
        vision_config=dict(shapes.vision, model_type="clip_vision_model"),
        text_config=dict(shapes.text, model_type="llama"),
        image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
        region_feature_layers=shapes.region_feature_layers, scale_factor=scale_factor,
    )


def llava_config(shapes: Shapes) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**shapes.vision), text_config=LlamaConfig(**shapes.text),
        image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2, projector_hidden_act="gelu",
    )


def llava_next_config(shapes: Shapes) -> LlavaNextConfig:
    """LLaVA-NeXT anyres with pinpoints up to the largest HD grid, so a square image gets that grid."""
    side = max(max(grid) for grid in shapes.hd_grids.values())
    pinpoints = [[a * shapes.tile, b * shapes.tile] for a in range(1, side + 1) for b in range(1, side + 1)]
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**shapes.vision), text_config=LlamaConfig(**shapes.text),
        image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2, image_grid_pinpoints=pinpoints,
    )


def model_names(shapes: Shapes) -> list[str]:
    return [BASELINE] + [f"tokenpacker-s{s}" for s in shapes.scale_factors]


def build_one(name: str, shapes: Shapes, dtype: torch.dtype, device: str) -> nn.Module:
    """One model by benchmark name (`llava-mlp-576`, `llava-next`, `tokenpacker-s<k>`), eval mode, sdpa."""
    if name == BASELINE:
        model_cls, config = LlavaForConditionalGeneration, llava_config(shapes)
    elif name == "llava-next":
        model_cls, config = LlavaNextForConditionalGeneration, llava_next_config(shapes)
    else:
        model_cls, config = TokenPackerForConditionalGeneration, tokenpacker_config(shapes, int(name[-1]))
    with torch.device(device):
        return model_cls._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


def share_backbone(source: nn.Module, target: nn.Module) -> None:
    """Makes `target` use `source`'s vision tower, language model and LM head (same modules, same tensors)."""
    target.model.vision_tower = source.model.vision_tower
    target.model.language_model = source.model.language_model
    target.lm_head = source.lm_head


def build_models(names: list[str], shapes: Shapes, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    """All models of the run on one shared backbone. Projectors keep their own random weights."""
    models: dict[str, nn.Module] = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build_one(name, shapes, dtype, device)
        if len(models) > 1:
            share_backbone(models[names[0]], models[name])
    return models


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Request:
    """One batched request: `pixel_values` in the model's layout, `input_ids [B, L]`, extra image kwargs."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    image_kwargs: dict
    image_tokens: int  # sequence positions one image takes (incl. HD separators)


def prompt_ids(image_layout: list[int], batch: int, vocab: int, device: str) -> torch.Tensor:
    """`[B, L]`: BOS, a few text ids, the image layout, the rest of the ~40 text ids (same for every model)."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(IMAGE_TOKEN_ID + 1, vocab, (PROMPT_TEXT_TOKENS - 1,), generator=generator).tolist()
    ids = [1] + text[:TEXT_BEFORE_IMAGE - 1] + image_layout + text[TEXT_BEFORE_IMAGE - 1:]
    return torch.tensor([ids] * batch, device=device)


def slice_layout(rows: int, cols: int, tokens_per_tile: int, tile_sep: int, row_sep: int) -> list[int]:
    """TokenPacker-HD's layout of one image: rows of `F , F … F \\n`, then the thumbnail `F \\n`."""
    tile = [IMAGE_TOKEN_ID] * tokens_per_tile
    layout = ((tile + [tile_sep]) * (cols - 1) + tile + [row_sep]) * rows
    if rows * cols > 1:
        layout += tile + [row_sep]
    if len(layout) != count_image_tokens(rows, cols, tokens_per_tile):
        raise AssertionError("slice layout disagrees with tokenpacker_hf.count_image_tokens")
    return layout


def llava_next_image_tokens(model: nn.Module, side: int) -> int:
    """Tokens LLaVA-NeXT gives a square `side`×`side` image: base tile + unpadded grid with one newline per row."""
    config = model.config
    grid = config.vision_config.image_size // config.vision_config.patch_size
    rows = cols = side // config.vision_config.image_size
    return grid * grid + (rows * grid) * (cols * grid + 1)


def base_request(model: nn.Module, name: str, shapes: Shapes, batch: int, dtype, device) -> Request:
    """A 336 px image per prompt, `batch` prompts."""
    tokens = model.config.num_image_tokens if name != BASELINE else shapes.grid**2
    pixels = torch.randn(batch, 3, shapes.tile, shapes.tile, generator=torch.Generator().manual_seed(2))
    ids = prompt_ids([IMAGE_TOKEN_ID] * tokens, batch, shapes.text["vocab_size"], device)
    return Request(pixels.to(device, dtype), ids, {}, tokens)


def hd_request(model: nn.Module, name: str, shapes: Shapes, grid: tuple[int, int], dtype, device) -> Request:
    """One square image at `grid` tiles' resolution: ours sliced (+ thumbnail), LLaVA-NeXT anyres."""
    rows, cols = grid
    tiles = rows * cols + 1
    pixels = torch.randn(tiles, 3, shapes.tile, shapes.tile, generator=torch.Generator().manual_seed(3))
    vocab = shapes.text["vocab_size"]
    if name == "llava-next":
        side = rows * shapes.tile
        layout = [IMAGE_TOKEN_ID] * llava_next_image_tokens(model, side)
        kwargs = {"image_sizes": torch.tensor([[side, side]], device=device)}
        pixels = pixels[None]  # [images, tiles, 3, H, W]
    else:
        layout = slice_layout(rows, cols, model.config.num_image_tokens, tile_sep=vocab - 1, row_sep=0)
        kwargs = {"image_grids": torch.tensor([[rows, cols]], device=device)}
    return Request(pixels.to(device, dtype), prompt_ids(layout, 1, vocab, device), kwargs, len(layout))


# ----------------------------------------------------------------------------------------------- timing


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
        kwargs = {("image_sizes" if "image_sizes" in request.image_kwargs else "image_grids"): v
                  for v in request.image_kwargs.values()}
        logits = model(input_ids=request.input_ids, pixel_values=request.pixel_values, **kwargs).logits
    return bool(torch.equal(logits[:, -1:].argmax(-1), token))


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


# ----------------------------------------------------------------------------------------------- memory


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


def measure_memory(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """CPU: one fresh subprocess per model, so no model's allocations or heap growth leak into another's.
    Smoke runs probe in-process: there only the code path matters, and an interpreter start is most of a smoke
    run's time."""
    if args.smoke:
        return memory_probe(names, smoke_shapes(), args.decode_tokens, DTYPES[args.dtype])
    results = {}
    for name in tqdm(names, desc="peak memory (fresh subprocess per model)"):
        command = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, "--threads", str(args.threads),
                   "--decode-tokens", str(args.decode_tokens), "--dtype", args.dtype, "--llm", args.llm]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.update(json.loads(output.strip().splitlines()[-1]))
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


# ----------------------------------------------------------------------------------------------- FLOPs


def vision_flops(vision: dict, layers: int, tiles: int) -> float:
    """Patch embedding + `layers` ViT blocks on G²+1 tokens: 2·MACs of the Linears plus the attention matmuls."""
    d, inner, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    patches = (vision["image_size"] // patch) ** 2
    n = patches + 1
    per_layer = 2 * n * (4 * d * d + 2 * d * inner) + 4 * n * n * d
    return tiles * (2 * patches * 3 * patch * patch * d + layers * per_layer)


def mlp_projector_flops(vision: dict, text: dict, tokens: int) -> float:
    """LLaVA's two-layer MLP on every patch."""
    dv, h = vision["hidden_size"], text["hidden_size"]
    return 2 * tokens * (dv * h + h * h)


def tokenpacker_projector_flops(shapes: Shapes, text: dict, scale: int, tiles: int) -> float:
    """The projector benchmark's analytic count (region MLPs, point query, region-to-point attention,
    output MLP) with this run's widths."""
    vision = shapes.vision
    projector = ProjectorShapes(grid=shapes.grid, vision_width=vision["hidden_size"],
                                levels=len(shapes.region_feature_layers), width=vision["hidden_size"],
                                text_width=text["hidden_size"], scale_factor=scale)
    return tiles * projector.flops_per_image()


def llm_prefill_flops(text: dict, seq: int) -> float:
    """Causal prefill of `seq` tokens + LM head on the last position: 2·params·tokens + 2·d·seq² (causal half)."""
    d, inner, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    kv = d * text.get("num_key_value_heads", text["num_attention_heads"]) // text["num_attention_heads"]
    linear = 2 * seq * layers * (2 * d * d + 2 * d * kv + 3 * d * inner)
    attention = layers * 2 * d * seq * seq
    return linear + attention + 2 * d * text["vocab_size"]


def ttft_flops(name: str, shapes: Shapes, text: dict, image_tokens: int, tiles: int = 1,
               seq: int | None = None) -> dict[str, float]:
    """FLOPs per stage of the time to first token (batch 1)."""
    seq = seq if seq is not None else PROMPT_TEXT_TOKENS + image_tokens
    vision = shapes.vision
    if name in (BASELINE, "llava-next"):
        stages = {"vision": vision_flops(vision, vision["num_hidden_layers"], tiles),
                  "projector": tiles * mlp_projector_flops(vision, text, shapes.grid**2)}
    else:
        deepest = max(tokenpacker_config(shapes, int(name[-1])).vision_layers_needed)
        stages = {"vision": vision_flops(vision, deepest, tiles),
                  "projector": tokenpacker_projector_flops(shapes, text, int(name[-1]), tiles)}
    stages["prefill"] = llm_prefill_flops(text, seq)
    stages["ttft"] = sum(stages.values())
    return stages


def kv_bytes_per_image(text: dict, image_tokens: int, dtype_bytes: int) -> int:
    """layers · 2 (k, v) · kv_heads · head_dim · bytes · image tokens."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", text["num_attention_heads"])
    return text["num_hidden_layers"] * 2 * kv_heads * head_dim * dtype_bytes * image_tokens


# ----------------------------------------------------------------------------------------------- runs


def interleaved(jobs: list[tuple[str, Callable[[], dict]]], repeats: int, desc: str) -> dict[str, list[dict]]:
    """Runs every job `repeats` times, cycling through the jobs so that load drift hits all of them alike."""
    runs: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    with tqdm(total=repeats * len(jobs), desc=desc) as bar:
        for _ in range(repeats):
            for name, job in jobs:
                runs[name].append(job())
                bar.update()
    return runs


def bench_base(models: dict[str, nn.Module], shapes: Shapes, args) -> dict[str, Any]:
    """Per batch size: interleaved repeats of a full request per model, medians per stage."""
    out: dict[str, Any] = {}
    for batch in args.batch_sizes:
        requests = {name: base_request(model, name, shapes, batch, model.dtype, args.device)
                    for name, model in models.items()}
        jobs = [(name, lambda m=model, r=requests[name]: run_request(m, r, args.decode_tokens, args.device))
                for name, model in models.items()]
        # The first call of each model pays one-off costs (allocator growth, kernel selection). On CPU the
        # batch-1 warm-up serves the larger batches too: warming up at batch 16 would cost minutes per model.
        if batch == 1 or args.device.startswith("cuda"):
            for _, job in jobs:
                job()
        repeats = args.repeats if batch == 1 else args.batch_repeats
        runs = interleaved(jobs, repeats, f"batch {batch}")
        text_kv = text_kv_cache_bytes(next(iter(models.values())), batch, args.device)  # one shared LLM
        out[str(batch)] = {}
        for name in models:
            timing = medians(runs[name])
            out[str(batch)][name] = {
                "image_tokens": requests[name].image_tokens, "seq_len": requests[name].input_ids.shape[1],
                "repeats": repeats, "median_s": timing, "runs": runs[name],
                "kv_cache_bytes_per_image": (int(timing["kv_cache_bytes"]) - text_kv) // batch,
            }
    return out


def prefill_only(model: nn.Module, request: Request, device: str) -> dict[str, float]:
    """Prefill of the request's sequence with random image features in place of the tower's (same count)."""
    count = int((request.input_ids == IMAGE_TOKEN_ID).sum())
    features = torch.randn(count, model.config.text_config.hidden_size, device=device, dtype=model.dtype)
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        prefill(model, request.input_ids, features)
        synchronize(device)
    return {"prefill": time.perf_counter() - start}


def per_tile_image_seconds(base: dict[str, Any], name: str) -> float:
    """Vision + projector seconds per 336 px tile, from the largest batch measured (least overhead per tile)."""
    row = base[max(base, key=int)][name]
    return (row["median_s"]["vision"] + row["median_s"]["projector"]) / int(max(base, key=int))


def bench_hd(models: dict[str, nn.Module], shapes: Shapes, base: dict[str, Any], args) -> dict[str, Any]:
    """TokenPacker slice mode (s=2) vs LLaVA-NeXT anyres on one square image at each HD grid.

    `--hd-vision measure` runs the models' own `get_image_features` on all tiles. `extrapolate` (for slow
    CPUs) times only the prefill and takes vision + projector as tiles × the per-tile time of the 336 px runs:
    the tower sees the same 336 px tiles either way, and LLaVA-NeXT's projector is LLaVA-1.5's MLP.
    """
    contenders = {"llava-next": models["llava-next"], "tokenpacker-s2": models["tokenpacker-s2"]}
    per_tile_source = {"llava-next": BASELINE, "tokenpacker-s2": "tokenpacker-s2"}
    out: dict[str, Any] = {}
    for label, grid in shapes.hd_grids.items():
        requests = {name: hd_request(model, name, shapes, grid, model.dtype, args.device)
                    for name, model in contenders.items()}
        if args.hd_vision == "measure":
            jobs = [(name, lambda m=model, r=requests[name]: run_request(m, r, 0, args.device))
                    for name, model in contenders.items()]
        else:
            jobs = [(name, lambda m=model, r=requests[name]: prefill_only(m, r, args.device))
                    for name, model in contenders.items()]
        runs = interleaved(jobs, args.hd_repeats, f"HD {label} ({args.hd_vision})")
        out[label] = {}
        for name in contenders:
            tiles = grid[0] * grid[1] + 1
            timing = medians(runs[name])
            timing["ttft_extrapolated"] = tiles * per_tile_image_seconds(base, per_tile_source[name]) + timing["prefill"]
            out[label][name] = {"grid": list(grid), "tiles": tiles, "side_px": grid[0] * shapes.tile,
                                "image_tokens": requests[name].image_tokens,
                                "seq_len": requests[name].input_ids.shape[1], "repeats": args.hd_repeats,
                                "vision": args.hd_vision, "median_s": timing}
            if args.check:
                out[label][name]["pipeline_matches_forward"] = check_pipeline(contenders[name], requests[name])
    return out


def bench_projector_step(shapes: Shapes, args: argparse.Namespace) -> dict[str, Any]:
    """The projector step alone at Vicuna-7B's width: LLaVA-1.5's MLP on the G² patches against TokenPacker's
    projectors, same random vision features, interleaved medians.

    LLaVA's MLP is as wide as the LLM, so next to a narrow CPU-sized LLM it is cheap while TokenPacker's region
    MLPs (vision-width, on all G² patches) are not; whether our projector step is slower than the baseline's is
    decided at a real LLM width, which a CPU can run for the projector alone.
    """
    wide = replace(shapes, text=dict(shapes.text_7b, max_position_embeddings=4096))
    dtype = DTYPES[args.dtype]
    projectors = {BASELINE: LlavaMultiModalProjector(llava_config(wide))}
    projectors.update({f"tokenpacker-s{s}": build_projector(tokenpacker_config(wide, s)) for s in shapes.scale_factors})
    levels = len(shapes.region_feature_layers)
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(1, shapes.grid**2, shapes.vision["hidden_size"], generator=generator).to(args.device, dtype)
    region = torch.randn(1, shapes.grid**2, levels * shapes.vision["hidden_size"], generator=generator)
    region = region.to(args.device, dtype)

    def job(name: str) -> Callable[[], dict[str, float]]:
        projector = projectors[name].to(args.device, dtype).eval()
        inputs = (query,) if name == BASELINE else (query, region)

        def run() -> dict[str, float]:
            with torch.inference_mode():
                synchronize(args.device)
                start = time.perf_counter()
                projector(*inputs)
                synchronize(args.device)
            return {"projector": time.perf_counter() - start}
        return run

    jobs = [(name, job(name)) for name in projectors]
    for _, run in jobs:  # warm-up
        run()
    runs = interleaved(jobs, max(args.repeats, 5), "projector step at 7B width")
    base_flops = mlp_projector_flops(shapes.vision, wide.text, shapes.grid**2)
    rows = {}
    for name in projectors:
        flops = base_flops if name == BASELINE else tokenpacker_projector_flops(wide, wide.text, int(name[-1]), 1)
        rows[name] = {"median_s": statistics.median(run["projector"] for run in runs[name]), "flops": flops,
                      "flop_ratio": flops / base_flops, "repeats": len(runs[name])}
    for row in rows.values():
        row["ratio"] = row["median_s"] / rows[BASELINE]["median_s"]
    return {"text_hidden_size": wide.text["hidden_size"], "rows": rows}


def add_ratios(results: dict[str, Any], shapes: Shapes, dtype_bytes: int) -> None:
    """Ratios to the 576-token baseline (batch 1), FLOP-predicted ratios (run's LLM and Vicuna-7B), KV bytes."""
    text = shapes.text
    rows = results["base"]["1"]
    base = rows[BASELINE]
    for name, row in rows.items():
        tokens = row["image_tokens"]
        measured = row["median_s"]
        row["decode_tokens_per_s"] = results["decode_tokens"] / measured["decode"] if measured["decode"] else None
        flops = ttft_flops(name, shapes, text, tokens)
        flops_base = ttft_flops(BASELINE, shapes, text, base["image_tokens"])
        flops_7b = ttft_flops(name, shapes, shapes.text_7b, tokens)
        flops_7b_base = ttft_flops(BASELINE, shapes, shapes.text_7b, base["image_tokens"])
        row["flops"] = flops
        row["ratio"] = {stage: measured[stage] / base["median_s"][stage] for stage in ("vision", "projector",
                                                                                      "prefill", "ttft")}
        row["ratio"]["decode_tokens_per_s"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"] \
            if name != BASELINE else 1.0
        row["flop_ratio"] = {stage: flops[stage] / flops_base[stage] for stage in flops}
        row["flop_ratio_7b_llm"] = {stage: flops_7b[stage] / flops_7b_base[stage] for stage in flops_7b}
        row["kv_cache_bytes_per_image_formula"] = kv_bytes_per_image(text, tokens, dtype_bytes)
        row["kv_ratio_per_image"] = row["kv_cache_bytes_per_image"] / base["kv_cache_bytes_per_image"]
        mem = results["memory"].get(name)
        if mem:
            # Tiny (smoke) models can run inside memory the allocator already holds: no measurable peak, no ratio.
            base_peak = results["memory"][BASELINE]["peak_working_bytes"]
            row["memory"] = dict(mem, ratio=mem["peak_working_bytes"] / base_peak if base_peak > 0 else None)
    for batch, batch_rows in results["base"].items():
        for name, row in batch_rows.items():
            row["images_per_s"] = int(batch) / row["median_s"]["total"]
            row["images_per_s_ratio"] = row["images_per_s"] / (int(batch) / batch_rows[BASELINE]["median_s"]["total"])
    for label, hd_rows in results.get("hd", {}).items():
        next_row = hd_rows["llava-next"]
        for name, row in hd_rows.items():
            flops = ttft_flops(name, shapes, text, row["image_tokens"], row["tiles"], row["seq_len"])
            flops_next = ttft_flops("llava-next", shapes, text, next_row["image_tokens"], next_row["tiles"],
                                    next_row["seq_len"])
            key = "ttft" if "ttft" in row["median_s"] else "ttft_extrapolated"
            row["ttft"] = row["median_s"][key]
            row["ttft_ratio"] = row["ttft"] / next_row["median_s"][key]
            row["flop_ratio_ttft"] = flops["ttft"] / flops_next["ttft"]


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the numbers it was judged on."""
    rows = results["base"]["1"]
    s2 = rows["tokenpacker-s2"]
    predicted, measured = s2["flop_ratio"]["ttft"], s2["ratio"]["ttft"]
    grid_tokens = rows[BASELINE]["image_tokens"]
    kv_exact = {name: row["kv_cache_bytes_per_image"] * grid_tokens ==
                rows[BASELINE]["kv_cache_bytes_per_image"] * row["image_tokens"] for name, row in rows.items()}
    slower = {name: [stage for stage in ("vision", "projector", "prefill") if row["ratio"][stage] > 1.0]
              for name, row in rows.items() if name != BASELINE}
    step = results["projector_step"]["rows"]
    step_ratios = {name: row["ratio"] for name, row in step.items() if name != BASELINE}
    return {
        "ttft_144_within_10pct_of_flop_ratio": {"measured": measured, "predicted": predicted,
                                                "met": abs(measured / predicted - 1) <= 0.10},
        "kv_per_image_exact_fraction": {"per_model": kv_exact, "met": all(kv_exact.values())},
        "no_stage_slower_than_baseline": {"slower_stages": slower, "met": not any(slower.values())},
        "projector_step_not_slower_at_7b_width": {"ratio": step_ratios,
                                                  "met": all(r <= 1.0 for r in step_ratios.values())},
        "vision_faster": {"ratio": {name: row["ratio"]["vision"] for name, row in rows.items() if name != BASELINE},
                          "met": all(row["ratio"]["vision"] < 1.0 for name, row in rows.items() if name != BASELINE)},
    }


# ----------------------------------------------------------------------------------------------- report


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on."""
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    return {"device": args.device, "device_name": device_name, "cpus": os.cpu_count(),
            "cpu_affinity": sorted(os.sched_getaffinity(0)), "threads": args.threads,
            "dtype": args.dtype, "attn_implementation": "sdpa", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def fmt_bytes(count: float) -> str:
    return f"{count / 2**20:,.1f} MiB"


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/performance.md."""
    env, rows = results["env"], results["base"]["1"]
    lines = [f"Device: {env['device_name']} ({env['device']}), {env['threads']} threads, {env['dtype']}, "
             f"sdpa; torch {env['torch']}, transformers {env['transformers']}. LLM: {describe_llm(results['shapes']['text'])}. "
             f"Batch 1, medians of {rows[BASELINE]['repeats']} interleaved runs, times in ms; "
             f"ratios are ours / LLaVA-1.5 (576), FLOP-predicted in brackets.", "",
             "| model | image tokens | vision | projector | prefill | TTFT | TTFT ratio [FLOPs] "
             "| decode tok/s (ratio) | KV cache / image (ratio) | peak working memory (ratio) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        m, r, f = row["median_s"], row["ratio"], row["flop_ratio"]
        mem = row.get("memory")
        mem_ratio = "n/a" if mem is None or mem["ratio"] is None else f"{mem['ratio']:.2f}"
        mem_text = f"{fmt_bytes(mem['peak_working_bytes'])} ({mem_ratio})" if mem else "–"
        lines.append(
            f"| {name} | {row['image_tokens']} | {fmt_ms(m['vision'])} ({r['vision']:.2f} [{f['vision']:.2f}]) "
            f"| {fmt_ms(m['projector'])} ({r['projector']:.2f} [{f['projector']:.2f}]) "
            f"| {fmt_ms(m['prefill'])} ({r['prefill']:.2f} [{f['prefill']:.2f}]) | {fmt_ms(m['ttft'])} "
            f"| {r['ttft']:.3f} [{f['ttft']:.3f}] | {row['decode_tokens_per_s']:.1f} "
            f"({r['decode_tokens_per_s']:.2f}) | {fmt_bytes(row['kv_cache_bytes_per_image'])} "
            f"({row['kv_ratio_per_image']:.4f}) | {mem_text} |")
    lines += ["", "Batched throughput, images/s for a whole request (vision, projector, prefill, "
              f"{results['decode_tokens']} new tokens), ratio to LLaVA-1.5 in brackets:", "",
              "| model | " + " | ".join(f"batch {b}" for b in results["base"]) + " |",
              "|---|" + "---|" * len(results["base"])]
    for name in rows:
        cells = [f"{results['base'][b][name]['images_per_s']:.3f} ({results['base'][b][name]['images_per_s_ratio']:.2f})"
                 for b in results["base"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "FLOP-predicted TTFT ratio with a Vicuna-7B-shaped LLM (analytic, not measured): "
              + ", ".join(f"{name} {row['flop_ratio_7b_llm']['ttft']:.3f}" for name, row in rows.items()
                          if name != BASELINE) + "."]
    if results.get("hd"):
        lines += ["", "High resolution, one square image, batch 1 (TokenPacker s=2 slice mode vs LLaVA-NeXT anyres):",
                  "", "| setting | model | tiles | image tokens | prefill | TTFT | TTFT ratio [FLOPs] |",
                  "|---|---|---|---|---|---|---|"]
        for label, hd_rows in results["hd"].items():
            for name, row in hd_rows.items():
                side = row["side_px"]
                lines.append(f"| {label} ({side}×{side} px) | {name} | {row['tiles']} | {row['image_tokens']} "
                             f"| {fmt_ms(row['median_s']['prefill'])} | {fmt_ms(row['ttft'])} "
                             f"| {row['ttft_ratio']:.3f} [{row['flop_ratio_ttft']:.3f}] |")
    step = results["projector_step"]
    lines += ["", f"Projector step alone at Vicuna-7B's width (LLM hidden {step['text_hidden_size']}), batch 1, "
              "ms (ratio to LLaVA-1.5's MLP [FLOPs]):", "", "| model | projector ms | ratio [FLOPs] |", "|---|---|---|"]
    for name, row in step["rows"].items():
        lines.append(f"| {name} | {row['median_s'] * 1000:,.1f} | {row['ratio']:.2f} [{row['flop_ratio']:.2f}] |")
    lines += ["", "Targets:"] + [f"- {key}: {'met' if value['met'] else 'NOT met'} "
                                 f"({json.dumps({k: v for k, v in value.items() if k != 'met'}, default=str)})"
                                 for key, value in results["targets"].items()]
    return "\n".join(lines)


def describe_llm(text: dict) -> str:
    return (f"Llama, hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
            f"{text['num_attention_heads']} heads ({text['num_key_value_heads']} KV), "
            f"MLP {text['intermediate_size']}, vocab {text['vocab_size']}")


def plot(results: dict[str, Any], path: str) -> None:
    """TTFT (measured and FLOP-predicted) and KV bytes per image against image tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["base"]["1"]
    tokens = [row["image_tokens"] for row in rows.values()]
    base_ttft = rows[BASELINE]["median_s"]["ttft"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(tokens, [row["median_s"]["ttft"] * 1000 for row in rows.values()], "o-", label="measured")
    left.plot(tokens, [row["flop_ratio"]["ttft"] * base_ttft * 1000 for row in rows.values()], "x--",
              label="FLOP-predicted (scaled to 576)")
    left.set(xlabel="image tokens per image", ylabel="time to first token (ms)", title="TTFT, batch 1")
    right.plot(tokens, [row["kv_cache_bytes_per_image"] / 2**20 for row in rows.values()], "o-")
    right.set(xlabel="image tokens per image", ylabel="MiB", title="KV cache per image")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        for name, row in rows.items():
            axis.annotate(name.replace("tokenpacker-", "TP ").replace("llava-1.5-mlp", "LLaVA-1.5"),
                          (row["image_tokens"], axis.lines[0].get_ydata()[list(rows).index(name)]), fontsize=8)
    left.legend()
    env = results["env"]
    figure.suptitle(f"{env['device_name']}, {env['threads']} threads, {env['dtype']}; "
                    f"LLM hidden {results['shapes']['text']['hidden_size']} × {results['shapes']['text']['num_hidden_layers']} layers",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; checks the pipeline")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repeats at batch 1 (CPU 3, CUDA 10, smoke 1)")
    parser.add_argument("--batch-repeats", type=int, default=None, help="repeats at larger batches (CPU 1, CUDA 5)")
    parser.add_argument("--hd-repeats", type=int, default=None, help="(CPU 1, CUDA 5)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 4 16 (smoke 1 2)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--llm", choices=["cpu", "7b"], default=None,
                        help="LLM shape: 'cpu' (hidden 1024, 8 layers) or Vicuna-7B; default 7b on CUDA")
    parser.add_argument("--hd-vision", choices=["measure", "extrapolate"], default=None,
                        help="HD vision + projector time: run it, or tiles × the 336 px per-tile time "
                             "(default: measure on CUDA and in smoke runs, extrapolate on CPU)")
    parser.add_argument("--no-hd", dest="hd", action="store_false")
    parser.add_argument("--out", default=None, help="JSON result (default benchmarks/results/e2e_<device>.json)")
    parser.add_argument("--plot", default=None, help="also render TTFT / KV bytes vs tokens to this PNG")
    parser.add_argument("--from-json", default=None, help="skip measuring: print (and plot) a results file")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.llm = args.llm or ("7b" if args.device.startswith("cuda") else "cpu")
    cuda = args.device.startswith("cuda")
    args.repeats = args.repeats or (1 if args.smoke else 10 if cuda else 3)
    args.batch_repeats = args.batch_repeats or (5 if cuda and not args.smoke else 1)
    args.hd_repeats = args.hd_repeats or (5 if cuda and not args.smoke else 1)
    args.hd_vision = args.hd_vision or ("measure" if cuda or args.smoke else "extrapolate")
    args.out = args.out or os.path.join(REPO, "benchmarks", "results", f"e2e_{args.device.split(':')[0]}.json")
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.smoke else [1, 4, 16])
    if 1 not in args.batch_sizes:
        parser.error("--batch-sizes must include 1: the ratios are taken at batch 1")
    args.check = args.smoke
    return args


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    shapes = smoke_shapes() if args.smoke else full_shapes(args.llm)
    dtype = DTYPES[args.dtype]
    names = model_names(shapes) + (["llava-next"] if args.hd else [])
    models = build_models(names, shapes, dtype, args.device)
    base_models = {name: models[name] for name in model_names(shapes)}
    results: dict[str, Any] = {"env": environment(args), "smoke": args.smoke, "decode_tokens": args.decode_tokens,
                               "shapes": {**asdict(shapes), "hd_grids": {k: list(v) for k, v in shapes.hd_grids.items()}},
                               "prompt_text_tokens": PROMPT_TEXT_TOKENS}
    if args.check:
        results["pipeline_matches_forward"] = {
            name: check_pipeline(model, base_request(model, name, shapes, 2, dtype, args.device))
            for name, model in base_models.items()}
    results["base"] = bench_base(base_models, shapes, args)
    results["projector_step"] = bench_projector_step(shapes, args)
    if args.hd:
        results["hd"] = bench_hd(models, shapes, results["base"], args)
    del models, base_models
    gc.collect()
    if args.device.startswith("cuda"):
        results["memory"] = measure_memory_cuda(build_models(model_names(shapes), shapes, dtype, args.device),
                                                shapes, args)
    else:
        results["memory"] = measure_memory(model_names(shapes), args)
    add_ratios(results, shapes, torch.tensor([], dtype=dtype).element_size())
    results["targets"] = check_targets(results)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        shapes = smoke_shapes() if args.smoke else full_shapes(args.llm)
        print(json.dumps(memory_probe(args.memory_probe.split(","), shapes, args.decode_tokens, DTYPES[args.dtype])))
        return
    if args.from_json:
        with open(args.from_json) as file:
            results = json.load(file)
    else:
        started = time.perf_counter()
        results = measure(args)
        results["wall_s"] = time.perf_counter() - started
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)
    print(markdown(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
