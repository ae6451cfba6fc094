"""Composing a new TokenPacker model and its processor from a pretrained vision tower and a pretrained causal LM
(`from_vision_text_pretrained`): the parts' weights bit for bit, a fresh projector, the tokenizer with `<image>`,
the tower's normalisation, validation before loading, and the composed folder through remote code."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5ForConditionalGeneration,
)

from tokenpacker_hf import TokenPackerForConditionalGeneration, TokenPackerProcessor, cli
from tokenpacker_hf.tiny import byte_level_backend

from builders import REPO_ROOT, small_dataset
from subprocess_utils import run_without_package
from tiny import text_config, vision_config

TOWER = dict(region_feature_layers=[1, 2, 3], projector_hidden_size=32, projector_num_heads=2)
LLM_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # no <image>: composing must add it


def llm_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_backend(LLM_SPECIAL_TOKENS),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if pad else None,
    )


def save_llm(folder, model_type: str, tie: bool, pad: bool = True):
    """A tiny causal LM of `model_type` with a tokenizer that lacks `<image>`; returns the model."""
    config = AutoConfig.for_model(
        **{**text_config(model_type=model_type, vocab_size=4 + 256), "tie_word_embeddings": tie}
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    llm_tokenizer(pad).save_pretrained(folder)
    return model


def save_clip(folder, whole: bool):
    """A tiny CLIP tower, saved as a whole `CLIPModel` (both halves) or as a `CLIPVisionModel`."""
    torch.manual_seed(2)
    vision = {key: value for key, value in vision_config().items() if key != "model_type"}
    if whole:
        model = CLIPModel(
            CLIPConfig(
                vision_config=vision,
                text_config=dict(
                    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
                ),
            )
        )
    else:
        model = CLIPVisionModel(AutoConfig.for_model("clip_vision_model", **vision))
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size=16, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]
    ).save_pretrained(folder)
    return model


def save_siglip(folder, image_size: int = 16):
    torch.manual_seed(3)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=4,
    )
    model = SiglipVisionModel(config)
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return model


def vision_state(model) -> dict[str, torch.Tensor]:
    """The vision half's weights under the names `CLIPVisionModel` / `SiglipVisionModel` give them (a whole
    `CLIPModel` keeps them under `vision_model.`, next to its text half)."""
    if not hasattr(model, "vision_model"):
        return model.state_dict()
    return model.vision_model.state_dict()


def compose(vision, text, **kwargs):
    processor = TokenPackerProcessor.from_vision_text_pretrained(vision, text, **{**TOWER, **kwargs})
    model = TokenPackerForConditionalGeneration.from_vision_text_pretrained(
        vision, text, processor=processor, **{**TOWER, **kwargs}
    )
    return model, processor


def assert_equal_tensors(mine: dict, theirs: dict):
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    sources = {
        "clip": save_clip(root / "clip", whole=True),
        "clip_vision": save_clip(root / "clip_vision", whole=False),
        "siglip": save_siglip(root / "siglip"),
        "llama": save_llm(root / "llama", "llama", tie=True),
        "qwen2": save_llm(root / "qwen2", "qwen2", tie=False, pad=False),
        "mistral": save_llm(root / "mistral", "mistral", tie=False),
    }
    return root, sources


# --- weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["clip", "clip_vision", "siglip"])
@pytest.mark.parametrize("llm", ["llama", "qwen2", "mistral"])
def test_every_part_keeps_its_weights_bit_for_bit(parts, tower, llm):
    root, sources = parts
    model, processor = compose(root / tower, root / llm)
    assert_equal_tensors(model.model.vision_tower.state_dict(), vision_state(sources[tower]))
    source = sources[llm].state_dict()
    ours = model.model.language_model.state_dict()
    vocab = source["model.embed_tokens.weight"].shape[0]
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1 == len(processor.tokenizer)
    for name, tensor in source.items():
        if name == "lm_head.weight":
            assert torch.equal(model.lm_head.weight[:vocab], tensor)
        elif name == "model.embed_tokens.weight":
            assert torch.equal(ours["embed_tokens.weight"][:vocab], tensor)
        else:
            assert torch.equal(ours[name.removeprefix("model.")], tensor), name
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (llm == "llama") == model.config.tie_word_embeddings


def test_new_embedding_row_is_initialised_as_resize_token_embeddings_does(parts):
    root, sources = parts
    model, _ = compose(root / "clip", root / "qwen2")
    old = sources["qwen2"].get_input_embeddings().weight
    new_row = model.get_input_embeddings().weight[-1]
    # transformers' mean resizing draws the new rows around the old rows' mean, never zeros or N(0, 0.02).
    assert (new_row - old.mean(0)).abs().mean() < 3 * old.std(0).mean()
    assert not torch.equal(new_row, torch.zeros_like(new_row))


def test_projector_is_fresh_and_initialised_like_the_original(parts):
    root, _ = parts
    model, _ = compose(root / "clip", root / "llama")
    projector = model.model.multi_modal_projector
    assert not any(p.is_meta for p in model.parameters())
    for name, param in projector.named_parameters():
        if name.endswith("bias"):
            assert torch.all(param == 0), name
        elif "norm" in name:
            assert torch.all(param == 1), name
        elif any(part in name for part in ("q_proj", "k_proj", "v_proj")):
            fan_in, fan_out = param.shape[1], param.shape[0]
            bound = (6.0 / (fan_in + 3 * fan_out)) ** 0.5  # nn.MultiheadAttention's stacked Xavier
            assert param.abs().max() <= bound and param.std() > 0.5 * bound / 3**0.5, name
        else:
            assert param.std().item() == pytest.approx(0.02, rel=0.25), name


def test_a_text_only_prompt_gives_the_source_llms_logits(parts):
    root, sources = parts
    model, processor = compose(root / "clip", root / "mistral")
    ids = processor.tokenizer("the digits", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = sources["mistral"].eval()(input_ids=ids).logits
    vocab = theirs.shape[-1]
    torch.testing.assert_close(ours[..., :vocab], theirs, rtol=0, atol=0)


# --- the processor ---------------------------------------------------------------------------------------


def test_processor_takes_the_llms_tokenizer_with_image_and_pad_tokens_and_the_towers_normalisation(parts):
    root, _ = parts
    processor = TokenPackerProcessor.from_vision_text_pretrained(root / "clip", root / "qwen2", **TOWER)
    tokenizer = processor.tokenizer
    assert processor.image_token_id == len(tokenizer) - 1 == 260
    assert tokenizer.encode("a<image>b", add_special_tokens=False).count(processor.image_token_id) == 1
    assert tokenizer.pad_token == "<unk>"  # the Qwen2 source has no pad token
    assert processor.image_processor.image_mean == pytest.approx([0.1, 0.2, 0.3])
    assert processor.image_processor.image_std == pytest.approx([0.4, 0.5, 0.6])
    assert processor.image_processor.tile_size == 16 and processor.num_image_tokens == 4
    assert "ASSISTANT:" in processor.chat_template
    custom = TokenPackerProcessor.from_vision_text_pretrained(
        root / "clip", root / "qwen2", chat_template="{{ 1 }}", image_mode="slice", **TOWER
    )
    assert custom.chat_template == "{{ 1 }}" and custom.image_processor.image_mode == "slice"


def test_siglip_tower_uses_every_token_and_its_own_normalisation(parts):
    root, _ = parts
    model, processor = compose(root / "siglip", root / "llama")
    assert model.config.vision_feature_select_strategy == "full"
    assert processor.image_processor.image_mean == pytest.approx([0.5, 0.5, 0.5])


# --- end to end ------------------------------------------------------------------------------------------

CHILD = """
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("composed", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("composed", trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("image.png")], text=prompt, return_tensors="pt")
torch.save(model.generate(**inputs, max_new_tokens=5, do_sample=False), "generated.pt")
"""


def test_composed_folder_reloads_through_remote_code_and_generates_the_same(parts, tmp_path):
    root, _ = parts
    model, processor = compose(root / "clip", root / "qwen2")
    model.save_pretrained(tmp_path / "composed")
    processor.save_pretrained(tmp_path / "composed")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    child = run_without_package(CHILD, cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(torch.load(tmp_path / "generated.pt"), expected)


# --- bad input -------------------------------------------------------------------------------------------


def test_scale_factor_must_divide_the_towers_grid_before_any_weight_is_read(tmp_path):
    save_siglip(tmp_path / "siglip27", image_size=108)  # 27×27 patches, as SigLIP-384/14
    save_llm(tmp_path / "llm", "llama", tie=True)
    with pytest.raises(
        Exception,
        match=r"scale_factor must divide the patch grid side 27.*allowed values: "
        r"\[1, 3, 9, 27\], got 2",
    ):
        compose(tmp_path / "siglip27", tmp_path / "llm", scale_factor=2)
    model, processor = compose(tmp_path / "siglip27", tmp_path / "llm", scale_factor=3)
    assert model.config.num_image_tokens == processor.num_image_tokens == 81


def test_region_layers_deeper_than_the_tower_are_named(parts):
    root, _ = parts
    with pytest.raises(Exception, match=r"region_feature_layers must be .* in \[-5, 4\], got \[1, 2, 9\]"):
        compose(root / "clip", root / "llama", **{**TOWER, "region_feature_layers": [1, 2, 9]})


def test_a_tower_that_is_not_a_vit_is_named(parts):
    root, _ = parts
    with pytest.raises(ValueError, match="expected a CLIP/SigLIP-style ViT vision tower, got model_type 'llama'"):
        compose(root / "llama", root / "llama")


def test_an_llm_that_is_not_a_causal_lm_is_named(parts, tmp_path):
    root, _ = parts
    T5ForConditionalGeneration(
        T5Config(vocab_size=260, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    ).save_pretrained(tmp_path / "t5")
    llm_tokenizer().save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="expected a causal language model .* got model_type 't5'"):
        compose(root / "clip", tmp_path / "t5")


def test_a_processor_built_with_other_arguments_is_refused(parts):
    root, _ = parts
    processor = TokenPackerProcessor.from_vision_text_pretrained(root / "clip", root / "llama", **TOWER)
    with pytest.raises(ValueError, match="expands <image> to 4 tokens but this config packs 16"):
        TokenPackerForConditionalGeneration.from_vision_text_pretrained(
            root / "clip", root / "llama", processor=processor, **{**TOWER, "scale_factor": 1}
        )


def test_an_image_token_the_tokenizer_splits_is_named(tmp_path):
    """`<image>` in the BPE vocabulary but not an added token: the byte-level pre-tokenizer cuts it into
    `<`, `image`, `>` before the vocabulary is consulted."""
    vocab = {token: i for i, token in enumerate(LLM_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    vocab["<image>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(LLM_SPECIAL_TOKENS)
    folder = tmp_path / "llm"
    save_llm(folder, "llama", tie=True)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    save_clip(tmp_path / "clip", whole=False)
    with pytest.raises(ValueError, match="expected '<image>' to be one token of the tokenizer, but it encodes as"):
        TokenPackerProcessor.from_vision_text_pretrained(tmp_path / "clip", folder, **TOWER)


# --- the paper's recipe from parts: stage 1, then stage 2 ------------------------------------------------


def run_train(tmp_path, *args: str) -> None:
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "train.py"),
        "--data_path",
        str(small_dataset(tmp_path)),
        "--image_folder",
        str(tmp_path / "images"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--learning_rate",
        "1e-2",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_train_py_stage1_from_parts_trains_only_the_projector_and_stage2_continues_from_it(parts, tmp_path):
    root, sources = parts
    run_train(
        tmp_path,
        "--vision_tower",
        str(root / "clip"),
        "--language_model",
        str(root / "llama"),
        "--region_feature_layers",
        "1",
        "2",
        "3",
        "--preset",
        "stage1",
        "--output_dir",
        str(tmp_path / "s1"),
    )
    stage1 = TokenPackerForConditionalGeneration.from_pretrained(tmp_path / "s1")
    after = stage1.state_dict()
    # Everything but the projector is still its source, byte for byte (the new <image> row aside, which
    # resize_token_embeddings draws at random).
    assert_equal_tensors(stage1.model.vision_tower.state_dict(), vision_state(sources["clip"]))
    llm = sources["llama"].state_dict()
    vocab = llm["model.embed_tokens.weight"].shape[0]
    for name, tensor in llm.items():
        ours = after["lm_head.weight" if name == "lm_head.weight" else f"model.language_model.{name[6:]}"]
        assert torch.equal(ours[:vocab] if "embed" in name or "lm_head" in name else ours, tensor), name

    run_train(
        tmp_path,
        "--model_name_or_path",
        str(tmp_path / "s1"),
        "--preset",
        "stage2",
        "--output_dir",
        str(tmp_path / "s2"),
    )
    stage2 = TokenPackerForConditionalGeneration.from_pretrained(tmp_path / "s2").state_dict()
    changed = {name for name in after if not torch.equal(after[name], stage2[name])}
    assert any(".language_model." in name for name in changed) and any(
        ".multi_modal_projector." in name for name in changed
    )
    assert not any(".vision_tower." in name for name in changed)


def test_train_py_needs_a_folder_or_both_parts(parts, tmp_path):
    root, _ = parts
    with pytest.raises(AssertionError, match="give either --model_name_or_path, or both --vision_tower and"):
        run_train(tmp_path, "--vision_tower", str(root / "clip"), "--output_dir", str(tmp_path / "out"))


# --- tokenpacker-hf init ---------------------------------------------------------------------------------


def run_init(*argv: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["init", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_init_writes_a_ready_to_train_folder_that_loads_through_remote_code(parts, tmp_path, capsys):
    root, sources = parts
    out = tmp_path / "composed"
    code, stdout, stderr = run_init(
        "--vision-tower",
        str(root / "clip"),
        "--language-model",
        str(root / "qwen2"),
        "--region-feature-layers",
        "1",
        "2",
        "3",
        "--image-mode",
        "slice",
        str(out),
        capsys=capsys,
    )
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert (
        config["auto_map"]["AutoModelForImageTextToText"] == "modeling_tokenpacker.TokenPackerForConditionalGeneration"
    )
    assert {"modeling_tokenpacker.py", "processing_tokenpacker.py", "model.safetensors", "README.md"} <= {
        path.name for path in out.iterdir()
    }
    card = (out / "README.md").read_text()
    assert "freshly initialised and untrained" in card
    assert f'from_pretrained("{out}", trust_remote_code=True' in card and "converting" not in card
    model = TokenPackerForConditionalGeneration.from_pretrained(out)
    assert_equal_tensors(model.model.vision_tower.state_dict(), vision_state(sources["clip"]))
    assert TokenPackerProcessor.from_pretrained(out).image_processor.image_mode == "slice"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    child = run_without_package(CHILD, cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]


@pytest.mark.parametrize("case", ["output exists", "not a vit", "bad scale factor"])
def test_init_bad_input_is_one_line_and_leaves_nothing(parts, tmp_path, capsys, case):
    root, _ = parts
    out = tmp_path / "new"
    vision, layers, scale = str(root / "clip"), ["1", "2", "3"], "2"
    if case == "output exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "not a vit":
        vision = str(root / "llama")
    else:
        scale = "3"  # the tiny tower has a 4×4 patch grid
    code, _, stderr = run_init(
        "--vision-tower",
        vision,
        "--language-model",
        str(root / "llama"),
        "--region-feature-layers",
        *layers,
        "--scale-factor",
        scale,
        str(out),
        capsys=capsys,
    )
    expected = {
        "output exists": "already exists and is not an empty folder",
        "not a vit": "expected a CLIP/SigLIP-style ViT vision tower",
        "bad scale factor": "scale_factor must divide the patch grid side 4",
    }[case]
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == (["new"] if case == "output exists" else [])
    if case == "output exists":
        assert [path.name for path in out.iterdir()] == ["keep.txt"]
