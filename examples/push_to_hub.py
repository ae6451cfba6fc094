"""Push a TokenPacker model, or a LoRA adapter, with its processor and a model card to the Hugging Face Hub.

    python examples/push_to_hub.py --model_dir out --repo_id you/tokenpacker-7b-144 \
        --base_models openai/clip-vit-large-patch14-336 lmsys/vicuna-7b-v1.5
    python examples/push_to_hub.py --model_dir out/adapter --repo_id you/tokenpacker-lora \
        --adapter_base you/tokenpacker-7b-144

The card carries `pipeline_tag: image-text-to-text`, the base models, the image token budget and a usage snippet.
The modelling code is uploaded with the weights, so the repo loads with `trust_remote_code=True` anywhere.
Authenticate first (`hf auth login` or `HF_TOKEN`); `HF_ENDPOINT` selects another Hub.
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForImageTextToText, AutoProcessor

from tokenpacker_hf.hub import push_to_hub


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="saved model (or adapter) folder with its processor")
    parser.add_argument("--repo_id", required=True)
    parser.add_argument("--adapter_base", default=None, help="the base model repo of an adapter folder")
    parser.add_argument("--base_models", nargs="*", default=[], help="models this one was built from, for the card")
    parser.add_argument("--datasets", nargs="*", default=[], help="training datasets, for the card")
    parser.add_argument("--description", default="", help="a sentence for the card")
    parser.add_argument("--license", default="unknown", help="Hub license id for the card, e.g. apache-2.0, llama2")
    parser.add_argument("--private", action="store_true")
    return parser.parse_args()


def main():
    args = parse_args()
    processor = AutoProcessor.from_pretrained(args.model_dir, trust_remote_code=True)
    if args.adapter_base:
        from peft import PeftModel

        base = AutoModelForImageTextToText.from_pretrained(args.adapter_base, trust_remote_code=True)
        model = PeftModel.from_pretrained(base, args.model_dir)
    else:
        model = AutoModelForImageTextToText.from_pretrained(args.model_dir, trust_remote_code=True)
    push_to_hub(
        model,
        processor,
        args.repo_id,
        base_models=args.base_models,
        adapter_base=args.adapter_base,
        datasets=args.datasets,
        description=args.description,
        license=args.license,
        private=args.private or None,
    )
    print(f"pushed {args.model_dir} to {args.repo_id}")


if __name__ == "__main__":
    main()
