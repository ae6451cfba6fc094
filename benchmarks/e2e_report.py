"""Results of the end-to-end benchmark (`bench_e2e.py`): ratios to the LLaVA-1.5 baseline, the goals they are
judged by, the markdown tables of docs/performance.md and the plot."""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any

import torch
import transformers
from e2e_flops import kv_bytes_per_image, ttft_flops
from e2e_models import BASELINE, Shapes

# ----------------------------------------------------------------------------------------------- ratios and goals


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
        row["ratio"] = {
            stage: measured[stage] / base["median_s"][stage] for stage in ("vision", "projector", "prefill", "ttft")
        }
        row["ratio"]["decode_tokens_per_s"] = (
            row["decode_tokens_per_s"] / base["decode_tokens_per_s"] if name != BASELINE else 1.0
        )
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
        for row in batch_rows.values():
            row["images_per_s"] = int(batch) / row["median_s"]["total"]
            row["images_per_s_ratio"] = row["images_per_s"] / (int(batch) / batch_rows[BASELINE]["median_s"]["total"])
    for hd_rows in results.get("hd", {}).values():
        next_row = hd_rows["llava-next"]
        for name, row in hd_rows.items():
            flops = ttft_flops(name, shapes, text, row["image_tokens"], row["tiles"], row["seq_len"])
            flops_next = ttft_flops(
                "llava-next", shapes, text, next_row["image_tokens"], next_row["tiles"], next_row["seq_len"]
            )
            key = "ttft" if "ttft" in row["median_s"] else "ttft_extrapolated"
            row["ttft"] = row["median_s"][key]
            row["ttft_ratio"] = row["ttft"] / next_row["median_s"][key]
            row["flop_ratio_ttft"] = flops["ttft"] / flops_next["ttft"]


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    """The goals the measurements are held to (docs/performance.md), each with the numbers it was judged on: TokenPacker
    s=2's TTFT ratio within 10% of the FLOP prediction, KV bytes per image in exact proportion to the image tokens,
    no stage and no projector step (at Vicuna-7B's width) slower than LLaVA-1.5's, a faster vision tower."""
    rows = results["base"]["1"]
    s2 = rows["tokenpacker-s2"]
    predicted, measured = s2["flop_ratio"]["ttft"], s2["ratio"]["ttft"]
    grid_tokens = rows[BASELINE]["image_tokens"]
    kv_exact = {
        name: row["kv_cache_bytes_per_image"] * grid_tokens
        == rows[BASELINE]["kv_cache_bytes_per_image"] * row["image_tokens"]
        for name, row in rows.items()
    }
    slower = {
        name: [stage for stage in ("vision", "projector", "prefill") if row["ratio"][stage] > 1.0]
        for name, row in rows.items()
        if name != BASELINE
    }
    step = results["projector_step"]["rows"]
    step_ratios = {name: row["ratio"] for name, row in step.items() if name != BASELINE}
    return {
        "ttft_144_within_10pct_of_flop_ratio": {
            "measured": measured,
            "predicted": predicted,
            "met": abs(measured / predicted - 1) <= 0.10,
        },
        "kv_per_image_exact_fraction": {"per_model": kv_exact, "met": all(kv_exact.values())},
        "no_stage_slower_than_baseline": {"slower_stages": slower, "met": not any(slower.values())},
        "projector_step_not_slower_at_7b_width": {
            "ratio": step_ratios,
            "met": all(r <= 1.0 for r in step_ratios.values()),
        },
        "vision_faster": {
            "ratio": {name: row["ratio"]["vision"] for name, row in rows.items() if name != BASELINE},
            "met": all(row["ratio"]["vision"] < 1.0 for name, row in rows.items() if name != BASELINE),
        },
    }


# --------------------------------------------------------------------------------------------------------- report


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers were measured on."""
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    return {
        "device": args.device,
        "device_name": device_name,
        "cpus": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "threads": args.threads,
        "dtype": args.dtype,
        "attn_implementation": "sdpa",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


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
    lines = [
        f"Device: {env['device_name']} ({env['device']}), {env['threads']} threads, {env['dtype']}, "
        f"sdpa; torch {env['torch']}, transformers {env['transformers']}. "
        f"LLM: {describe_llm(results['shapes']['text'])}. "
        f"Batch 1, medians of {rows[BASELINE]['repeats']} interleaved runs, times in ms; "
        f"ratios are ours / LLaVA-1.5 (576), FLOP-predicted in brackets.",
        "",
        "| model | image tokens | vision | projector | prefill | TTFT | TTFT ratio [FLOPs] "
        "| decode tok/s (ratio) | KV cache / image (ratio) | peak working memory (ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
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
            f"({row['kv_ratio_per_image']:.4f}) | {mem_text} |"
        )
    lines += [
        "",
        "Batched throughput, images/s for a whole request (vision, projector, prefill, "
        f"{results['decode_tokens']} new tokens), ratio to LLaVA-1.5 in brackets:",
        "",
        "| model | " + " | ".join(f"batch {b}" for b in results["base"]) + " |",
        "|---|" + "---|" * len(results["base"]),
    ]
    for name in rows:
        cells = [
            f"{results['base'][b][name]['images_per_s']:.3f} ({results['base'][b][name]['images_per_s_ratio']:.2f})"
            for b in results["base"]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "FLOP-predicted TTFT ratio with a Vicuna-7B-shaped LLM (analytic, not measured): "
        + ", ".join(f"{name} {row['flop_ratio_7b_llm']['ttft']:.3f}" for name, row in rows.items() if name != BASELINE)
        + ".",
    ]
    if results.get("hd"):
        lines += [
            "",
            "High resolution, one square image, batch 1 (TokenPacker s=2 slice mode vs LLaVA-NeXT anyres):",
            "",
            "| setting | model | tiles | image tokens | prefill | TTFT | TTFT ratio [FLOPs] |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, hd_rows in results["hd"].items():
            for name, row in hd_rows.items():
                side = row["side_px"]
                lines.append(
                    f"| {label} ({side}×{side} px) | {name} | {row['tiles']} | {row['image_tokens']} "
                    f"| {fmt_ms(row['median_s']['prefill'])} | {fmt_ms(row['ttft'])} "
                    f"| {row['ttft_ratio']:.3f} [{row['flop_ratio_ttft']:.3f}] |"
                )
    step = results["projector_step"]
    lines += [
        "",
        f"Projector step alone at Vicuna-7B's width (LLM hidden {step['text_hidden_size']}), batch 1, "
        "ms (ratio to LLaVA-1.5's MLP [FLOPs]):",
        "",
        "| model | projector ms | ratio [FLOPs] |",
        "|---|---|---|",
    ]
    for name, row in step["rows"].items():
        lines.append(f"| {name} | {row['median_s'] * 1000:,.1f} | {row['ratio']:.2f} [{row['flop_ratio']:.2f}] |")
    lines += ["", "Targets:"] + [
        f"- {key}: {'met' if value['met'] else 'NOT met'} "
        f"({json.dumps({k: v for k, v in value.items() if k != 'met'}, default=str)})"
        for key, value in results["targets"].items()
    ]
    return "\n".join(lines)


def describe_llm(text: dict) -> str:
    return (
        f"Llama, hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
        f"{text['num_attention_heads']} heads ({text['num_key_value_heads']} KV), "
        f"MLP {text['intermediate_size']}, vocab {text['vocab_size']}"
    )


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
    left.plot(
        tokens,
        [row["flop_ratio"]["ttft"] * base_ttft * 1000 for row in rows.values()],
        "x--",
        label="FLOP-predicted (scaled to 576)",
    )
    left.set(xlabel="image tokens per image", ylabel="time to first token (ms)", title="TTFT, batch 1")
    right.plot(tokens, [row["kv_cache_bytes_per_image"] / 2**20 for row in rows.values()], "o-")
    right.set(xlabel="image tokens per image", ylabel="MiB", title="KV cache per image")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        for name, row in rows.items():
            axis.annotate(
                name.replace("tokenpacker-", "TP ").replace("llava-1.5-mlp", "LLaVA-1.5"),
                (row["image_tokens"], axis.lines[0].get_ydata()[list(rows).index(name)]),
                fontsize=8,
            )
    left.legend()
    env = results["env"]
    figure.suptitle(
        f"{env['device_name']}, {env['threads']} threads, {env['dtype']}; "
        f"LLM hidden {results['shapes']['text']['hidden_size']} × "
        f"{results['shapes']['text']['num_hidden_layers']} layers",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
