"""Speed of `TokenPackerProjector` against the original formulation (`nn.MultiheadAttention` over
`divide_feature` groups, `tests/reference/original_tokenpacker.py`), same weights, same inputs.

Default shapes are CLIP ViT-L/14-336 + Vicuna-7B: 576 patches, query width 1024, 4×1024 region levels, E = 1024,
8 heads, D_text 4096, s = 2 (144 tokens). For each (batch, dtype) both implementations are timed interleaved
(alternating which goes first) under `torch.inference_mode()` after a warm-up, and the median per call is
reported with images/s, achieved GFLOP/s and that as a fraction of a plain square matmul's GFLOP/s measured in
the same run and dtype. A call whose first run is slow gets fewer repeats (never fewer than 3) so a CPU run of the
full matrix stays within a few minutes.

FLOPs are counted analytically (multiply-add = 2 FLOPs; LayerNorm, GELU, softmax and the interpolation are
element-wise and left out), per image with P = G² patches, T = (G/s)² tokens, s² = P/T keys per token:
    region key and value MLPs  2 · 2·P·(L·Dv·E + E·E)
    point-query projection     2·T·Dv·E
    attention in-projections   2·T·E² (q) + 2 · 2·P·E² (k, v)
    scores and weighted sum    2 · 2·T·s²·E = 4·P·E
    attention out-projection   2·T·E²
    output MLP                 2·T·(E·D + D²)
which is 21.4 GFLOP per image for the default shapes.

Usage:
    python benchmarks/bench_projector.py                  # CPU if no GPU, else CUDA; writes benchmarks/results/
    python benchmarks/bench_projector.py --device cpu --repeats 10 --threads 2
    python benchmarks/bench_projector.py --smoke --out smoke.json   # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tokenpacker_hf import TokenPackerConfig  # noqa: E402
from tokenpacker_hf.convert_tokenpacker_original import convert_original_projector_state_dict  # noqa: E402
from tokenpacker_hf.projector_tokenpacker import TokenPackerProjector  # noqa: E402

from reference.original_tokenpacker import OriginalTokenPacker, random_init_  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shapes:
    """Projector shapes: G×G patch grid, vision width Dv, L region levels, width E, heads, LLM width D, s."""

    grid: int = 24
    vision_width: int = 1024
    levels: int = 4
    width: int = 1024
    heads: int = 8
    text_width: int = 4096
    scale_factor: int = 2
    matmul_size: int = 2048  # side of the square reference matmul

    def flops_per_image(self) -> int:
        """Analytic FLOPs of one image through the projector (formula in the module docstring)."""
        patches, tokens = self.grid**2, (self.grid // self.scale_factor) ** 2
        e, d = self.width, self.text_width
        region_mlps = 2 * 2 * patches * (self.levels * self.vision_width * e + e * e)
        query_proj = 2 * tokens * self.vision_width * e
        in_proj = 2 * tokens * e * e + 2 * 2 * patches * e * e
        attention = 4 * patches * e
        out_proj = 2 * tokens * e * e
        output_mlp = 2 * tokens * (e * d + d * d)
        return region_mlps + query_proj + in_proj + attention + out_proj + output_mlp


FULL = Shapes()
SMOKE = Shapes(grid=4, vision_width=32, levels=3, width=32, heads=2, text_width=48, matmul_size=128)


def build_pair(shapes: Shapes, seed: int = 0) -> tuple[TokenPackerProjector, OriginalTokenPacker]:
    """Our projector and the original-formulation oracle holding the same random (unit-gain) weights."""
    oracle = random_init_(
        OriginalTokenPacker(
            raw_grid=shapes.grid,
            embed_dim=shapes.width,
            num_heads=shapes.heads,
            hidden_size=shapes.text_width,
            scale_factor=shapes.scale_factor,
            kv_dim=shapes.vision_width,
            num_levels=shapes.levels,
        ),
        seed,
    ).eval()
    config = TokenPackerConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=shapes.vision_width,
            num_attention_heads=1,
            num_hidden_layers=shapes.levels,
            image_size=shapes.grid * 14,
            patch_size=14,
        ),
        text_config=dict(model_type="llama", hidden_size=shapes.text_width, num_attention_heads=1),
        region_feature_layers=list(range(1, shapes.levels + 1)),
        scale_factor=shapes.scale_factor,
        projector_hidden_size=shapes.width,
        projector_num_heads=shapes.heads,
    )
    ours = TokenPackerProjector(config).eval()
    ours.load_state_dict(convert_original_projector_state_dict(oracle.state_dict()), strict=True)
    return ours, oracle


def make_inputs(shapes: Shapes, batch: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `(query [B, G², Dv], region [B, G², L·Dv])`."""
    generator = torch.Generator().manual_seed(batch)
    patches = shapes.grid**2
    query = torch.randn(batch, patches, shapes.vision_width, generator=generator)
    region = torch.randn(batch, patches, shapes.levels * shapes.vision_width, generator=generator)
    return query.to(device, dtype), region.to(device, dtype)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call, with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(
    calls: dict[str, Callable[[], object]], device: str, repeats: int, budget_s: float
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating order so drift hits both alike.

    One warm-up call each; the repeats are cut so the timed part takes about `budget_s`, but never below 3.
    """
    first = {name: time_call(fn, device) for name, fn in calls.items()}  # warm-up (allocator, kernels, caches)
    repeats = max(3, min(repeats, int(budget_s / max(sum(first.values()), 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for index in range(repeats):
        for name in order if index % 2 == 0 else reversed(order):
            times[name].append(time_call(calls[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_gflops(size: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """Achieved GFLOP/s of a plain `[n, n] × [n, n]` GEMM, the ceiling the projector's GEMMs are held to.

    It goes through `F.linear`, the op the projector's Linears use: on CPUs without bf16 instructions
    `a @ b` takes a bf16 path some 10× slower than the one `F.linear` gets, which would be no ceiling at all.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = time_interleaved({"matmul": lambda: F.linear(a, b)}, device, repeats, budget_s=5.0)["matmul"]
    return 2 * size**3 / seconds / 1e9


def bench_config(
    shapes: Shapes,
    ours: TokenPackerProjector,
    oracle: OriginalTokenPacker,
    batch: int,
    dtype_name: str,
    device: str,
    repeats: int,
    budget_s: float,
    matmul: float,
) -> dict:
    """Times both implementations for one (batch, dtype) and compares their outputs."""
    dtype = DTYPES[dtype_name]
    ours.to(device, dtype)
    oracle.to(device, dtype)
    query, region = make_inputs(shapes, batch, dtype, device)
    with torch.inference_mode():
        medians = time_interleaved(
            {"ours": lambda: ours(query, region), "original": lambda: oracle((query, region))},
            device,
            repeats,
            budget_s,
        )
        difference = (ours(query, region).float() - oracle((query, region)).float()).abs().max().item()
    flops = shapes.flops_per_image() * batch
    row = {
        "batch": batch,
        "dtype": dtype_name,
        "max_abs_diff": difference,
        "speedup_vs_original": medians["original"] / medians["ours"],
    }
    for name, seconds in medians.items():
        row[f"{name}_ms"] = seconds * 1e3
        row[f"{name}_images_per_s"] = batch / seconds
        row[f"{name}_gflops"] = flops / seconds / 1e9
        row[f"{name}_fraction_of_matmul"] = flops / seconds / 1e9 / matmul
    return row


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown_table(rows: list[dict]) -> str:
    """The results as a GitHub markdown table."""
    lines = [
        "| batch | dtype | ours ms | original ms | speedup | ours img/s | original img/s | ours GFLOP/s "
        "(frac. matmul) | original GFLOP/s (frac. matmul) | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['dtype']} | {r['ours_ms']:.2f} | {r['original_ms']:.2f} | "
            f"{r['speedup_vs_original']:.2f}× | {r['ours_images_per_s']:.2f} | {r['original_images_per_s']:.2f} | "
            f"{r['ours_gflops']:.1f} ({r['ours_fraction_of_matmul']:.2f}) | "
            f"{r['original_gflops']:.1f} ({r['original_fraction_of_matmul']:.2f}) | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats (for tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per implementation (median)")
    parser.add_argument(
        "--budget-s", type=float, default=30.0, help="approximate timed seconds per config; caps the repeats (min 3)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument(
        "--matmul-size",
        type=int,
        help="side of the reference square matmul (default 2048, smoke 128); a big GPU needs "
        "~8192 to reach its peak rate",
    )
    parser.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/projector_<device>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = SMOKE if args.smoke else FULL
    if args.matmul_size:
        shapes = replace(shapes, matmul_size=args.matmul_size)
    repeats = 3 if args.smoke else args.repeats
    out = args.out or REPO / "benchmarks" / "results" / f"projector_{args.device.split(':')[0]}.json"
    ours, oracle = build_pair(shapes)
    rows = []
    matmul = {}
    for dtype_name in args.dtypes:
        matmul[dtype_name] = matmul_gflops(shapes.matmul_size, DTYPES[dtype_name], args.device, repeats)
        for batch in args.batches:
            rows.append(
                bench_config(
                    shapes, ours, oracle, batch, dtype_name, args.device, repeats, args.budget_s, matmul[dtype_name]
                )
            )
            print(
                f"batch {batch} {dtype_name}: ours {rows[-1]['ours_ms']:.2f} ms, "
                f"original {rows[-1]['original_ms']:.2f} ms",
                file=sys.stderr,
                flush=True,
            )
    fp32_diffs = [r["max_abs_diff"] for r in rows if r["dtype"] == "fp32"]
    result = {
        "benchmark": "projector",
        "smoke": args.smoke,
        "machine": machine_info(args.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "dtypes": args.dtypes,
        "shapes": asdict(shapes),
        "attn_implementation": ours.region_attn.config._attn_implementation or "sdpa",
        "flops_per_image": shapes.flops_per_image(),
        "matmul_gflops": matmul,
        "results": rows,
        "max_abs_diff": max(fp32_diffs) if fp32_diffs else None,
        "targets": {
            "cpu": "ours no slower than original",
            "cuda": "ours >= 2x original at batch 1",
            "max_abs_diff_fp32": 1e-5,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(rows))
    print(
        f"\nplain {shapes.matmul_size}² matmul GFLOP/s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in matmul.items())
        + f"; threads {result['threads']}; wrote {out}"
    )
    return result


if __name__ == "__main__":
    main()
