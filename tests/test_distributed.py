"""Scaling out for real on CPU: `examples/train.py` sharded with FSDP2 by `accelerate launch` (two gloo processes,
examples/configs/fsdp_cpu.yaml) trains as one process does on the same global batches, and saves a full
checkpoint that loads; text-only batches keep every rank running the same sharded modules."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin

import tokenpacker_hf
from tokenpacker_hf import TokenPackerForConditionalGeneration
from tokenpacker_hf.training import TokenPackerCollator, encode_conversation, llava_to_messages

from builders import REPO_ROOT, free_port, make_processor, qa, save_tiny_model, torchrun, write_llava_dataset
from tiny import tiny_config

STEPS = 6
# fp32 on both sides; only the reduction order differs (per-rank sums all-reduced, batches of 2 instead of 4 with
# their own padding). Measured (docs/distributed.md): losses agree to 5e-7 (1 ulp at 5.3), grad norms to 2e-7
# relative, weights to 1.3e-7, while the loss falls by 0.4 over the run, the weights move by 3e-3, and another
# data order (seed 1) changes the loss by 1e-3 to 2e-2 per step: the bounds leave 100x headroom for rounding and
# still catch a rank training on the wrong samples or gradients that are not averaged.
LOSS_ATOL = 1e-4
WEIGHT_ATOL = 1e-5
FSDP2_MISSING = "fsdp_version" not in FullyShardedDataParallelPlugin.__dataclass_fields__


def mixed_dataset(root: Path) -> Path:
    """Eight samples, three with an image: a global batch of 4 as 2 ranks x 2 leaves at least one rank with a
    text-only batch in every epoch, which must not stall the ranks that gather the vision shards."""
    records = [qa("<image>\nWhat colour?", f"Shade {i}" + " light" * i + ".", f"{i}.png") for i in range(3)]
    words = ["hi", "yes", "no", "ok", "bye"]
    records += [qa(f"Say {word}.", f"{word.title()}" + "!" * i + ".") for i, word in enumerate(words)]
    return write_llava_dataset(root, records, {f"{i}.png": (16 + 4 * i, 16, 60 * i) for i in range(3)})


def train_command(model_dir: Path, data: Path, output: Path, per_device_batch: int) -> list[str]:
    """examples/train.py arguments for a 6-step fp32 stage-2 run that logs every step; the same seed gives the same
    sampler permutation whatever the process count."""
    return [
        str(REPO_ROOT / "examples" / "train.py"),
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data),
        "--image_folder", str(data.parent / "images"),
        "--output_dir", str(output),
        "--preset", "stage2",
        "--max_steps", str(STEPS),
        "--per_device_train_batch_size", str(per_device_batch),
        "--learning_rate", "1e-3",  # large enough that the weights move well beyond WEIGHT_ATOL
        "--seed", "0",
        "--use_cpu",
        "--report_to", "none",
        "--logging_steps", "1",
        "--save_steps", str(STEPS),
    ]  # fmt: skip


def run(command: list[str], cwd: Path) -> None:
    """Runs `command` on one thread per process (the runners are shared), offline; fails with its output's end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def logged(output: Path, key: str) -> list[float]:
    """`key` ("loss", "grad_norm") at each logged step of the run's last checkpoint."""
    state = json.loads((output / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """A folder with the tiny model (model/), the data (data/) and the 1-process reference run (single/)."""
    root = tmp_path_factory.mktemp("distributed")
    model_dir, data = save_tiny_model(root / "model"), mixed_dataset(root / "data")
    run([sys.executable, *train_command(model_dir, data, root / "single", per_device_batch=4)], root)
    return root


def assert_trains_as_single_process(root: Path, output: Path) -> None:
    """Checks `output`'s run against the 1-process run in `root` step by step and by its saved weights, loaded
    as the package's class."""
    single = root / "single"
    single_loss, loss = logged(single, "loss"), logged(output, "loss")
    assert len(single_loss) == len(loss) == STEPS
    assert single_loss[-1] < single_loss[0] - 0.1, single_loss  # it trained, so matching curves mean something
    torch.testing.assert_close(loss, single_loss, rtol=0, atol=LOSS_ATOL)
    torch.testing.assert_close(logged(output, "grad_norm"), logged(single, "grad_norm"), rtol=1e-4, atol=0)

    trained = TokenPackerForConditionalGeneration.from_pretrained(output).state_dict()
    reference = TokenPackerForConditionalGeneration.from_pretrained(single).state_dict()
    initial = TokenPackerForConditionalGeneration.from_pretrained(root / "model").state_dict()
    torch.testing.assert_close(trained, reference, rtol=0, atol=WEIGHT_ATOL)
    assert max((trained[name] - initial[name]).abs().max() for name in trained) > 100 * WEIGHT_ATOL
    for name in trained:
        if ".vision_tower." in name:  # frozen in stage 2
            assert torch.equal(trained[name], initial[name]), name


@pytest.mark.skipif(FSDP2_MISSING, reason="this accelerate has no FSDP2 (fsdp_version), which fsdp_cpu.yaml needs")
def test_fsdp2_two_cpu_processes_match_one_process_and_save_a_loadable_checkpoint(single_process):
    root, output = single_process, single_process / "fsdp"
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "examples" / "configs" / "fsdp_cpu.yaml"),
        "--main_process_port",
        str(free_port()),
    ]
    run(accelerate + train_command(root / "model", root / "data" / "data.json", output, per_device_batch=2), root)

    # accelerate's FSDP checkpointing wrote these: the run was sharded, not a silent fallback to DDP.
    checkpoint = set(os.listdir(output / f"checkpoint-{STEPS}"))
    assert {"pytorch_model_fsdp.bin", "rng_state_0.pth", "rng_state_1.pth"} <= checkpoint
    # The full state dict, gathered on rank 0, loads and equals the 1-process weights.
    assert_trains_as_single_process(root, output)

    # Its remote code is the package's (test_modeling loads such folders without the package), not the modules
    # of the class FSDP2 generates, `FSDPTokenPackerForConditionalGeneration`, which live in torch.
    assert not [name for name in os.listdir(output) if name.startswith("_fsdp")]
    auto_map = json.loads((output / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_tokenpacker.TokenPackerForConditionalGeneration"
    package = Path(tokenpacker_hf.__file__).parent
    for module in ("modeling_tokenpacker.py", "projector_tokenpacker.py", "configuration_tokenpacker.py"):
        assert (output / module).read_bytes() == (package / module).read_bytes(), module


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3_two_cpu_processes_match_one_process(single_process):
    root, output = single_process, single_process / "zero3"
    command = train_command(root / "model", root / "data" / "data.json", output, per_device_batch=2)
    # Without --use_cpu, which makes accelerate drop DeepSpeed; train.py puts it on the CPU over gloo.
    command.remove("--use_cpu")
    run(torchrun() + command + ["--deepspeed", str(REPO_ROOT / "examples" / "configs" / "zero3.json")], root)

    assert (output / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()  # DeepSpeed's own partitioned state
    # stage3_gather_16bit_weights_on_model_save gathers the full weights (fp32 here) into model.safetensors.
    assert_trains_as_single_process(root, output)


def test_fsdp_cpu_config_is_the_gpu_config_on_two_cpu_processes():
    """fsdp_cpu.yaml differs from fsdp.yaml only where the CPU needs it, so the FSDP settings tested here (wrapped
    layers, full state dict) are the ones GPU runs use."""
    configs = REPO_ROOT / "examples" / "configs"
    gpu, cpu = (yaml.safe_load((configs / name).read_text()) for name in ("fsdp.yaml", "fsdp_cpu.yaml"))
    assert {key for key in gpu.keys() | cpu.keys() if gpu.get(key) != cpu.get(key)} == {
        "use_cpu",
        "num_processes",
        "mixed_precision",
    }
    assert cpu["use_cpu"] is True and cpu["num_processes"] == 2 and cpu["mixed_precision"] == "no"


@pytest.mark.parametrize("image_mode", ["pad", "slice"])
def test_blank_image_runs_the_vision_path_without_changing_loss_or_gradients(image_mode):
    config = tiny_config()
    processor = make_processor(image_mode, padding_side="right")
    conversations = [qa("Say hi.", "Hi."), qa("Count to three.", "One, two, three.")]
    examples = [encode_conversation(processor, llava_to_messages(c["conversations"]), []) for c in conversations]
    plain = TokenPackerCollator(processor)(examples)
    blank = TokenPackerCollator(processor, blank_image_for_text_only=True)(examples)
    assert "pixel_values" not in plain and blank["pixel_values"].shape[0] == blank["image_grids"].prod() == 1
    length = plain["input_ids"].shape[1]
    torch.testing.assert_close(blank["labels"][:, :length], plain["labels"], rtol=0, atol=0)
    assert (blank["labels"][:, length:] == -100).all() and not blank["attention_mask"][:, length:].any()

    torch.manual_seed(0)
    model = TokenPackerForConditionalGeneration(config)
    losses, grads = [], []
    for batch in (plain, blank):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    projector = {name for name in grads[1] if ".multi_modal_projector." in name}
    assert projector and not projector & grads[0].keys(), "only the blank image reaches the projector"
    assert all(not grads[1][name].any() for name in projector), "and it contributes exact zeros"
    torch.testing.assert_close({n: grads[1][n] for n in grads[0]}, grads[0], rtol=0, atol=1e-7)
