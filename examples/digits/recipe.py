"""The paper's recipe from step one, in miniature: two pretrained parts -> stage 1 -> stage 2 -> held-out accuracy.

1. `pretrain_parts.py` makes the parts: a CLIP tower pretrained on digit classification and a Llama pretrained on
   the task's text, saved as ordinary `CLIPVisionModel` and `LlamaForCausalLM` folders.
2. Stage 1, `examples/train.py --vision_tower ... --language_model ... --preset stage1`: composes a TokenPacker
   model from them (only the projector is new) and trains the projector alone, everything else frozen.
3. Stage 2, `examples/train.py --model_name_or_path STAGE1 --preset stage2`: the projector and the LLM.

After each stage the saved folder reads the held-out grids (handwriting never seen in training, greedy decoding).

    python examples/digits/recipe.py --work_dir out/recipe          # 35 to 50 minutes on one CPU thread
    python examples/digits/recipe.py --work_dir out/smoke --smoke   # a few steps each, to check the plumbing

Scaling out for real: `--fsdp2_steps N` also runs N steps of stage 2 twice from stage 1's folder, on one process
and sharded with FSDP2 on two CPU processes (`accelerate launch`, examples/configs/fsdp_cpu.yaml), and compares
the loss curves, the saved weights and the accuracy. A work dir keeps what it already holds (the parts, a saved
stage 1, `recipe.json`), so a run can be resumed and the check can follow a finished run.

Writes `WORK_DIR/recipe.json`; with `--doc`, also the results table into that markdown file (between its
`<!-- recipe:start -->` and `<!-- recipe:end -->` markers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import compare_projectors
import pretrain_parts
import torch
import train
from transformers import AutoProcessor

from tokenpacker_hf import TokenPackerForConditionalGeneration

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, required=True, help="data/, parts/, stage1/, stage2/ go here")
    parser.add_argument("--stage1_steps", type=int, default=600)
    parser.add_argument("--stage1_lr", type=float, default=1e-3, help="the paper's stage-1 learning rate")
    parser.add_argument("--stage2_steps", type=int, default=1000)
    parser.add_argument("--stage2_lr", type=float, default=3e-4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_samples", type=int, default=1000, help="held-out grids read after each stage")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every step")
    parser.add_argument("--doc", type=Path, help="markdown file whose recipe table to rewrite")
    parser.add_argument(
        "--fsdp2_steps",
        type=int,
        default=0,
        help="also run this many stage-2 steps on 1 process and sharded on 2 with FSDP2, and compare",
    )
    parser.add_argument("--smoke", action="store_true", help="2 steps per stage, tiny data: checks the plumbing")
    args = parser.parse_args(argv)
    args.pretrain = []
    if args.smoke:
        args.stage1_steps = args.stage2_steps = 2
        args.fsdp2_steps = min(args.fsdp2_steps, 2)
        args.batch_size, args.eval_samples = 4, 4
        args.pretrain = [
            "--tower_steps",
            "2",
            "--llm_steps",
            "2",
            "--batch_size",
            "4",
            "--num_train",
            "16",
            "--num_test",
            "4",
        ]
    return args


def train_stage(
    args: argparse.Namespace,
    out: Path,
    model_args: list[str],
    preset: str,
    steps: int,
    lr: float,
    processes: int = 1,
    extra: tuple[str, ...] = ("--logging_steps", "10", "--save_strategy", "no"),
) -> None:
    """One `examples/train.py` run in a subprocess, as a user would start it; several `processes` shard it with
    FSDP2 on the CPU (`accelerate launch` with examples/configs/fsdp_cpu.yaml) at the same global batch."""
    data = args.work_dir / "data"
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "examples/configs/fsdp_cpu.yaml"),
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(free_port()),
        ]
    command = [
        *launcher,
        str(REPO / "examples" / "train.py"),
        *model_args,
        "--preset",
        preset,
        "--data_path",
        str(data / "train.json"),
        "--image_folder",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        str(steps),
        "--learning_rate",
        str(lr),
        "--per_device_train_batch_size",
        str(args.batch_size // processes),
        "--activation_checkpointing",
        "false",  # a 2-layer model on a CPU has no memory to save, only time
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        "0",
        *extra,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print("+", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, env=environment)


def free_port() -> int:
    """A TCP port nobody listens on now, for the processes' rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fsdp2_check(args: argparse.Namespace) -> dict[str, Any]:
    """Stage 2 from the same stage-1 folder twice, on 1 process and sharded on 2 with FSDP2, at the same global
    batch: their loss curves, saved weights and held-out accuracy side by side."""
    stage1, steps = args.work_dir / "stage1", args.fsdp2_steps
    logged = ("--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(steps))
    runs = {}
    for name, processes in (("single", 1), ("fsdp2", 2)):
        out = args.work_dir / f"stage2-{name}"
        train_stage(
            args, out, ["--model_name_or_path", str(stage1)], "stage2", steps, args.stage2_lr, processes, logged
        )
        state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        weights = TokenPackerForConditionalGeneration.from_pretrained(out).state_dict()
        runs[name] = {"losses": losses, "weights": weights, **read_held_out(out, args)}
    single, sharded = runs["single"], runs["fsdp2"]
    return {
        "steps": steps,
        "loss_first_last": [single["losses"][0], single["losses"][-1]],
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(single["losses"], sharded["losses"], strict=True)),
        "max_abs_weight_difference": max(
            (single["weights"][name] - sharded["weights"][name]).abs().max().item() for name in single["weights"]
        ),
        "digit_accuracy": {name: run["digit_accuracy"] for name, run in runs.items()},
    }


def read_held_out(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """Digit accuracy and exact match of a saved folder on the held-out grids."""
    model = TokenPackerForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    return train.evaluate(model, processor, args.work_dir / "data" / "test.json", args.eval_samples)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per stage, with what trained and how."""
    lines = [
        "| stage | trains | steps | lr | digit accuracy | exact match (4/4) |",
        "|---|---|---|---|---|---|",
    ]
    for name, what in (("stage1", "projector"), ("stage2", "projector + LLM")):
        stage = results[name]
        lines.append(
            f"| {name[:-1]} {name[-1]} | {what} | {stage['steps']} | {stage['learning_rate']} "
            f"| {stage['digit_accuracy']:.3f} | {stage['exact_match']:.3f} |"
        )
    tower = results["pretraining"]["tower"]
    lines += [
        "",
        f"Parts: the tower reads {tower['held_out_digit_accuracy']:.1%} of held-out digits with its classification "
        f"head ({tower['steps']} steps); the LLM trained {results['pretraining']['llm']['steps']} steps on text. "
        f"Batch {results['batch_size']}, {results['eval_samples']} held-out grids, greedy decoding, "
        f"{results['threads']} CPU thread(s).",
    ]
    if "fsdp2" in results:
        check = results["fsdp2"]
        lines.append(
            f"\nStage 2 sharded with FSDP2 on 2 CPU processes against 1 process, {check['steps']} steps at the same "
            f"global batch: the loss went {check['loss_first_last'][0]:.3f} -> {check['loss_first_last'][1]:.3f}; "
            f"the curves differ by at most {check['max_abs_loss_difference']:.1e} and the saved weights by "
            f"{check['max_abs_weight_difference']:.1e}; digit accuracy {check['digit_accuracy']['single']:.3f} "
            f"(1 process) and {check['digit_accuracy']['fsdp2']:.3f} (FSDP2)."
        )
    return "\n".join(lines)


def run_recipe(args: argparse.Namespace, parts: Path) -> dict[str, Any]:
    """Stage 1 from the parts, then stage 2 from stage 1's folder; each folder then reads the held-out grids."""
    stage1, stage2 = args.work_dir / "stage1", args.work_dir / "stage2"
    from_parts = [
        "--vision_tower",
        str(parts / "clip-digits"),
        "--language_model",
        str(parts / "llama-digits"),
        "--chat_template",
        str(Path(__file__).parent / "chat_template.jinja"),
        "--scale_factor",
        "4",
        "--region_feature_layers",
        "1",
        "2",
        "3",
        "4",
    ]
    if not (stage1 / "model.safetensors").is_file():  # a finished stage 1 is kept: a resumed run starts at stage 2
        train_stage(args, stage1, from_parts, "stage1", args.stage1_steps, args.stage1_lr)
    results: dict[str, Any] = {"pretraining": json.loads((parts / "pretraining.json").read_text())}
    results["stage1"] = {"steps": args.stage1_steps, "learning_rate": args.stage1_lr, **read_held_out(stage1, args)}
    print(json.dumps(results["stage1"]), flush=True)
    train_stage(args, stage2, ["--model_name_or_path", str(stage1)], "stage2", args.stage2_steps, args.stage2_lr)
    results["stage2"] = {"steps": args.stage2_steps, "learning_rate": args.stage2_lr, **read_held_out(stage2, args)}
    results.update(batch_size=args.batch_size, eval_samples=args.eval_samples, threads=args.threads)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.work_dir / "parts"
    if not (parts / "pretraining.json").is_file():
        pretrain_parts.main(
            [
                "--data_dir",
                str(args.work_dir / "data"),
                "--output_dir",
                str(parts),
                "--threads",
                str(args.threads),
                *args.pretrain,
            ]
        )
    record = args.work_dir / "recipe.json"
    results = json.loads(record.read_text()) if record.is_file() else run_recipe(args, parts)
    if args.fsdp2_steps:
        results["fsdp2"] = fsdp2_check(args)
    record.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    if args.doc:
        compare_projectors.write_table(args.doc, table, "recipe")
    print(table)
    return results


if __name__ == "__main__":
    main()
