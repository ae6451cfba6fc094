"""Build a small TokenPacker model from configs, save it as a Hub-style folder, load it back the way a user of
the Hub would (`AutoModelForImageTextToText` + `AutoProcessor`, `trust_remote_code=True`) and generate.

Runs offline in seconds. The weights are random, so the generated text is noise: the point is the full
path — config, processor token layout, one vision call, packed image tokens, `generate`.

    python examples/quickstart.py [--out DIR] [--mode pad|slice]
"""

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokenpacker_hf import TokenPackerForConditionalGeneration, TokenPackerProcessor
from tokenpacker_hf.image_processing_tokenpacker import TokenPackerImageProcessor
from tokenpacker_hf.tiny import make_tokenizer, tiny_config


def build_folder(out: str, mode: str) -> None:
    """Saves a random tiny model (16 px tiles, 4 tokens per tile) and its processor into `out`."""
    torch.manual_seed(0)
    config = tiny_config()
    TokenPackerForConditionalGeneration(config).save_pretrained(out)
    image_processor = TokenPackerImageProcessor.from_vision_config(config.vision_config, image_mode=mode)
    processor = TokenPackerProcessor.from_config(config, image_processor=image_processor, tokenizer=make_tokenizer())
    processor.save_pretrained(out)


def gradient_image(height: int, width: int) -> Image.Image:
    """A colourful test image: horizontal and vertical ramps in the red and green channels."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * xs / max(width - 1, 1), 255 * ys / max(height - 1, 1), np.full_like(xs, 128)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder to write the model to (default: a temporary folder)")
    parser.add_argument("--mode", choices=["pad", "slice"], default="slice")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="tokenpacker-quickstart-")

    build_folder(out, args.mode)
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)

    image = gradient_image(24, 40)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    rows, cols = inputs["image_grids"][0].tolist()
    image_positions = int((inputs["input_ids"] == model.config.image_token_id).sum())

    print(f"model folder      : {out}")
    print(f"prompt            : {prompt!r}")
    print(
        f"image 40x24 ({args.mode}) : grid {rows}x{cols}, {inputs['pixel_values'].shape[0]} tiles, "
        f"{image_positions} image tokens ({model.config.num_image_tokens} per tile)"
    )
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_text = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :])[0]
    print(f"generated (random weights): {new_text!r}")


if __name__ == "__main__":
    main()
