"""LoRA-finetune a TokenPacker model on LLaVA-format data, then save the adapter and, with `--merge`, a merged
plain model that loads without PEFT.

    python examples/lora_finetune.py --model PATH_OR_REPO --data data.json --image_folder images --output out \
        --max_steps 100 --merge

The LLM gets LoRA on its attention and MLP Linears, the projector trains fully (PEFT `modules_to_save`), the vision
tower stays frozen and runs without autograd. `out/adapter` loads with
`PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True), "out/adapter")`.
For several GPUs or the full Trainer options, use `examples/train.py --preset lora`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from tokenpacker_hf.training import LlavaDataset, TokenPackerCollator, apply_preset


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="TokenPacker model folder or Hub repo (with its processor)")
    parser.add_argument("--data", required=True, help="LLaVA-format .json/.jsonl")
    parser.add_argument("--image_folder", default=None)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--lora_r", type=int, default=64)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--merge", action="store_true", help="also save the merged model to OUTPUT/merged")
    return parser.parse_args()


def main():
    args = parse_args()
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
    model = apply_preset(model, "lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha)
    model.print_trainable_parameters()

    dataset = LlavaDataset(args.data, processor, image_folder=args.image_folder, max_length=args.max_length)
    training_args = TrainingArguments(
        output_dir=str(args.output / "checkpoints"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        logging_steps=10,
        save_strategy="no",
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=True,
        remove_unused_columns=False,  # keeps pixel_values and image_grids
        report_to="none",
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=TokenPackerCollator(processor)
    )
    trainer.train()

    model.save_pretrained(args.output / "adapter")
    processor.save_pretrained(args.output / "adapter")
    print(f"adapter saved to {args.output / 'adapter'} (skipped samples: {dict(dataset.skipped)})")
    if args.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(args.output / "merged")
        processor.save_pretrained(args.output / "merged")
        print(f"merged model saved to {args.output / 'merged'}")


if __name__ == "__main__":
    main()
