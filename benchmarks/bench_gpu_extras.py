"""The GPU suite's measurements that `bench_projector.py` and `bench_e2e.py` do not make, one part per call so that
`benchmarks/gpu_suite.sh` can give each its own time limit. A part writes its JSON after every row, so one cut
off by its limit keeps the rows it finished (`"complete": false`).

  env      versions (python, torch, CUDA, cuDNN, transformers and the rest), the device, whether torch.compile's
           toolchain (a C compiler, Python.h) is present, where `tokenpacker_hf` is imported from, and whether
           every requirement in pyproject.toml is met; exits non-zero if one is not.
  sdpa     which scaled-dot-product-attention backend the projector's region attention takes: queries
           `[B·T, H, 1, d]` over keys/values `[B·T, H, s², d]` (CLIP-L + Vicuna-7B widths: T = 144, H = 8,
           d = 128, s² = 4). The projector runs with each backend alone (`sdpa_kernel([backend])` for flash,
           efficient, cudnn, math): which of them run, their median ms next to the default choice's, and their max
           |difference| from it. One default call runs under the torch profiler: the aten SDPA op it dispatched to
           names the backend taken, and its device kernels are listed with those whose names say flash, efficient
           (fmha), cudnn or math (the math path's softmax) flagged.
  compile  `torch.compile(projector)` against eager, per mode (default; reduce-overhead = CUDA graphs) and batch:
           first-call seconds (the compile), median ms of both, and the max |difference| of their outputs.
  train    stage-2 optimizer steps per second at equal batch: LLaVA-1.5 (MLP, 576 image tokens) against TokenPacker
           s=2 (144), on e2e_models' shared random CLIP-L tower and Vicuna-7B-shaped LLM; the tower frozen, the
           projector, LLM and LM head trained (`apply_preset(model, "stage2")`) with fused AdamW in the run's dtype
           (no fp32 master copy: 7B parameters, gradients and two moments in bf16 take 54 GB).

Projector shapes are bench_projector's, models e2e_models'; `--smoke` takes their tiny shapes (seconds on a CPU).

Usage:
    python benchmarks/bench_gpu_extras.py sdpa --out sdpa.json          # CUDA if present, bf16
    python benchmarks/bench_gpu_extras.py train --smoke --device cpu --out train.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import sysconfig
import warnings
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_models  # noqa: E402
from bench_projector import (  # noqa: E402
    DTYPES,
    FULL,
    SMOKE,
    Shapes,
    build_pair,
    make_inputs,
    synchronize,
    time_call,
    time_interleaved,
)
from e2e_report import cpu_model, describe_llm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
# The aten op `scaled_dot_product_attention` dispatches to names the backend (CPU's flash is `..._for_cpu`).
SDPA_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_attention_math": "math",
}
# Substrings of device kernel names per backend; the projector has no softmax of its own, so one means the math path.
KERNEL_HINTS = {
    "flash": ("flash",),
    "efficient": ("fmha", "efficient", "mem_eff"),
    "cudnn": ("cudnn", "fort_native_sdpa"),
    "math": ("softmax",),
}
# Max |compiled - eager| allowed, relative to max |eager|: fused kernels round intermediates differently, by up to
# a few units in the last place of the dtype (bf16 has 8 bits of mantissa).
COMPILE_TOLERANCE = {torch.bfloat16: 2**-5, torch.float32: 1e-4}
PACKAGES = (
    "transformers",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "accelerate",
    "peft",
    "numpy",
    "pillow",
    "tqdm",
    "packaging",
)


def write(out: Path, result: dict[str, Any]) -> None:
    """Writes the part's JSON now, so what is finished survives the part being stopped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def header(args: argparse.Namespace, part: str) -> dict[str, Any]:
    """What every part's JSON starts with."""
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model()
    return {
        "benchmark": f"gpu_extras.{part}",
        "smoke": args.smoke,
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "complete": False,
    }


# ----------------------------------------------------------------------------------------------- env


def installed(name: str) -> str | None:
    """The version of distribution `name` importable here, None if there is none."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def requirements_met() -> dict[str, dict[str, Any]]:
    """Each requirement of pyproject.toml's `dependencies` against the version importable here."""
    import tomllib
    from packaging.requirements import Requirement

    with open(REPO / "pyproject.toml", "rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    met = {}
    for requirement in map(Requirement, dependencies):
        found = installed(requirement.name)
        met[requirement.name] = {
            "required": str(requirement.specifier),
            "installed": found,
            "ok": found is not None and requirement.specifier.contains(found, prereleases=True),
        }
    return met


def part_env(args: argparse.Namespace) -> dict[str, Any]:
    """Versions, device and toolchain; `ok` is False if a requirement of pyproject.toml is unmet."""
    import tokenpacker_hf

    result = header(args, "env")
    source = Path(tokenpacker_hf.__file__).resolve().parent
    result["tokenpacker_hf"] = str(source.relative_to(REPO)) if source.is_relative_to(REPO) else str(source)
    result.update(
        python=platform.python_version(),
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        packages={name: installed(name) for name in PACKAGES},
        requirements=requirements_met(),
        c_compiler=shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
        python_h=(Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
    )
    if args.device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(args.device)
        result.update(
            capability=list(torch.cuda.get_device_capability(args.device)),
            device_memory_bytes=properties.total_memory,
            multiprocessors=properties.multi_processor_count,
        )
    result["ok"] = all(row["ok"] for row in result["requirements"].values())
    result["complete"] = True
    write(args.out, result)
    print(
        f"python {result['python']}, torch {result['torch']} (CUDA {result['cuda']}, cuDNN {result['cudnn']}), "
        f"transformers {result['transformers']}, device {result['device_name']}; tokenpacker_hf from "
        f"{result['tokenpacker_hf']}; C compiler {result['c_compiler']}, Python.h {result['python_h']}"
    )
    for name, row in result["requirements"].items():
        if not row["ok"]:
            print(f"UNMET: {name} {row['required']}, found {row['installed']}")
    return result


# ----------------------------------------------------------------------------------------------- sdpa


def try_backend(fn: Callable[[], torch.Tensor], backend: SDPBackend) -> tuple[torch.Tensor | None, str | None]:
    """`fn()` with only `backend` allowed: (output, None), or (None, why not) with torch's reasons from its warnings."""
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
        warnings.simplefilter("always")
        try:
            return fn(), None
        except RuntimeError as error:
            reasons = [str(warning.message).splitlines()[0] for warning in caught]
            return None, " | ".join([str(error).splitlines()[0], *reasons])[:600]


def restricted(fn: Callable[[], torch.Tensor], backend: SDPBackend) -> Callable[[], torch.Tensor]:
    """`fn` that runs with only `backend` allowed."""

    def call() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return fn()

    return call


def backend_rows(fn: Callable[[], torch.Tensor], device: str, repeats: int, budget_s: float) -> dict[str, dict]:
    """Per backend: does the projector run with it alone, median ms (timed interleaved with the default choice),
    max |difference| from the default output."""
    reference = fn()
    rows: dict[str, dict] = {}
    calls = {"default": fn}
    for name, backend in BACKENDS.items():
        output, error = try_backend(fn, backend)
        rows[name] = {"ok": error is None, "error": error}
        if output is not None:
            rows[name]["max_abs_diff_vs_default"] = (output.float() - reference.float()).abs().max().item()
            calls[name] = restricted(fn, backend)
    medians = time_interleaved(calls, device, repeats, budget_s)
    rows["default"] = {"ok": True, "error": None, "max_abs_diff_vs_default": 0.0}
    for name, seconds in medians.items():
        rows[name]["ms"] = seconds * 1e3
    return rows


def backend_of(op_names: list[str]) -> str | None:
    """The SDPA backend named by the dispatched aten ops (None if none of them is an SDPA backend op)."""
    for op in op_names:
        for prefix, backend in SDPA_OPS.items():
            if op.removeprefix("aten::").startswith(prefix):
                return backend
    return None


def profile_call(fn: Callable[[], torch.Tensor], device: str) -> dict[str, Any]:
    """One call under the torch profiler: the SDPA aten ops, the backend they name, and the device kernels
    (name, calls, device µs; longest first) with the backend hints found in their names."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as profiler:
        fn()
        synchronize(device)
    events = profiler.key_averages()
    sdpa_ops = sorted({event.key for event in events if "scaled_dot_product" in event.key})
    kernels = sorted(
        (
            {"name": event.key[:200], "calls": event.count, "device_us": event.device_time_total}
            for event in events
            if event.device_type == torch.autograd.DeviceType.CUDA
        ),
        key=lambda kernel: -kernel["device_us"],
    )
    hints = {
        backend: sorted({kernel["name"] for kernel in kernels if any(h in kernel["name"].lower() for h in keys)})
        for backend, keys in KERNEL_HINTS.items()
    }
    return {"sdpa_ops": sdpa_ops, "backend_taken": backend_of(sdpa_ops), "kernels": kernels[:40], "kernel_hints": hints}


def part_sdpa(args: argparse.Namespace) -> dict[str, Any]:
    """Per batch: `backend_rows` and `profile_call` of the projector at the run's shapes and dtype."""
    shapes = SMOKE if args.smoke else FULL
    projector = build_pair(shapes)[0].to(args.device, DTYPES[args.dtype])
    result = header(args, "sdpa") | {"shapes": asdict(shapes), "attention": attention_shapes(shapes), "rows": []}
    for batch in args.batches:
        query, region = make_inputs(shapes, batch, DTYPES[args.dtype], args.device)
        with torch.inference_mode():
            fn = partial(projector, query, region)
            fn()  # warm-up outside the profiler: the first call pays one-off initialisation
            row = {
                "batch": batch,
                "backends": backend_rows(fn, args.device, args.repeats, args.budget_s),
                "profile": profile_call(fn, args.device),
            }
        result["rows"].append(row)
        write(args.out, result)
        ran = [name for name, backend in row["backends"].items() if backend["ok"] and name != "default"]
        print(
            f"batch {batch}: default takes {row['profile']['backend_taken']} "
            f"({row['backends']['default']['ms']:.3f} ms); alone, these run: "
            + ", ".join(f"{name} {row['backends'][name]['ms']:.3f} ms" for name in ran)
        )
    result["complete"] = True
    write(args.out, result)
    return result


def attention_shapes(shapes: Shapes) -> dict[str, int]:
    """Per image: T point queries, each attending to s² keys, with `heads` heads of `head_dim`."""
    return {
        "queries_per_image": (shapes.grid // shapes.scale_factor) ** 2,
        "keys_per_query": shapes.scale_factor**2,
        "heads": shapes.heads,
        "head_dim": shapes.width // shapes.heads,
    }


# ----------------------------------------------------------------------------------------------- compile


def compile_row(projector: nn.Module, shapes: Shapes, batch: int, mode: str, args: argparse.Namespace) -> dict:
    """torch.compile of the projector in `mode` at `batch` against eager: compile seconds, medians, output diff."""
    dtype = DTYPES[args.dtype]
    query, region = make_inputs(shapes, batch, dtype, args.device)
    torch._dynamo.reset()  # every row compiles anew (on-disk caches of earlier rows may still shorten it)
    compiled = torch.compile(projector, mode=mode)
    row: dict[str, Any] = {"batch": batch, "mode": mode}
    with torch.no_grad():
        eager = projector(query, region)
        row["compile_s"] = time_call(lambda: compiled(query, region), args.device)
        for _ in range(2):  # reduce-overhead records its CUDA graph on a later call than the first
            compiled(query, region)
        medians = time_interleaved(
            {"eager": lambda: projector(query, region), "compiled": lambda: compiled(query, region)},
            args.device,
            args.repeats,
            args.budget_s,
        )
        output = compiled(query, region).clone()  # a CUDA graph's output is overwritten by its next replay
    difference = (output.float() - eager.float()).abs().max().item()
    scale = eager.float().abs().max().item()
    row.update(
        eager_ms=medians["eager"] * 1e3,
        compiled_ms=medians["compiled"] * 1e3,
        speedup=medians["eager"] / medians["compiled"],
        max_abs_diff=difference,
        max_abs_eager=scale,
        close=difference <= COMPILE_TOLERANCE[dtype] * scale,
    )
    return row


def part_compile(args: argparse.Namespace) -> dict[str, Any]:
    """`compile_row` for each mode and batch; a row that fails records its error and the others still run."""
    shapes = SMOKE if args.smoke else FULL
    projector = build_pair(shapes)[0].to(args.device, DTYPES[args.dtype])
    result = header(args, "compile") | {
        "shapes": asdict(shapes),
        "tolerance": COMPILE_TOLERANCE[DTYPES[args.dtype]],
        "rows": [],
    }
    for batch in args.batches:
        for mode in args.compile_modes:
            try:
                row = compile_row(projector, shapes, batch, mode, args)
                print(
                    f"batch {batch} {mode}: compile {row['compile_s']:.1f} s, eager {row['eager_ms']:.3f} ms, "
                    f"compiled {row['compiled_ms']:.3f} ms, max abs diff {row['max_abs_diff']:.2e}"
                )
            except Exception as error:  # e.g. no C compiler for Triton: the finding, and the next row may work
                row = {"batch": batch, "mode": mode, "error": f"{type(error).__name__}: {str(error)[:600]}"}
                print(f"batch {batch} {mode}: {row['error']}")
            result["rows"].append(row)
            write(args.out, result)
    result["complete"] = True
    write(args.out, result)
    return result


# ----------------------------------------------------------------------------------------------- train


def train_row(model: nn.Module, name: str, shapes: e2e_models.Shapes, args: argparse.Namespace) -> dict[str, Any]:
    """Stage-2 steps of one model on one fixed batch (`pixel_values [B, 3, H, W]`, `input_ids [B, L]`, labels
    -100 at image positions): warm-up steps (they allocate the optimizer state), then timed steps."""
    from tokenpacker_hf.training import apply_preset

    dtype = DTYPES[args.dtype]
    apply_preset(model, "stage2").train()
    request = e2e_models.base_request(model, name, shapes, args.train_batch, dtype, args.device)
    labels = request.input_ids.masked_fill(request.input_ids == e2e_models.IMAGE_TOKEN_ID, -100)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=True)
    losses: list[float] = []

    def step() -> None:
        loss = model(input_ids=request.input_ids, pixel_values=request.pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    for _ in range(args.train_warmup):
        step()
    seconds = [time_call(step, args.device) for _ in range(args.train_steps)]
    median = statistics.median(seconds)
    row = {
        "batch": args.train_batch,
        "seq_len": request.input_ids.shape[1],
        "image_tokens": request.image_tokens,
        "trainable_parameters": sum(parameter.numel() for parameter in parameters),
        "vision_tower_trainable": any(p.requires_grad for p in model.model.vision_tower.parameters()),
        "steps": len(seconds),
        "median_step_s": median,
        "steps_per_s": 1 / median,
        "samples_per_s": args.train_batch / median,
        "losses": losses,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(args.device) if args.device.startswith("cuda") else None,
    }
    return row


def part_train(args: argparse.Namespace) -> dict[str, Any]:
    """`train_row` for LLaVA-1.5 and TokenPacker s=2 on one shared backbone, one after the other (only one
    optimizer state exists at a time); ratios to LLaVA-1.5."""
    shapes = e2e_models.smoke_shapes() if args.smoke else e2e_models.full_shapes("7b")
    names = [e2e_models.BASELINE, "tokenpacker-s2"]
    models = e2e_models.build_models(names, shapes, DTYPES[args.dtype], args.device)
    result = header(args, "train") | {"llm": describe_llm(shapes.text), "optimizer": "AdamW (fused)", "rows": {}}
    for name in names:
        try:
            result["rows"][name] = train_row(models[name], name, shapes, args)
            row = result["rows"][name]
            print(
                f"{name}: {row['steps_per_s']:.2f} steps/s, {row['samples_per_s']:.1f} samples/s "
                f"(batch {row['batch']}, {row['seq_len']} tokens each)"
            )
        except torch.cuda.OutOfMemoryError as error:  # the other model may still fit: record and go on
            result["rows"][name] = {"error": f"OutOfMemoryError: {str(error)[:300]}"}
            print(f"{name}: out of memory")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        write(args.out, result)
    rows = result["rows"]
    if all("steps_per_s" in row for row in rows.values()):
        result["tokenpacker_s2_steps_per_s_ratio"] = (
            rows["tokenpacker-s2"]["steps_per_s"] / rows[e2e_models.BASELINE]["steps_per_s"]
        )
    result["complete"] = True
    write(args.out, result)
    return result


# ----------------------------------------------------------------------------------------------- main


PARTS = {"env": part_env, "sdpa": part_sdpa, "compile": part_compile, "train": part_train}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats, seconds on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, required=True, help="JSON result")
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="projector batches for sdpa and compile (default sdpa 1 8 32, compile 1 8)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 50, smoke 3)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="approximate timed seconds per comparison, caps the repeats (default 3, smoke 0.5)",
    )
    parser.add_argument("--compile-modes", nargs="+", default=["default", "reduce-overhead"])
    parser.add_argument("--train-batch", type=int, default=None, help="samples per step (default 8, smoke 2)")
    parser.add_argument("--train-warmup", type=int, default=None, help="untimed steps first (default 2, smoke 1)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps (default 6, smoke 2)")
    args = parser.parse_args(argv)
    defaults = dict(
        batches=[1, 8] if args.part == "compile" else [1, 8, 32],
        repeats=3 if args.smoke else 50,
        budget_s=0.5 if args.smoke else 3.0,
        train_batch=2 if args.smoke else 8,
        train_warmup=1 if args.smoke else 2,
        train_steps=2 if args.smoke else 6,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = PARTS[args.part](args)
    if args.part == "env" and not result["ok"]:
        sys.exit("environment check failed: see the UNMET lines above and the JSON")
    return result


if __name__ == "__main__":
    main()
