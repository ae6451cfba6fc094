"""The paper's Table 3 in miniature: projectors compared at an equal image-token budget on the digits task.

TokenPacker, average pooling and pixel shuffle each pack the tower's 8×8 patch grid into 4 tokens (s=4, one token
per digit); the MLP projector keeps all 64 tokens and is the ceiling. Every run uses the same data, the same
tiny model and the same number of steps as `train.py` (whose functions do the work), with the vision tower frozen
at its random initialisation, as LLaVA and TokenPacker freeze CLIP: the projector then has to get the digits out
of fixed features, which is exactly what the comparison is about. Several seeds per projector; the held-out grids
use handwriting never seen in training.

    python examples/digits/compare_projectors.py            # 4 projectors × 3 seeds, ~50 min on one CPU thread
    python examples/digits/compare_projectors.py --smoke    # a few steps per run, into a temporary folder

The paper's setting, a pretrained frozen tower and a pretrained LLM (`pretrain_parts.py` makes them; each model is
composed with `from_vision_text_pretrained`, only the projector new), gets its own table, JSON and plot:

    python examples/digits/compare_projectors.py --vision_tower PARTS/clip-digits --language_model PARTS/llama-digits

Writes the raw runs as JSON, the results table into the markdown document (between the `results` markers, or
as a new document), and a plot of digit accuracy against image tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
import train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROJECTORS = ("tokenpacker", "avg_pool", "pixel_shuffle", "mlp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projectors", nargs="+", choices=PROJECTORS, default=list(PROJECTORS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="training steps of every run (the shared budget)")
    parser.add_argument("--batch-size", type=int, default=32, help="training grids per step")
    parser.add_argument("--num-train", type=int, default=4000, help="training grids")
    parser.add_argument("--eval-samples", type=int, default=500, help="held-out grids read by each model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings are per this count)")
    parser.add_argument("--data-dir", type=Path, help="dataset folder; generated there if it has none")
    parser.add_argument("--results", type=Path, help="raw JSON (default benchmarks/results/digits_comparison.json)")
    parser.add_argument("--doc", type=Path, help="markdown document for the table (default docs/digits.md)")
    parser.add_argument("--plot", type=Path, help="PNG plot (default docs/digits_accuracy.png)")
    parser.add_argument(
        "--vision_tower", type=Path, help="compose from pretrain_parts.py's tower (with --language_model)"
    )
    parser.add_argument(
        "--language_model", type=Path, help="compose from pretrain_parts.py's LLM (with --vision_tower)"
    )
    parser.add_argument("--smoke", action="store_true", help="2 tiny steps per run, outputs in a temporary folder")
    args = parser.parse_args(argv)
    if (args.vision_tower is None) != (args.language_model is None):
        parser.error("--vision_tower and --language_model go together")
    # Runs from pretrained parts get their own table, results and plot, next to the random-tower ones.
    args.table = "results-pretrained" if args.vision_tower else "results"
    suffix = "_pretrained" if args.vision_tower else ""
    if args.smoke:
        args.steps, args.batch_size, args.num_train, args.eval_samples = 2, 4, 8, 4
        # A smoke run must never overwrite the measured results.
        scratch = Path(tempfile.mkdtemp(prefix="digits-smoke-"))
        args.results = args.results or scratch / f"digits_comparison{suffix}.json"
        args.doc = args.doc or scratch / "digits.md"
        args.plot = args.plot or scratch / f"digits_accuracy{suffix}.png"
    args.results = args.results or REPO / "benchmarks" / "results" / f"digits_comparison{suffix}.json"
    args.doc = args.doc or REPO / "docs" / "digits.md"
    args.plot = args.plot or REPO / "docs" / f"digits_accuracy{suffix}.png"
    return args


def run_one(args: argparse.Namespace, projector: str, seed: int, data_dir: Path, encoded: dict) -> dict[str, Any]:
    """One training run of `train.py`'s recipe with a frozen tower; returns its measurements."""
    argv = [
        "--output_dir",
        tempfile.mkdtemp(prefix="digits-run-"),
        "--projector_type",
        projector,
        "--freeze_vision_tower",
        "--data_dir",
        str(data_dir),
        "--num_train",
        str(args.num_train),
        "--num_test",
        str(args.eval_samples),
        "--eval_samples",
        str(args.eval_samples),
        "--threads",
        str(args.threads),
        "--max_steps",
        str(args.steps),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--seed",
        str(seed),
        "--logging_steps",
        str(max(args.steps // 10, 1)),
    ]
    if args.vision_tower:
        argv += ["--vision_tower", str(args.vision_tower), "--language_model", str(args.language_model)]
    digits_args, training_args = train.parse_args(argv)
    return train.run(digits_args, training_args, save=False, encoded=encoded)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per projector: mean and standard deviation over seeds of each measurement."""
    rows = []
    for projector in dict.fromkeys(run["projector_type"] for run in runs):
        group = [run for run in runs if run["projector_type"] == projector]
        row = {"projector": projector, "image_tokens": group[0]["image_tokens"], "seeds": len(group)}
        for key in ("digit_accuracy", "exact_match", "seconds_per_step"):
            values = [run[key] for run in group]
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The results as a markdown table (mean ± std over seeds) with the shared settings below it."""
    lines = [
        "| projector | image tokens | digit accuracy | exact match (4/4) | s / step | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['projector']} | {row['image_tokens']} "
            f"| {row['digit_accuracy']:.3f} ± {row['digit_accuracy_std']:.3f} "
            f"| {row['exact_match']:.3f} ± {row['exact_match_std']:.3f} "
            f"| {row['seconds_per_step']:.3f} ± {row['seconds_per_step_std']:.3f} | {row['seeds']} |"
        )
    lines += [
        "",
        f"{settings['steps']} steps of batch {settings['batch_size']} each (lr {settings['learning_rate']}, cosine), "
        f"vision tower {settings['vision_tower']}, LLM {settings.get('language_model', 'random')}, "
        f"{settings['num_train']} training grids, "
        f"{settings['eval_samples']} held-out grids read with greedy decoding, {settings['threads']} CPU thread(s); "
        f"mean ± std over seeds {settings['seeds']}.",
    ]
    return "\n".join(lines)


def write_results(
    path: Path, settings: dict[str, Any], runs: list[dict[str, Any]], complete: bool, summary: list | None = None
) -> None:
    """The raw runs (and, once complete, the per-projector summary) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"complete": complete, "settings": settings, "summary": summary or [], "runs": runs}
    path.write_text(json.dumps(record, indent=2) + "\n")


def write_table(doc: Path, table: str, name: str = "results") -> None:
    """Replaces the text between the `<!-- {name}:start -->` and `<!-- {name}:end -->` markers of `doc`, or writes
    a new document holding only the table."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{table}\n{end}"
    if doc.is_file() and start in doc.read_text():
        text = doc.read_text()
        before, rest = text.split(start, 1)
        if end not in rest:
            raise ValueError(f"{doc}: found {start} but no {end} after it")
        doc.write_text(before + block + rest.split(end, 1)[1])
    else:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(f"# Projectors at equal token budget on the digits task\n\n{block}\n")


def plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, settings: dict[str, Any]) -> None:
    """Digit accuracy against image tokens: each seed as a faint dot, the mean ± std as a marker with error bar."""
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for row in rows:
        seeds = [run["digit_accuracy"] for run in runs if run["projector_type"] == row["projector"]]
        line = axes.errorbar(
            row["image_tokens"],
            row["digit_accuracy"],
            yerr=row["digit_accuracy_std"],
            fmt="o",
            capsize=4,
            label=f"{row['projector']} ({row['digit_accuracy']:.3f})",
        )
        axes.scatter([row["image_tokens"]] * len(seeds), seeds, color=line[0].get_color(), alpha=0.3, s=12)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted({row["image_tokens"] for row in rows}), labels=None)
    axes.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlabel("image tokens per image (log scale)")
    axes.set_ylabel("held-out digit accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.set_title(
        f"2×2 digits, tower {settings['vision_tower']}, {settings['steps']} steps, {len(settings['seeds'])} seeds",
        fontsize=9,
    )
    axes.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="digits-data-"))
    train.ensure_data(data_dir, args.num_train, args.eval_samples, seed=0)
    settings = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "vision_tower": "frozen, pretrained on digit classification" if args.vision_tower else "frozen, random",
        "language_model": "pretrained on the task's text" if args.language_model else "random",
        "num_train": args.num_train,
        "eval_samples": args.eval_samples,
        "threads": args.threads,
        "seeds": args.seeds,
    }
    encoded: dict = {}  # one encoded training split per token layout, shared by the runs
    runs = []
    for seed in args.seeds:  # seed-major, so that a cut-off comparison still compares every projector
        for projector in args.projectors:
            print(f"== {projector}, seed {seed}", flush=True)
            runs.append(run_one(args, projector, seed, data_dir, encoded))
            print(json.dumps(runs[-1]), flush=True)
            write_results(args.results, settings, runs, complete=False)  # a cut-off comparison keeps its runs
    settings["learning_rate"] = runs[0]["learning_rate"]
    rows = summarize(runs)
    write_results(args.results, settings, runs, complete=True, summary=rows)
    write_table(args.doc, markdown_table(rows, settings), args.table)
    plot(rows, runs, args.plot, settings)
    print(markdown_table(rows, settings))
    print(f"wrote {args.results}, {args.doc}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
