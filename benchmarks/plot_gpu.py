"""Markdown tables and one PNG from a `benchmarks/gpu_suite.sh` results folder, for docs/performance.md.

Reads OUT/{suite,env,projector,sdpa,e2e,train,compile}.json; a stage without a result is reported as such, with its
exit status from suite.json. The end-to-end tables are bench_e2e's own (`e2e_report.markdown`).

    python benchmarks/plot_gpu.py OUT                                   # markdown to stdout
    python benchmarks/plot_gpu.py OUT --markdown OUT/report.md --plot docs/performance_gpu.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_report  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes

STAGES = ("env", "projector", "sdpa", "e2e", "train", "compile")
BACKENDS = ("flash", "efficient", "cudnn", "math")


def load(folder: Path) -> dict[str, Any]:
    """Each stage's JSON by stage name (absent if the stage wrote none), and `suite` (exit statuses)."""
    results = {"suite": json.loads((folder / "suite.json").read_text())}
    for stage in STAGES:
        if (folder / f"{stage}.json").exists():
            results[stage] = json.loads((folder / f"{stage}.json").read_text())
    return results


def missing(results: dict[str, Any], stage: str) -> str:
    """The line standing in for a stage without a result."""
    status = results["suite"]["stages"].get(stage)
    if status is None or status["rc"] is None:  # never started: no log either
        return f"No result ({'not run' if status is None else 'skipped: budget spent'})."
    why = f"timed out after {status['limit_s']} s" if status["timed_out"] else f"exit status {status['rc']}"
    return f"No result ({why}; see logs/{stage}.log)."


def stages_line(suite: dict[str, Any]) -> str:
    """Seconds per stage, with the exit status of those that failed."""
    return (
        "Stages: "
        + ", ".join(
            f"{name} {s['seconds']} s"
            + ("" if s["rc"] == 0 else " (skipped)" if s["rc"] is None else f" (exit {s['rc']})")
            for name, s in suite["stages"].items()
        )
        + f"; budget {suite['budget_s']} s"
        + (", smoke shapes on a CPU (not figures)." if suite["smoke"] else ".")
    )


def environment(env: dict[str, Any]) -> list[str]:
    """Device, versions and the compiler torch.compile used."""
    return [
        f"{env['device_name']}; python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN "
        f"{env['cudnn']}), transformers {env['transformers']}; C compiler {env['c_compiler']}."
    ]


def projector_table(result: dict[str, Any]) -> list[str]:
    """Ours vs the original formulation, TFLOP/s and the fraction of the same run's matmul rate."""
    matmul = result["matmul_gflops"]
    lines = [
        f"Plain {result['shapes']['matmul_size']}² matmul: "
        + ", ".join(f"{dtype} {gflops / 1e3:.1f} TFLOP/s" for dtype, gflops in matmul.items())
        + f". {result['flops_per_image'] / 1e9:.1f} GFLOP per image.",
        "",
        "| batch | dtype | ours ms | original ms | speedup | ours TFLOP/s (frac. matmul) "
        "| original TFLOP/s (frac. matmul) | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['batch']} | {r['dtype']} | {r['ours_ms']:.3f} | {r['original_ms']:.3f} "
            f"| {r['speedup_vs_original']:.2f}× "
            f"| {r['ours_gflops'] / 1e3:.2f} ({r['ours_fraction_of_matmul']:.2f}) "
            f"| {r['original_gflops'] / 1e3:.2f} ({r['original_fraction_of_matmul']:.2f}) "
            f"| {r['max_abs_diff']:.1e} |"
        )
    batch_1 = [r for r in result["results"] if r["batch"] == 1 and r["dtype"] == "bf16"]
    if batch_1:
        speedup = batch_1[0]["speedup_vs_original"]
        lines += ["", f"Target ≥ 2× at batch 1 (bf16): {speedup:.2f}×, {'met' if speedup >= 2 else 'NOT met'}."]
    return lines


def sdpa_table(result: dict[str, Any]) -> list[str]:
    """Backend taken by default, and each backend alone: ms or why it cannot run."""
    lines = [
        f"Region attention per image: {result['attention']['queries_per_image']} queries × "
        f"{result['attention']['keys_per_query']} keys, {result['attention']['heads']} heads of "
        f"{result['attention']['head_dim']}; {result['dtype']}.",
        "",
        "| batch | default takes | default ms | " + " | ".join(f"{b} alone" for b in BACKENDS) + " |",
        "|---|---|---|" + "---|" * len(BACKENDS),
    ]
    for row in result["rows"]:
        backends = row["backends"]
        cells = [f"{backends[b]['ms']:.3f} ms" if backends[b]["ok"] else "cannot run" for b in BACKENDS]
        lines.append(
            f"| {row['batch']} | {row['profile']['backend_taken']} | {backends['default']['ms']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    first = result["rows"][0]
    reasons = {b: first["backends"][b]["error"] for b in BACKENDS if not first["backends"][b]["ok"]}
    lines += [
        "",
        "Why a backend cannot run (batch 1): "
        + ("; ".join(f"{b}: {e}" for b, e in reasons.items()) if reasons else "all run."),
    ]
    kernels = first["profile"]["kernels"][:8]
    if kernels:
        lines += [
            "",
            "Longest device kernels of one default call (batch 1):",
            "",
            "| kernel | calls | µs |",
            "|---|---|---|",
        ] + [f"| `{k['name'][:110]}` | {k['calls']} | {k['device_us']:.1f} |" for k in kernels]
    return lines


def compile_table(result: dict[str, Any]) -> list[str]:
    """Per batch and mode: compile seconds, eager and compiled ms, max |difference| (of max |eager|)."""
    lines = [
        "| batch | mode | compile s | eager ms | compiled ms | speedup | max abs diff (of max abs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['mode']} | failed: {r['error'][:150]} | | | | |")
        else:
            lines.append(
                f"| {r['batch']} | {r['mode']} | {r['compile_s']:.1f} | {r['eager_ms']:.3f} "
                f"| {r['compiled_ms']:.3f} | {r['speedup']:.2f}× | {r['max_abs_diff']:.1e} "
                f"({r['max_abs_eager']:.1f}){'' if r['close'] else ' NOT close'} |"
            )
    return lines


def train_table(result: dict[str, Any]) -> list[str]:
    """Per model at equal batch: sequence length, steps/s, samples/s, peak memory."""
    lines = [
        f"LLM: {result['llm']}; {result['optimizer']}, {result['dtype']}.",
        "",
        "| model | batch | tokens / sample | steps/s | samples/s | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:150]} | | | | |")
            continue
        memory = "–" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f} GiB"
        lines.append(
            f"| {name} | {r['batch']} | {r['seq_len']} | {r['steps_per_s']:.2f} | {r['samples_per_s']:.1f} | {memory} |"
        )
    if "tokenpacker_s2_steps_per_s_ratio" in result:
        ratio = result["tokenpacker_s2_steps_per_s_ratio"]
        lines += ["", f"TokenPacker s=2 / LLaVA-1.5 steps per second: {ratio:.2f}×."]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """All sections, in the suite's order; a missing result says why."""
    sections = [
        ("Environment", "env", environment),
        ("Projector against the original formulation", "projector", projector_table),
        ("Which SDPA backend the region attention takes", "sdpa", sdpa_table),
        ("End to end", "e2e", e2e_report.markdown),
        ("Stage-2 training steps", "train", train_table),
        ("torch.compile of the projector", "compile", compile_table),
    ]
    lines = [stages_line(results["suite"]), ""]
    for title, stage, render in sections:
        lines += [f"### {title}", ""]
        body = render(results[stage]) if stage in results else [missing(results, stage)]
        lines += (body.splitlines() if isinstance(body, str) else body) + [""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Six panels: projector ms, SDPA backends ms, compile ms, e2e TTFT ratios, decode tok/s, train steps/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        ("projector", plot_projector),
        ("sdpa", plot_sdpa),
        ("compile", plot_compile),
        ("e2e", plot_ttft),
        ("e2e", plot_decode),
        ("train", plot_train),
    ]
    for axis, (stage, draw) in zip(axes.flat, panels, strict=True):
        axis.grid(alpha=0.3)
        if stage in results:
            draw(axis, results[stage])
        else:
            axis.set_title(stage)
            axis.text(0.5, 0.5, missing(results, stage), ha="center", va="center", wrap=True, fontsize=8)
    env = results.get("env", {})
    figure.suptitle(
        f"{env.get('device_name', '?')}; torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}" + (" (smoke shapes)" if results["suite"]["smoke"] else ""),
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_projector(axis: Axes, result: dict[str, Any]) -> None:
    """ms per call against batch, ours and the original, per dtype."""
    for dtype in dict.fromkeys(r["dtype"] for r in result["results"]):
        rows = [r for r in result["results"] if r["dtype"] == dtype]
        for name, style in (("ours", "o-"), ("original", "x--")):
            axis.plot([r["batch"] for r in rows], [r[f"{name}_ms"] for r in rows], style, label=f"{name} {dtype}")
    axis.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per call", title="projector vs original")
    axis.legend(fontsize=8)


def plot_sdpa(axis: Axes, result: dict[str, Any]) -> None:
    """Projector ms with each SDPA backend alone, per batch (0 where the backend cannot run)."""
    names = ("default", *BACKENDS)
    width = 0.8 / len(result["rows"])
    for index, row in enumerate(result["rows"]):
        times = [row["backends"][n]["ms"] if row["backends"][n]["ok"] else 0 for n in names]
        axis.bar([i + index * width for i in range(len(names))], times, width, label=f"batch {row['batch']}")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    axis.set(ylabel="projector ms (0: cannot run)", title="SDPA backend alone")
    axis.legend(fontsize=8)


def plot_compile(axis: Axes, result: dict[str, Any]) -> None:
    """Eager against compiled ms per (batch, mode) that compiled."""
    rows = [r for r in result["rows"] if "error" not in r]
    labels = [f"b{r['batch']} {r['mode']}" for r in rows]
    positions = range(len(rows))
    axis.bar([p - 0.2 for p in positions], [r["eager_ms"] for r in rows], 0.4, label="eager")
    axis.bar([p + 0.2 for p in positions], [r["compiled_ms"] for r in rows], 0.4, label="compiled")
    axis.set_xticks(list(positions), labels, fontsize=8)
    axis.set(ylabel="ms per call", title="torch.compile of the projector")
    axis.legend(fontsize=8)


def plot_ttft(axis: Axes, result: dict[str, Any]) -> None:
    """TTFT ratio to LLaVA-1.5 at batch 1, measured next to FLOP-predicted."""
    rows = result["base"]["1"]
    names = list(rows)
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], [rows[n]["ratio"]["ttft"] for n in names], 0.4, label="measured")
    axis.bar([p + 0.2 for p in positions], [rows[n]["flop_ratio"]["ttft"] for n in names], 0.4, label="FLOP-predicted")
    axis.set_xticks(list(positions), [n.replace("tokenpacker-", "TP ") for n in names], fontsize=8)
    axis.set(ylabel="TTFT / LLaVA-1.5's", title="time to first token, batch 1")
    axis.legend(fontsize=8)


def plot_decode(axis: Axes, result: dict[str, Any]) -> None:
    """Decode tokens/s at batch 1 per model."""
    rows = result["base"]["1"]
    names = list(rows)
    axis.bar(range(len(names)), [rows[n]["decode_tokens_per_s"] for n in names])
    axis.set_xticks(range(len(names)), [n.replace("tokenpacker-", "TP ") for n in names], fontsize=8)
    axis.set(ylabel="tokens/s", title="decode, batch 1")


def plot_train(axis: Axes, result: dict[str, Any]) -> None:
    """Stage-2 optimizer steps/s per model that did not fail."""
    rows = {name: r for name, r in result["rows"].items() if "error" not in r}
    axis.bar(range(len(rows)), [r["steps_per_s"] for r in rows.values()])
    axis.set_xticks(range(len(rows)), [n.replace("tokenpacker-", "TP ") for n in rows], fontsize=8)
    batch = next(iter(rows.values()))["batch"] if rows else "?"
    axis.set(ylabel="optimizer steps/s", title=f"stage-2 training, batch {batch}")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="gpu_suite.sh's OUT")
    parser.add_argument("--markdown", type=Path, help="write the tables here (else print them)")
    parser.add_argument("--plot", type=Path, help="render the PNG here (needs matplotlib)")
    args = parser.parse_args(argv)
    results = load(args.folder)
    text = markdown(results)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    else:
        print(text)
    if args.plot:
        plot(results, args.plot)
    return text


if __name__ == "__main__":
    main()
