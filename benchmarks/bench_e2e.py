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

This file runs the measurements and writes the results; the models and requests are in `e2e_models.py`, one
request's measurement in `e2e_measure.py`, the FLOP model in `e2e_flops.py`, ratios, goals and tables in
`e2e_report.py`.

    python benchmarks/bench_e2e.py --smoke --out e2e_smoke.json          # seconds, tiny shapes
    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_cpu.json --plot docs/performance_cpu.png
    python benchmarks/bench_e2e.py --from-json benchmarks/results/e2e_cpu.json   # re-print the tables
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from tokenpacker_hf.projector_tokenpacker import build_projector

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_projector import synchronize  # noqa: E402
from e2e_flops import mlp_projector_flops, tokenpacker_projector_flops  # noqa: E402
from e2e_measure import (  # noqa: E402
    check_pipeline,
    measure_memory_cuda,
    medians,
    memory_probe,
    prefill,
    run_request,
    text_kv_cache_bytes,
)
from e2e_models import (  # noqa: E402
    BASELINE,
    IMAGE_TOKEN_ID,
    PROMPT_TEXT_TOKENS,
    Request,
    Shapes,
    base_request,
    build_models,
    full_shapes,
    hd_request,
    llava_config,
    model_names,
    smoke_shapes,
    tokenpacker_config,
)
from e2e_report import add_ratios, check_targets, environment, markdown, plot  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------- runs


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
        requests = {
            name: base_request(model, name, shapes, batch, model.dtype, args.device) for name, model in models.items()
        }
        jobs = [
            (name, lambda m=model, r=requests[name]: run_request(m, r, args.decode_tokens, args.device))
            for name, model in models.items()
        ]
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
                "image_tokens": requests[name].image_tokens,
                "seq_len": requests[name].input_ids.shape[1],
                "repeats": repeats,
                "median_s": timing,
                "runs": runs[name],
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
        requests = {
            name: hd_request(model, name, shapes, grid, model.dtype, args.device) for name, model in contenders.items()
        }
        if args.hd_vision == "measure":
            jobs = [
                (name, lambda m=model, r=requests[name]: run_request(m, r, 0, args.device))
                for name, model in contenders.items()
            ]
        else:
            jobs = [
                (name, lambda m=model, r=requests[name]: prefill_only(m, r, args.device))
                for name, model in contenders.items()
            ]
        runs = interleaved(jobs, args.hd_repeats, f"HD {label} ({args.hd_vision})")
        out[label] = {}
        for name in contenders:
            tiles = grid[0] * grid[1] + 1
            timing = medians(runs[name])
            timing["ttft_extrapolated"] = (
                tiles * per_tile_image_seconds(base, per_tile_source[name]) + timing["prefill"]
            )
            out[label][name] = {
                "grid": list(grid),
                "tiles": tiles,
                "side_px": grid[0] * shapes.tile,
                "image_tokens": requests[name].image_tokens,
                "seq_len": requests[name].input_ids.shape[1],
                "repeats": args.hd_repeats,
                "vision": args.hd_vision,
                "median_s": timing,
            }
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
        rows[name] = {
            "median_s": statistics.median(run["projector"] for run in runs[name]),
            "flops": flops,
            "flop_ratio": flops / base_flops,
            "repeats": len(runs[name]),
        }
    for row in rows.values():
        row["ratio"] = row["median_s"] / rows[BASELINE]["median_s"]
    return {"text_hidden_size": wide.text["hidden_size"], "rows": rows}


# --------------------------------------------------------------------------------------------------------- memory


def measure_memory(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """CPU: one fresh subprocess per model, so no model's allocations or heap growth leak into another's.
    Smoke runs probe in-process: there only the code path matters, and an interpreter start is most of a smoke
    run's time."""
    if args.smoke:
        return memory_probe(names, smoke_shapes(), args.decode_tokens, DTYPES[args.dtype])
    results = {}
    for name in tqdm(names, desc="peak memory (fresh subprocess per model)"):
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-probe",
            name,
            "--threads",
            str(args.threads),
            "--decode-tokens",
            str(args.decode_tokens),
            "--dtype",
            args.dtype,
            "--llm",
            args.llm,
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.update(json.loads(output.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; checks the pipeline")
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats at batch 1 (CPU 3, CUDA 10, smoke 1)"
    )
    parser.add_argument("--batch-repeats", type=int, default=None, help="repeats at larger batches (CPU 1, CUDA 5)")
    parser.add_argument("--hd-repeats", type=int, default=None, help="(CPU 1, CUDA 5)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 4 16 (smoke 1 2)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 on CPU, bf16 on CUDA"
    )
    parser.add_argument(
        "--llm",
        choices=["cpu", "7b"],
        default=None,
        help="LLM shape: 'cpu' (hidden 1024, 8 layers) or Vicuna-7B; default 7b on CUDA",
    )
    parser.add_argument(
        "--hd-vision",
        choices=["measure", "extrapolate"],
        default=None,
        help="HD vision + projector time: run it, or tiles × the 336 px per-tile time "
        "(default: measure on CUDA and in smoke runs, extrapolate on CPU)",
    )
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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    shapes = smoke_shapes() if args.smoke else full_shapes(args.llm)
    dtype = DTYPES[args.dtype]
    names = model_names(shapes) + (["llava-next"] if args.hd else [])
    models = build_models(names, shapes, dtype, args.device)
    base_models = {name: models[name] for name in model_names(shapes)}
    results: dict[str, Any] = {
        "env": environment(args),
        "smoke": args.smoke,
        "decode_tokens": args.decode_tokens,
        "shapes": {**asdict(shapes), "hd_grids": {k: list(v) for k, v in shapes.hd_grids.items()}},
        "prompt_text_tokens": PROMPT_TEXT_TOKENS,
    }
    if args.check:
        results["pipeline_matches_forward"] = {
            name: check_pipeline(model, base_request(model, name, shapes, 2, dtype, args.device))
            for name, model in base_models.items()
        }
    results["base"] = bench_base(base_models, shapes, args)
    results["projector_step"] = bench_projector_step(shapes, args)
    if args.hd:
        results["hd"] = bench_hd(models, shapes, results["base"], args)
    del models, base_models
    gc.collect()
    if args.device.startswith("cuda"):
        results["memory"] = measure_memory_cuda(
            build_models(model_names(shapes), shapes, dtype, args.device), shapes, args
        )
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
