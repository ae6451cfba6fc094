"""Prompt ids equal to the original's on the real LLaMA vocabulary: the processor against an independent oracle of
the original's `tokenizer_image_token` over transformers 4.31's slow SentencePiece tokenizer
(`reference/original_tokenization.py`), for both `legacy` settings, pad and slice modes, 0-3 images, system
prompts, multi-turn prompts with `</s>` and text-only turns."""

import numpy as np
import pytest
from PIL import Image

from tokenpacker_hf.image_processing_tokenpacker import TokenPackerImageProcessor
from tokenpacker_hf.processing_tokenpacker import VICUNA_V1_SYSTEM, TokenPackerProcessor

from llama_vocab import package_test_cases
from reference.original_tokenization import (
    IMAGE_TOKEN_INDEX,
    SentencePieceBPE,
    SlowLlamaTokenizer,
    expand_image_placeholders,
    tokenizer_image_token,
)

T = 4
IMAGE_ID, COMMA_ID, UNK_ID = 32000, 29892, 0
S = VICUNA_V1_SYSTEM

PROMPTS = [
    f"{S} USER: <image>\nWhat is in the image? ASSISTANT:",
    f"{S} USER: Hello! ASSISTANT:",
    f"{S} USER: <image>\n ASSISTANT:",
    f"{S} USER: <image> ASSISTANT:",
    f"{S} USER: What is this?\n<image> ASSISTANT:",
    f"{S} USER: Compare <image> and <image> please. ASSISTANT:",
    f"{S} USER: <image>\n<image>\n<image>\nWhich differs? ASSISTANT:",
    f"{S} USER: <image>\nDescribe it. ASSISTANT: A cat on a mat.</s>USER: What colour is it? ASSISTANT:",
    f"{S} USER: <image>\nRead it. ASSISTANT: 3168</s>USER: <image>\nAnd this one? ASSISTANT:",
    f"{S} USER: Hi ASSISTANT: Hello.</s>USER:  Two spaces. ASSISTANT:",
    f"{S} USER: <image>\nQ ASSISTANT: A</s> USER: a space after the end token ASSISTANT:",
    "Be brief. USER: <image>\nWhat is it? ASSISTANT:",
    " Leading space system. USER: <image>\nx ASSISTANT:",
    "<image>\nA prompt that starts with the image.",
    "USER: <image>",
    "<image><image>",
    f"{S} USER: \u00e9t\u00e9 \u9547 \U0001f999 <image>\n\u2581underline and\ttab ASSISTANT:",
    f"{S} USER: <image>\nLine one.\nLine two.\n\n ASSISTANT: ok</s>USER: \nnewline first ASSISTANT:",
    f"{S} USER: Translate 'cat' to French.\n ASSISTANT: chat</s>USER: <image>\nand this? ASSISTANT:",
    f"{S} USER: 1,2,3 <image>, 4 ASSISTANT:",
    f"{S} USER: x</s></s>USER: y ASSISTANT:",
    f"{S} USER: x ASSISTANT: y</s>\u2581USER: a literal underline after the end token ASSISTANT:",
]


@pytest.fixture(scope="module")
def oracles(llama_vocab):
    bpe = SentencePieceBPE(*llama_vocab)
    return {legacy: SlowLlamaTokenizer(bpe.encode, bpe.piece_to_id, legacy) for legacy in (False, True)}


def make_processor(tokenizer, image_mode: str) -> TokenPackerProcessor:
    image_processor = TokenPackerImageProcessor(image_mode=image_mode, tile_size=16, max_slices=9)
    return TokenPackerProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=T)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_llama_vocabulary_has_the_known_ids(llama_tokenizers):
    for tokenizer in llama_tokenizers.values():
        assert len(tokenizer) == 32001  # 32,000 pieces and <image>
        assert tokenizer.convert_tokens_to_ids([",", "\u2581", "<0x0A>", "</s>", "<unk>", "<s>", "<image>"]) == [
            29892,
            29871,
            13,
            2,
            0,
            1,
            32000,
        ]


@pytest.mark.parametrize("legacy", [False, True])
def test_oracle_and_processor_reproduce_the_real_llama_tokenizer(llama_tokenizers, oracles, legacy):
    """The npm package's own checks of the real LLaMA tokenizer: texts with leading spaces, newlines, tabs, CJK and
    byte-fallback emoji."""
    cases = package_test_cases()
    assert len(cases) >= 10
    processor = make_processor(llama_tokenizers[legacy], "pad")
    for text, expected in cases:
        assert oracles[legacy](text).input_ids == expected, text
        assert processor.encode_prompt(text)[0] == expected, text


@pytest.mark.parametrize("image_mode", ["pad", "slice"])
@pytest.mark.parametrize("legacy", [False, True])
def test_prompt_ids_equal_the_original(llama_tokenizers, oracles, legacy, image_mode):
    processor = make_processor(llama_tokenizers[legacy], image_mode)
    checked = 0
    for index, prompt in enumerate(PROMPTS):
        count = prompt.count("<image>")
        images = [noise_image(16 + 24 * k, 40 - 8 * k, seed=index + k) for k in range(count)] or None
        out = processor(images=images, text=prompt)
        grids = [tuple(grid) for grid in out["image_grids"].tolist()] if images else []
        original = tokenizer_image_token(prompt, oracles[legacy])
        expected = expand_image_placeholders(original, grids, image_mode, T, IMAGE_ID, (COMMA_ID, UNK_ID))
        assert out["input_ids"][0] == expected, prompt
        unexpanded = [IMAGE_ID if token == IMAGE_TOKEN_INDEX else token for token in original]
        assert processor.encode_prompt(prompt)[0] == unexpanded, prompt
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("legacy", [False, True])
def test_the_token_after_an_image_is_the_dummy_prefix(llama_tokenizers, legacy):
    """The original tokenises the text after `<image>` on its own, so it starts with the dummy prefix: `<image>`,
    `▁` (29871), `<0x0A>` (13), ... whatever the legacy setting (docs/prompt_tokens.md)."""
    processor = make_processor(llama_tokenizers[legacy], "pad")
    ids, _ = processor.encode_prompt("USER: <image>\nWhat")
    at = ids.index(IMAGE_ID)
    assert ids[at + 1 : at + 3] == [29871, 13]


def test_text_after_the_end_token_follows_the_legacy_setting(llama_tokenizers, oracles):
    """transformers 4.31's slow tokenizer: legacy=True encodes `</s>USER` with the dummy prefix (`▁US`, `ER`);
    legacy=False cuts the prefix from that first piece (`US`, `ER`), which is not what a fast non-legacy tokenizer
    gives for the same text (`USER`)."""
    prompt = "A: x</s>USER: y"
    us, er, user, prefixed_us = 3308, 1001, 11889, 3148
    assert oracles[True](prompt).input_ids[-4:-2] == [prefixed_us, er]
    assert oracles[False](prompt).input_ids[-4:-2] == [us, er]
    assert llama_tokenizers[False](prompt)["input_ids"][-3] == user
    for legacy in (False, True):
        processor = make_processor(llama_tokenizers[legacy], "pad")
        assert processor.encode_prompt(prompt)[0] == oracles[legacy](prompt).input_ids


@pytest.mark.parametrize("image_mode", ["pad", "slice"])
def test_chat_template_tokenize_gives_the_processor_ids(llama_tokenizers, image_mode):
    processor = make_processor(llama_tokenizers[False], image_mode)
    image = noise_image(48, 32, seed=0)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
    ]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert out["input_ids"] == processor(images=image, text=rendered)["input_ids"]


def test_offsets_cover_the_prompt(llama_tokenizers):
    """Each token's span in the prompt: the distinct spans, in order, are the prompt (the image token covers its
    `<image>`); BOS and a piece that is only the dummy prefix have empty spans."""
    prompt = f" {S} USER: <image>\nHi \U0001f999 ASSISTANT: A.</s>USER: More</s> USER: <image>"
    for tokenizer in llama_tokenizers.values():
        ids, offsets = make_processor(tokenizer, "pad").encode_prompt(prompt)
        assert len(ids) == len(offsets) and offsets[0] == (0, 0)
        assert [prompt[begin:end] for token, (begin, end) in zip(ids, offsets, strict=True) if token == IMAGE_ID] == [
            "<image>"
        ] * 2
        spans = [span for span in offsets if span[1] > span[0]]
        distinct = [span for index, span in enumerate(spans) if index == 0 or span != spans[index - 1]]
        assert "".join(prompt[begin:end] for begin, end in distinct) == prompt
