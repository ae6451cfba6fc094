"""TRL's `SFTTrainer` on messages data with `SFTConfig(assistant_only_loss=True)`: the chat template's
`{% generation %}` markers and the processor's offsets give TRL's collator the same ids and the same loss mask as
this package's own collator, token for token, and a training step runs."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version
from PIL import Image

from tokenpacker_hf import TokenPackerForConditionalGeneration
from tokenpacker_hf.processing_tokenpacker import TokenPackerProcessor
from tokenpacker_hf.training import IGNORE_INDEX, TokenPackerCollator, encode_conversation, llava_to_messages

from builders import make_processor
from tiny import tiny_config

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")


def tiny_processor(image_mode: str = "pad") -> TokenPackerProcessor:
    return make_processor(image_mode, padding_side="right")  # TRL pads on the right


def image(width: int, height: int, red: int) -> Image.Image:
    return Image.new("RGB", (width, height), (red, 60, 200 - red))


# (LLaVA turns, images): single- and multi-turn, with 0, 1 and 2 images; a turn with images puts them first.
CONVERSATIONS = [
    ([("human", "Say hi."), ("gpt", "Hi.")], []),
    ([("human", "What colour?"), ("gpt", "Red.")], [image(16, 16, 200)]),
    (
        [("human", "Compare them."), ("gpt", "Both blue."), ("human", "Sure?"), ("gpt", "Yes.")],
        [image(16, 16, 10), image(40, 24, 30)],
    ),
    ([("human", "Count."), ("gpt", "One."), ("human", "And now?"), ("gpt", "Still one.")], []),
    ([("human", "Shape?"), ("gpt", "Square."), ("human", "Size?"), ("gpt", "Small.")], [image(24, 40, 90)]),
]


def trl_example(turns: list[tuple[str, str]], images: list[Image.Image]) -> dict:
    """TRL's conversational vision format: plain-text messages and the sample's images beside them (TRL puts the
    images in front of the first user turn)."""
    roles = {"human": "user", "gpt": "assistant"}
    return {"messages": [{"role": roles[who], "content": text} for who, text in turns], "images": images}


def own_example(processor: TokenPackerProcessor, turns: list[tuple[str, str]], images: list[Image.Image]) -> dict:
    """The same sample through this package's training path (LLaVA turns, `<image>` in the first question)."""
    conversation = [{"from": who, "value": text} for who, text in turns]
    conversation[0]["value"] = "<image>\n" * len(images) + conversation[0]["value"]
    return encode_conversation(processor, llava_to_messages(conversation), images)


def sft_trainer(processor: TokenPackerProcessor, tmp_path, train_rows: list[dict]) -> trl.SFTTrainer:
    torch.manual_seed(0)
    model = TokenPackerForConditionalGeneration(tiny_config())
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        assistant_only_loss=True,
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    dataset = datasets.Dataset.from_list(train_rows)
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)


@pytest.mark.parametrize("image_mode", ["pad", "slice"])
def test_assistant_only_loss_mask_equals_the_collators_token_for_token(tmp_path, image_mode):
    processor = tiny_processor(image_mode)
    rows = [trl_example(turns, images) for turns, images in CONVERSATIONS]
    trainer = sft_trainer(processor, tmp_path, rows)
    for (turns, images), row in zip(CONVERSATIONS, rows, strict=True):
        trl_batch = trainer.data_collator([dict(row)])
        own_batch = TokenPackerCollator(processor)([own_example(processor, turns, images)])
        assert trl_batch["input_ids"].tolist() == own_batch["input_ids"].tolist(), turns
        assert trl_batch["labels"].tolist() == own_batch["labels"].tolist(), turns
        answers = processor.tokenizer.decode(trl_batch["labels"][0][trl_batch["labels"][0] != IGNORE_INDEX])
        assert answers == "".join(f" {text}</s>" for who, text in turns if who == "gpt")
        if images:
            torch.testing.assert_close(trl_batch["pixel_values"], own_batch["pixel_values"])
            # transformers asks for replacement offsets to build the mask, so the grids come one per image
            assert torch.stack(trl_batch["image_grids"]).tolist() == own_batch["image_grids"].tolist()


def test_a_batch_of_mixed_samples_is_padded_as_the_collator_pads_it(tmp_path):
    processor = tiny_processor("slice")
    rows = [trl_example(turns, images) for turns, images in CONVERSATIONS[1:3]]
    trainer = sft_trainer(processor, tmp_path, rows)
    trl_batch = trainer.data_collator([dict(row) for row in rows])
    own_batch = TokenPackerCollator(processor)([own_example(processor, *pair) for pair in CONVERSATIONS[1:3]])
    for key in ("input_ids", "attention_mask", "labels"):
        assert trl_batch[key].tolist() == own_batch[key].tolist(), key
    assert torch.stack(trl_batch["image_grids"]).tolist() == own_batch["image_grids"].tolist()


@pytest.mark.skipif(
    Version(trl.__version__) < Version("1.16") and not torch.cuda.is_available(),
    reason="TRL 1.15 computes the loss with a Triton kernel that needs a GPU; 1.16 added the CPU path",
)
def test_sft_trainer_trains_on_answers_only(tmp_path):
    processor = tiny_processor("slice")
    rows = [trl_example(turns, images) for turns, images in CONVERSATIONS[1:3]]
    trainer = sft_trainer(processor, tmp_path, rows)
    projector = trainer.model.model.multi_modal_projector
    before = [parameter.detach().clone() for parameter in projector.parameters()]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(old, new) for old, new in zip(before, projector.parameters(), strict=True))


def test_text_data_with_images_but_no_image_token_is_refused(tmp_path):
    processor = tiny_processor()
    trainer = sft_trainer(processor, tmp_path, [trl_example(*CONVERSATIONS[1])])
    collator = trainer.data_collator
    collator.assistant_only_loss = False  # the plain-text format has no turns to mask
    with pytest.raises(ValueError, match=r"expected \[0\] images per prompt \(one per <image> token\), got \[1\]"):
        collator([{"text": "USER: What colour? ASSISTANT: Red.</s>", "images": [image(16, 16, 200)]}])
