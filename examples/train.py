"""Finetune TokenPacker on LLaVA-format data with `transformers.Trainer`.

One process (CPU or one GPU):

    python examples/train.py --model_name_or_path PATH --data_path data.json --image_folder images \
        --preset stage2 --output_dir out --per_device_train_batch_size 16 --learning_rate 2e-5

From a pretrained vision tower and LLM instead of a TokenPacker folder (the paper's stage 1; stage 2 then takes
stage 1's output as --model_name_or_path):

    python examples/train.py --vision_tower openai/clip-vit-large-patch14-336 \
        --language_model lmsys/vicuna-7b-v1.5 --scale_factor 2 --preset stage1 --learning_rate 1e-3 ...

Several processes, unchanged (DDP; add a DeepSpeed or FSDP config from examples/configs/ for large models):

    torchrun --nproc_per_node 8 examples/train.py ... --deepspeed examples/configs/zero2.json
    accelerate launch --config_file examples/configs/fsdp.yaml examples/train.py ...

The sharded paths also run on CPU (gloo), to try them without GPUs (docs/distributed.md):

    accelerate launch --config_file examples/configs/fsdp_cpu.yaml examples/train.py ... --use_cpu
    torchrun --nproc_per_node 2 examples/train.py ... --deepspeed examples/configs/zero3.json  # no --use_cpu

Presets (the paper's two-stage recipe): `stage1` trains the projector only (the paper used lr 1e-3),
`stage2` the projector and the LLM (lr 2e-5), `lora` LoRA adapters on the LLM plus the full projector. The vision
tower stays frozen unless `--unfreeze_vision_tower`. Defaults follow the paper's recipe: activation checkpointing,
bf16 where the GPU supports it, cosine schedule, 3 % warm-up, no weight decay, 1 epoch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser, Trainer, TrainingArguments

from tokenpacker_hf.compose import compose_pretrained
from tokenpacker_hf.training import PRESETS, LlavaDataset, TokenPackerCollator, apply_preset

logger = logging.getLogger("tokenpacker_hf.train")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "TokenPacker model folder or Hub repo (with its processor)."}
    )
    vision_tower: str | None = field(
        default=None, metadata={"help": "Start from parts instead: a CLIP/SigLIP checkpoint (with --language_model)."}
    )
    language_model: str | None = field(default=None, metadata={"help": "A causal LM checkpoint (with --vision_tower)."})
    scale_factor: int = field(default=2, metadata={"help": "From parts: s, (G/s)^2 tokens per image tile."})
    region_feature_layers: list[int] | None = field(
        default=None, metadata={"help": "From parts: tower layers for the region keys (default 12 16 22 23)."}
    )
    image_mode: str = field(default="pad", metadata={"help": "From parts: pad, or slice for TokenPacker-HD."})
    chat_template: str | None = field(
        default=None, metadata={"help": "From parts: a Jinja chat template file (default: the original vicuna_v1)."}
    )
    preset: str = field(default="stage2", metadata={"help": f"What trains: one of {PRESETS}."})
    unfreeze_vision_tower: bool = field(default=False, metadata={"help": "Also train the vision tower."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (preset lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (preset lora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (preset lora)."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights dtype at load; keep float32 with --bf16 (mixed precision with fp32 master weights)."
        },
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Needed only for models this package can't load."})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA-format .json (a list) or .jsonl file."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the samples' image paths are relative to."}
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Longer samples lose text from their end; image tokens are never cut."}
    )


def parse_args() -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.set_defaults(
        remove_unused_columns=False,  # the model needs pixel_values and image_grids, which Trainer would drop
        activation_checkpointing=True,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        num_train_epochs=1,
    )
    argv = sys.argv[1:]
    if deepspeed_without_accelerator(argv):
        argv = configure_deepspeed_on_cpu(argv)
    return parser.parse_args_into_dataclasses(args=argv)


def deepspeed_without_accelerator(argv: list[str]) -> bool:
    """Whether this is one of several processes asked for `--deepspeed` on a machine without GPUs."""
    wants_deepspeed = any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv)
    return wants_deepspeed and "LOCAL_RANK" in os.environ and not torch.accelerator.is_available()


def configure_deepspeed_on_cpu(argv: list[str]) -> list[str]:
    """Sets up DeepSpeed's CPU accelerator over gloo before the arguments are parsed; returns `argv` telling
    the Trainer to keep that state.

    accelerate has no DeepSpeed path without a device: with `--use_cpu` it ignores DeepSpeed, and without it finds
    no backend and counts one process, while DeepSpeed counts them all ("train_batch_size is not equal to
    micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2"). Given the gloo backend, accelerate
    starts DeepSpeed's process group and a DEEPSPEED state on the CPU, which `use_configured_state` makes the
    Trainer use instead of building its own. Run without `--use_cpu`, which would discard DeepSpeed again.
    """
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read here and again when the Trainer builds its Accelerator
    PartialState(backend="gloo")
    return [*argv, "--accelerator_config", json.dumps({"use_configured_state": True})]


def load_model_and_processor(args: ModelArguments):
    """A TokenPacker folder, or a new model composed from `--vision_tower` and `--language_model`."""
    from_parts = args.vision_tower is not None and args.language_model is not None
    if from_parts == (args.model_name_or_path is not None):
        raise SystemExit("error: give either --model_name_or_path, or both --vision_tower and --language_model")
    dtype = getattr(torch, args.dtype)
    if not from_parts:
        processor = AutoProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            args.model_name_or_path,
            dtype=dtype,
            attn_implementation=args.attn_implementation,
            trust_remote_code=args.trust_remote_code,
        )
        return model, processor
    model, processor = compose_pretrained(
        args.vision_tower,
        args.language_model,
        scale_factor=args.scale_factor,
        region_feature_layers=args.region_feature_layers,
        image_mode=args.image_mode,
        dtype=dtype,
        chat_template=Path(args.chat_template).read_text() if args.chat_template else None,
    )
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    return model, processor


def allow_fsdp_on_cpu(training_args: TrainingArguments) -> None:
    """Lets `accelerate launch` with an FSDP config shard on CPU (`--use_cpu`, e.g. examples/configs/fsdp_cpu.yaml).

    accelerate applies its FSDP plugin only when the process group sits on an accelerator (its state takes
    the FSDP branch for MULTI_GPU, MULTI_XPU, ... but not MULTI_CPU), so on CPU the Trainer silently falls back
    to DDP. FSDP2 itself shards over gloo on CPU: declaring the CPU group a device group before the Trainer
    builds its Accelerator lets accelerate turn it into FSDP; the device stays the CPU.
    """
    if not training_args.use_cpu or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if PartialState().distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def main():
    model_args, data_args, training_args = parse_args()
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    allow_fsdp_on_cpu(training_args)

    model, processor = load_model_and_processor(model_args)
    model = apply_preset(
        model,
        model_args.preset,
        unfreeze_vision_tower=model_args.unfreeze_vision_tower,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
    )
    dataset = LlavaDataset(
        data_args.data_path, processor, image_folder=data_args.image_folder, max_length=data_args.model_max_length
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        # With several processes every rank must run the vision tower and projector at every step (FSDP and
        # ZeRO-3 gather their shards collectively, DDP waits for their gradients), even on a text-only batch.
        data_collator=TokenPackerCollator(processor, blank_image_for_text_only=training_args.world_size > 1),
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if dataset.skipped or dataset.truncated:
        logger.warning(
            "rank %d: skipped %s, truncated %d samples",
            training_args.process_index,
            dict(dataset.skipped),
            len(dataset.truncated),
        )


if __name__ == "__main__":
    main()
