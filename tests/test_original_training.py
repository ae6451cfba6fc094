"""Training samples equal to the original's data path on the real LLaMA vocabulary: `llava_to_messages` +
`encode_conversation` against an independent oracle of the original's `preprocess_multimodal` + `preprocess_v1`
(ids and per-round label masking) over transformers 4.31's slow SentencePiece tokenizer, for both `legacy`
settings, in pad and slice modes."""

import numpy as np
import pytest
from PIL import Image

from tokenpacker_hf.image_processing_tokenpacker import TokenPackerImageProcessor
from tokenpacker_hf.processing_tokenpacker import VICUNA_V1_SYSTEM, TokenPackerProcessor
from tokenpacker_hf.training import encode_conversation, llava_to_messages

from reference.original_tokenization import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    SentencePieceBPE,
    SlowLlamaTokenizer,
    expand_image_placeholders,
    preprocess_multimodal,
    preprocess_v1,
)

T = 4
IMAGE_ID, COMMA_ID, UNK_ID = 32000, 29892, 0


def turns(*values: str, first: str = "human") -> list[dict[str, str]]:
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[index % 2], "value": value} for index, value in enumerate(values)]


CONVERSATIONS = [
    turns("<image>\nWhat is it?", "A cat."),
    turns("What is it?\n<image>", "A cat."),
    turns("Look at this <image> and tell me what it is.", "A dog."),
    turns("<image>\nWhat is it?", "A cat.", "Are you sure?\n", "Yes."),
    turns(" Translate 'cat' to French.\n", "chat"),
    turns("Hi", "Hello!", "How are you?", "Fine, thanks."),
    turns("<image>", "A photo of a tree."),
    turns("  <image>\n  What colour is it?  ", "  Red. "),
    turns("<image>\nCount the dots.", " 3"),
    turns("<image>\nList two things.", "1. a mat\n2. a hat"),
    turns("Hello", "Hi there.", "<image>\nWhat now?", "A bus."),
    turns("<image>\nFirst?", "One.", " Second? ", " Two.", "Third?\n\n", "Three.\n"),
    turns("<image>\nWas ist das? \U0001f999", "Ein Lama. \u9547"),
    turns("ignored answer", "<image>\nQ?", "A.", first="gpt"),
    turns("Describe this image: <image>  ", "It is blue."),
    turns("  two leading spaces", "ok"),
]


@pytest.fixture(scope="module")
def oracles(llama_vocab):
    bpe = SentencePieceBPE(*llama_vocab)
    return {legacy: SlowLlamaTokenizer(bpe.encode, bpe.piece_to_id, legacy) for legacy in (False, True)}


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def original_sample(conversation, tokenizer, grids, image_mode):
    """The original's (input_ids, labels) of one sample, each -200 expanded to its image positions."""
    has_image = any("<image>" in turn["value"] for turn in conversation)
    ids, labels = preprocess_v1(preprocess_multimodal([conversation]), tokenizer, has_image)
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels, strict=True) if token == IMAGE_TOKEN_INDEX)
    # The image's label positions are found through its -200 in the ids, as `prepare_inputs_labels_for_multimodal`.
    marked = [
        IMAGE_TOKEN_INDEX if token == IMAGE_TOKEN_INDEX else label for token, label in zip(ids, labels, strict=True)
    ]
    expand = dict(grids=grids, mode=image_mode, tokens_per_tile=T)
    return (
        expand_image_placeholders(ids, image_value=IMAGE_ID, separator_values=(COMMA_ID, UNK_ID), **expand),
        expand_image_placeholders(marked, image_value=IGNORE_INDEX, separator_values=(IGNORE_INDEX,) * 2, **expand),
    )


@pytest.mark.parametrize("image_mode", ["pad", "slice"])
@pytest.mark.parametrize("legacy", [False, True])
def test_training_ids_and_labels_equal_the_original(llama_tokenizers, oracles, legacy, image_mode):
    image_processor = TokenPackerImageProcessor(image_mode=image_mode, tile_size=16, max_slices=9)
    processor = TokenPackerProcessor(
        image_processor=image_processor, tokenizer=llama_tokenizers[legacy], num_image_tokens=T
    )
    for index, conversation in enumerate(CONVERSATIONS):
        count = sum(turn["value"].count("<image>") for turn in conversation)
        images = [noise_image(40, 24, seed=index)] * count
        example = encode_conversation(processor, llava_to_messages(conversation), images)
        grids = [tuple(grid) for grid in example["image_grids"].tolist()] if images else []
        ids, labels = original_sample(conversation, oracles[legacy], grids, image_mode)
        assert any(label != IGNORE_INDEX for label in labels), conversation  # no "tokenization mismatch"
        assert example["input_ids"].tolist() == ids, conversation
        assert example["labels"].tolist() == labels, conversation


def test_rendering_keeps_the_whitespace_the_original_keeps():
    """As the original's `preprocess_multimodal`: only turns holding `<image>` are stripped; a text-only turn keeps both
    ends (docs/prompt_tokens.md)."""
    conversation = turns("<image>\nWhat is it?", "A cat.", "Are you sure?\n", "Yes.")
    assert [m["content"] for m in llava_to_messages(conversation)] == [
        "<image>\nWhat is it?",
        "A cat.",
        "Are you sure?\n",
        "Yes.",
    ]
    assert llava_to_messages(turns(" Translate 'cat' to French.\n", "chat"))[0]["content"] == (
        " Translate 'cat' to French.\n"
    )


def test_an_image_only_turn_follows_the_training_path(llama_tokenizers):
    """The original's training path strips `<image>\\n` to `<image>` (`USER: <image> ASSISTANT:`), while its
    evaluation prompt and the chat template with an image item keep `<image>\\n`."""
    processor = TokenPackerProcessor(
        image_processor=TokenPackerImageProcessor(tile_size=16), tokenizer=llama_tokenizers[False], num_image_tokens=T
    )
    messages = llava_to_messages(turns("<image>", "A tree."))
    assert processor.apply_chat_template(messages) == f"<s>{VICUNA_V1_SYSTEM} USER: <image> ASSISTANT: A tree.</s>"
    eval_messages = [{"role": "user", "content": [{"type": "image"}]}]
    assert processor.apply_chat_template(eval_messages, add_generation_prompt=True) == (
        f"<s>{VICUNA_V1_SYSTEM} USER: <image>\n ASSISTANT:"
    )


def test_a_user_turn_ending_in_the_separator_is_not_supervised(llama_tokenizers, oracles):
    """The one deliberate difference: the original finds an answer by splitting each round at the first
    " ASSISTANT: ", so a user turn that itself ends in "ASSISTANT:" has that text supervised as part of the answer.
    The ids are the original's; the labels supervise only the answer and its `</s>`."""
    conversation = turns("<image>\nComplete: USER: hi ASSISTANT:", "hello")
    image_processor = TokenPackerImageProcessor(tile_size=16)
    processor = TokenPackerProcessor(
        image_processor=image_processor, tokenizer=llama_tokenizers[False], num_image_tokens=T
    )
    example = encode_conversation(processor, llava_to_messages(conversation), [noise_image(40, 24, seed=0)])
    ids, labels = original_sample(conversation, oracles[False], [(1, 1)], "pad")
    assert example["input_ids"].tolist() == ids
    ours = [label for label in example["labels"].tolist() if label != IGNORE_INDEX]
    original = [label for label in labels if label != IGNORE_INDEX]
    tokenizer = llama_tokenizers[False]
    assert tokenizer.decode(ours) == "hello</s>"
    assert tokenizer.decode(original) == "ASSISTANT: hello</s>"
