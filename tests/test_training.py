"""Training: LLaVA-format data, exact label masking, bad input, the Trainer presets (what trains, what the frozen
tower costs) and `examples/train.py` under `torchrun` with two CPU processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest
import torch
from PIL import Image
from transformers import Trainer, TrainingArguments

from tokenpacker_hf import TokenPackerForConditionalGeneration
from tokenpacker_hf.processing_tokenpacker import VICUNA_V1_SYSTEM
from tokenpacker_hf.training import (
    IGNORE_INDEX,
    PRESETS,
    LlavaDataset,
    TokenPackerCollator,
    apply_preset,
    encode_conversation,
    llava_to_messages,
)

from builders import (
    REPO_ROOT,
    make_processor,
    qa,
    save_tiny_model,
    small_dataset,
    torchrun,
    write_llava_dataset,
)
from tiny import IMAGE_TOKEN_ID, make_tokenizer, tiny_config

TOKENS_PER_IMAGE = tiny_config().num_image_tokens  # 4


def char_ids(text: str) -> list[int]:
    """Independent tokenisation for the tiny byte-level vocabulary: one id per UTF-8 byte, specials excepted."""
    tokenizer = make_tokenizer()
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# Labels


def test_multi_turn_labels_exact_token_by_token():
    processor = make_processor(padding_side="right")
    conversation = [
        {"from": "human", "value": "What is it?\n<image>"},  # the image moves to the front, as in the original
        {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ]
    example = encode_conversation(processor, llava_to_messages(conversation), [Image.new("RGB", (16, 16), (255, 0, 0))])

    # (text, supervised) pieces of "<s>{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    pieces = [
        ("<s>" + VICUNA_V1_SYSTEM + " USER: ", False),
        ("<image>", None),
        ("\nWhat is it? ASSISTANT:", False),
        (" A red square.</s>", True),
        ("USER: Sure? ASSISTANT:", False),
        (" Yes.</s>", True),
    ]
    expected_ids, expected_labels = [], []
    for text, supervised in pieces:
        if supervised is None:
            expected_ids += [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE
            expected_labels += [IGNORE_INDEX] * TOKENS_PER_IMAGE
            continue
        ids = char_ids(text)
        expected_ids += ids
        expected_labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    assert example["input_ids"].tolist() == expected_ids
    assert example["labels"].tolist() == expected_labels
    assert example["pixel_values"].shape == (1, 3, 16, 16)
    assert example["image_grids"].tolist() == [[1, 1]]
    assert example["truncated"] is False


def test_text_only_sample_supervises_answer_and_has_no_pixels():
    processor = make_processor(padding_side="right")
    example = encode_conversation(processor, llava_to_messages(qa("Say hi.", "Hi.")["conversations"]), [])
    assert "pixel_values" not in example and "image_grids" not in example
    supervised = [label for label in example["labels"].tolist() if label != IGNORE_INDEX]
    assert supervised == char_ids(" Hi.</s>")


def test_truncation_cuts_text_only_and_is_counted(tmp_path):
    processor = make_processor(padding_side="right")
    path = write_llava_dataset(
        tmp_path, [qa("<image>\nDescribe.", "A long answer " * 5, "a.png")], {"a.png": (16, 16, 9)}
    )
    full = LlavaDataset(path, processor, tmp_path / "images")[0]
    limit = len(full["input_ids"]) - 20  # inside the answer, well after the image
    dataset = LlavaDataset(path, processor, tmp_path / "images", max_length=limit)
    cut = dataset[0]
    assert cut["input_ids"].tolist() == full["input_ids"][:limit].tolist()
    assert cut["labels"].tolist() == full["labels"][:limit].tolist()
    assert (cut["input_ids"] == IMAGE_TOKEN_ID).sum() == TOKENS_PER_IMAGE
    assert dataset.truncated == {0} and not dataset.skipped


def test_samples_that_cannot_fit_are_skipped_counted_and_replaced(tmp_path, caplog):
    processor = make_processor(padding_side="right")
    short = {"conversations": [{"from": "system", "value": "Be brief."}, *qa("Hi?", "Hello.")["conversations"]]}
    records = [
        qa("<image>\nDescribe.", "Red.", "a.png"),  # the default system prompt alone puts the image past 100
        qa("Hi?" + " really" * 30, "Hello."),  # fits only by cutting the whole answer
        short,
    ]
    path = write_llava_dataset(tmp_path, records, {"a.png": (16, 16, 9)})
    dataset = LlavaDataset(path, processor, tmp_path / "images", max_length=100)
    with caplog.at_level(logging.WARNING, logger="tokenpacker_hf.training"):
        first = dataset[0]
    assert first["input_ids"].tolist() == char_ids("<s>Be brief. USER: Hi? ASSISTANT: Hello.</s>")
    assert dataset.skipped == {"image_tokens_exceed_max_length": 1, "no_answer_tokens": 1}
    assert "beyond max_length=100" in caplog.text
    dataset[1]
    assert dataset.skipped == {"image_tokens_exceed_max_length": 1, "no_answer_tokens": 1}, "counted once"


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_records_are_skipped_and_counted(tmp_path, caplog):
    records = [
        qa("<image>\nOk?", "Ok.", "good.png"),
        qa("<image>\nWhere?", "Gone.", "missing.png"),
        qa("No marker here.", "Mismatch.", "good.png"),
        qa("<image>\n<image>\nTwo markers.", "One image.", "good.png"),
        {"conversations": [{"from": "robot", "value": "?"}]},
        {"conversations": [{"from": "human", "value": "No answer."}]},
        "not a record",
    ]
    path = write_llava_dataset(tmp_path, records, {"good.png": (16, 16, 1)})
    with caplog.at_level(logging.WARNING, logger="tokenpacker_hf.training"):
        dataset = LlavaDataset(path, make_processor(padding_side="right"), tmp_path / "images")
    assert len(dataset) == 1
    assert dataset.skipped == {"missing_image": 1, "image_count_mismatch": 2, "malformed": 3}
    assert "missing.png" in caplog.text and "2 <image> marker(s)" in caplog.text


def test_unreadable_image_is_skipped_mid_epoch(tmp_path):
    path = write_llava_dataset(
        tmp_path,
        [qa("<image>\nA?", "B.", "broken.png"), qa("<image>\nC?", "D.", "fine.png")],
        {"fine.png": (16, 16, 3)},
    )
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    dataset = LlavaDataset(path, make_processor(padding_side="right"), tmp_path / "images")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=TokenPackerCollator(dataset.processor))
    (batch,) = list(loader)
    assert batch["pixel_values"].shape[0] == 2  # the broken sample was replaced by the readable one
    assert dataset.skipped == {"unreadable_image": 1}


def test_empty_or_unusable_dataset_raises_naming_the_file(tmp_path):
    empty = write_llava_dataset(tmp_path, [])
    with pytest.raises(ValueError, match=r"data\.json: the dataset holds no samples"):
        LlavaDataset(empty, make_processor(padding_side="right"))
    unusable = write_llava_dataset(tmp_path, [qa("<image>\n?", "!", "nowhere.png")])
    with pytest.raises(ValueError, match=r"data\.json: none of its 1 samples is usable .*missing_image"):
        LlavaDataset(unusable, make_processor(padding_side="right"), tmp_path / "images")


# ----------------------------------------------------------------------------------------------------------------
# Collator


def test_collator_pads_and_orders_pixels_by_batch(tmp_path):
    dataset = LlavaDataset(small_dataset(tmp_path), make_processor(padding_side="right"), tmp_path / "images")
    examples = [dataset[4], dataset[1], dataset[2]]  # text only, image 1, image 2
    batch = TokenPackerCollator(dataset.processor, pad_to_multiple_of=8)(examples)
    lengths = [len(example["input_ids"]) for example in examples]
    assert batch["input_ids"].shape[1] == -(-max(lengths) // 8) * 8
    for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
        assert batch["input_ids"][row, :length].tolist() == example["input_ids"].tolist()
        assert batch["labels"][row, :length].tolist() == example["labels"].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == 0).all()
    torch.testing.assert_close(
        batch["pixel_values"], torch.cat([examples[1]["pixel_values"], examples[2]["pixel_values"]])
    )
    assert batch["image_grids"].tolist() == [[1, 1], [1, 1]]
    assert "pixel_values" not in TokenPackerCollator(dataset.processor)([dataset[4]])


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_masks_by_length_when_the_row_separator_is_the_pad_id(side):
    processor = make_processor("slice", padding_side="right", row_separator=0)
    pad_id = processor.tokenizer.pad_token_id
    assert processor.separator_ids[1] == pad_id
    image_turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Wide."}]
    text_turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    examples = [
        encode_conversation(processor, llava_to_messages(image_turns), [Image.new("RGB", (48, 16), (9, 9, 9))]),
        encode_conversation(processor, llava_to_messages(text_turns), []),
    ]
    batch = TokenPackerCollator(processor, padding_side=side)(examples)
    width = batch["input_ids"].shape[1]
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        real = slice(width - length, width) if side == "left" else slice(0, length)
        mask = [0] * (width - length) + [1] * length if side == "left" else [1] * length + [0] * (width - length)
        assert batch["attention_mask"][row].tolist() == mask
        assert batch["input_ids"][row, real].tolist() == example["input_ids"].tolist()
        assert batch["labels"][row, real].tolist() == example["labels"].tolist()
    separators = (batch["input_ids"][0] == pad_id) & (batch["attention_mask"][0] == 1)
    assert separators.sum() == 2  # the grid row's and the thumbnail's row separators stay visible


# ----------------------------------------------------------------------------------------------------------------
# Trainer presets


def intended_trainable(name: str, preset: str) -> bool:
    if preset == "lora":
        return "lora_" in name or ".modules_to_save." in name
    if preset == "stage1":
        return "multi_modal_projector" in name
    return "multi_modal_projector" in name or "language_model" in name or name.startswith("lm_head")


def count_calls(modules, record_grad_mode: list[bool] | None = None) -> list[int]:
    counts = [0] * len(modules)

    def hook(index):
        def fn(module, args, output):
            counts[index] += 1
            if record_grad_mode is not None:
                record_grad_mode.append(torch.is_grad_enabled())

        return fn

    for index, module in enumerate(modules):
        module.register_forward_hook(hook(index))
    return counts


@pytest.mark.parametrize("preset", PRESETS)
def test_trainer_preset_trains_only_intended_parameters(preset, tmp_path):
    torch.manual_seed(0)
    records = [qa("<image>\nColour?", "Deep red.", "a.png"), qa("<image>\nColour?", "Blue.", "b.png")]
    dataset = LlavaDataset(
        write_llava_dataset(tmp_path, records, {"a.png": (16, 16, 200), "b.png": (16, 16, 0)}),
        make_processor(padding_side="right"),
        tmp_path / "images",
    )
    # A livelier random LLM than the 0.02 default, so that the projector alone (stage1) can move the loss.
    config = tiny_config(text={"initializer_range": 0.2})
    model = apply_preset(TokenPackerForConditionalGeneration(config), preset, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    base = model.get_base_model() if preset == "lora" else model
    tower_layers, llm_layer = base.model.vision_tower.encoder.layers, base.model.language_model.layers[0]
    tower_grad_modes: list[bool] = []
    # Hooks on sub-modules: checkpointing re-runs a layer's `forward` (not its `__call__`), so only hooks inside it
    # see the recomputation.
    tower_calls = count_calls([layer.self_attn for layer in tower_layers], tower_grad_modes)
    llm_calls = count_calls([llm_layer.self_attn])
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    steps = 20
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        activation_checkpointing=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=TokenPackerCollator(dataset.processor)
    )
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps
    # The projector alone can only steer the answers through the image tokens; the LLM can memorise them.
    margin = {"stage1": 0.1, "stage2": 1.0, "lora": 0.5}[preset]
    assert losses[-1] < losses[0] - margin, losses
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == intended_trainable(name, preset), f"{name}: changed={changed} under {preset}"
    assert all(param.grad is None for param in base.model.vision_tower.parameters())
    # The tower ran once per step, without autograd, and only as deep as the projector reads (layers 1-3 of 4);
    # the checkpointed LLM layer ran twice per step (forward + recomputation), so checkpointing was on.
    assert tower_calls == [steps, steps, steps, 0]
    assert not any(tower_grad_modes)
    assert llm_calls == [2 * steps]


def test_unfreeze_vision_tower_trains_only_layers_that_run():
    model = apply_preset(TokenPackerForConditionalGeneration(tiny_config()), "stage1", unfreeze_vision_tower=True)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    tower = {name for name in trainable if ".vision_tower." in name}
    assert any(".encoder.layers.2." in name for name in tower) and any("embeddings" in name for name in tower)
    assert not any(".encoder.layers.3." in name or "post_layernorm" in name for name in tower)
    lora = apply_preset(
        TokenPackerForConditionalGeneration(tiny_config()), "lora", unfreeze_vision_tower=True, lora_r=2
    )
    lora_tower = {n for n, p in lora.named_parameters() if p.requires_grad and "vision_tower" in n}
    assert lora_tower and all(".modules_to_save.default." in name for name in lora_tower)
    assert not any(".encoder.layers.3." in name for name in lora_tower)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"preset must be one of \('stage1', 'stage2', 'lora'\), got 'stage3'"):
        apply_preset(TokenPackerForConditionalGeneration(tiny_config()), "stage3")


# ----------------------------------------------------------------------------------------------------------------
# Multi-process


def test_torchrun_two_processes_train_and_save_a_loadable_checkpoint(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = small_dataset(tmp_path)
    output = tmp_path / "out"
    command = torchrun() + [
        str(REPO_ROOT / "examples" / "train.py"),
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data),
        "--image_folder", str(tmp_path / "images"),
        "--output_dir", str(output),
        "--preset", "stage2",
        "--max_steps", "3",
        "--per_device_train_batch_size", "2",
        "--use_cpu",
        "--report_to", "none",
        "--save_steps", "3",
        "--logging_steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # Two ranks × 2 samples per step over 5 samples: 3 steps are 1.5 epochs only if both ranks trained.
    assert state["epoch"] == pytest.approx(1.5)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(output / "checkpoint-3"))
    trained = TokenPackerForConditionalGeneration.from_pretrained(output / "checkpoint-3")
    original = TokenPackerForConditionalGeneration.from_pretrained(model_dir)
    assert not torch.equal(trained.lm_head.weight, original.lm_head.weight)
    torch.testing.assert_close(
        trained.model.vision_tower.state_dict(), original.model.vision_tower.state_dict(), rtol=0, atol=0
    )
    batch = TokenPackerCollator(make_processor(padding_side="right"))(
        [LlavaDataset(data, make_processor(padding_side="right"), tmp_path / "images")[0]]
    )
    with torch.no_grad():
        loss = trained(**batch).loss
    assert torch.isfinite(loss)


def test_distributed_configs_are_complete_and_name_real_layers():
    """What the configs promise; tests/test_distributed.py runs FSDP2 (fsdp_cpu.yaml) and ZeRO-3 (zero3.json, when
    deepspeed is installed) for real on two CPU processes, but the GPU-only settings (bf16, 8 processes) can't run
    here."""
    import yaml

    configs = REPO_ROOT / "examples" / "configs"
    for name, stage in (("zero2.json", 2), ("zero3.json", 3)):
        config = json.loads((configs / name).read_text())
        assert config["zero_optimization"]["stage"] == stage
        # "auto" lets the Trainer fill these from its own arguments, so one file serves every run.
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        ):
            assert config[key] == "auto", (name, key)
        assert config["bf16"]["enabled"] == "auto"
    assert json.loads((configs / "zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]

    fsdp = yaml.safe_load((configs / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_config"]["fsdp_activation_checkpointing"] is False  # the Trainer's checkpointing is used
    wrapped = set(fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","))
    classes = {type(module).__name__ for module in TokenPackerForConditionalGeneration(tiny_config()).modules()}
    assert wrapped <= classes, wrapped - classes
