"""Conversion of original (LLaVA-format) TokenPacker checkpoints, proven against the independent oracle.

Each test writes a synthetic checkpoint in the authors' exact layout (`LlavaLlamaForCausalLM` key names
and shapes, `model.mm_projector.*` with the stacked `clip_attn.in_proj_*`, `rotary_emb.inv_freq` buffers, an
original `config.json`, `.bin` or safetensors shards with their index, a tokenizer without `<image>`) from three
modules the oracle runs as the original code does: a CLIP tower, `OriginalTokenPacker` and a Llama LM. The
converted folder is loaded with `from_pretrained` and must give the oracle's image features and logits.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, CLIPVisionConfig, CLIPVisionModel

from tokenpacker_hf import TokenPackerForConditionalGeneration
from tokenpacker_hf.convert_tokenpacker_original import (
    ConversionError,
    build_config,
    convert_original_checkpoint,
    convert_original_state_dict,
    expected_shapes,
    projector_settings,
    resolve_image_mode,
    resolve_max_slices,
    resolve_scale_factor,
)

from original_checkpoint import TINY_LM, TINY_TOWER, Original
from reference.original_tokenization import (
    SlowLlamaTokenizer,
    expand_image_placeholders,
    tokenizer_image_token,
)
from reference.original_tokenpacker import IMAGE_TOKEN_INDEX
from subprocess_utils import run_without_package


def ask(processor, image: Image.Image) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=prompt, return_tensors="pt")


def expected_layout(image_id: int, tokens: int, grid: tuple[int, int], comma: int, newline: int, mode: str) -> list:
    """The original's image token layout (README, "High resolution"), written out: T image ids per tile; in slice
    mode `,` between the tiles of a row, `\\n` after each row, then the thumbnail and `\\n` when there is more than
    one tile."""
    tile = [image_id] * tokens
    if mode != "slice":
        return tile
    rows, cols = grid
    layout = []
    for _ in range(rows):
        for col in range(cols):
            layout += tile + [comma if col < cols - 1 else newline]
    return layout + (tile + [newline] if rows * cols > 1 else [])


def check_against_oracle(original: Original, dst: Path, image: Image.Image, mode: str = "pad") -> dict:
    """Loads the converted folder and checks image features and logits against the original forward."""
    model = TokenPackerForConditionalGeneration.from_pretrained(dst).eval()
    processor = AutoProcessor.from_pretrained(dst)
    assert model.config.scale_factor == original.scale_factor and processor.image_mode == mode
    inputs = ask(processor, image)
    ids = inputs["input_ids"][0].tolist()
    grid = tuple(inputs["image_grids"][0].tolist())

    image_id = model.config.image_token_id
    assert image_id == len(original.tokenizer) and processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    comma, newline = (original.tokenizer.convert_tokens_to_ids(t) for t in (",", "\n"))
    assert newline == original.tokenizer.unk_token_id  # the released HD models' "newline" is <unk>
    layout = expected_layout(image_id, model.config.num_image_tokens, grid, comma, newline, mode)
    start = ids.index(image_id)
    assert ids[start : start + len(layout)] == layout
    spliced = ids[:start] + [IMAGE_TOKEN_INDEX] + ids[start + len(layout) :]

    with torch.no_grad():
        outputs = model(**inputs)
        expected_features = original.image_features(inputs["pixel_values"])
        expected_logits = original.logits(spliced, inputs["pixel_values"], mode=mode, grid=grid)
    vocab = len(original.tokenizer)
    logits = outputs.logits
    assert logits.shape == (1, len(ids), vocab + 1)
    torch.testing.assert_close(outputs.image_hidden_states, expected_features.flatten(0, 1), rtol=0, atol=1e-4)
    torch.testing.assert_close(logits[..., :vocab], expected_logits, rtol=0, atol=1e-4)
    assert expected_logits.abs().max() > 1  # non-trivial outputs: a 1e-4 agreement means something
    return {"model": model, "inputs": inputs, "logits": logits, "grid": grid}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


# ------------------------------------------------------------------------------------------------------------
# Equality with the original forward


@pytest.mark.parametrize("scale_factor, fmt", [(2, "bin"), (3, "safetensors"), (4, "bin")])
def test_pad_mode_matches_original_for_each_scale_factor(tmp_path, scale_factor, fmt):
    original = Original(TINY_TOWER, TINY_LM, scale_factor, seed=scale_factor)
    src = original.write(tmp_path / "TokenPacker-tiny", fmt=fmt)
    dst = convert_original_checkpoint(src, tmp_path / "converted")
    assert dst == tmp_path / "converted"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    check_against_oracle(original, dst, photo(40, 30, seed=scale_factor))


def test_slice_mode_matches_original_with_tower_from_vision_tower_folder(tmp_path):
    """TokenPacker-HD: slice layout with separators; scale factor and patch_num only in the repo name (the
    training code never writes patch_num); CLIP taken from `vision_tower` because the checkpoint has none."""
    # Heads read from the folder's config, not inferred; 12 px tiles (a 6x6 grid) keep the 7 tiles cheap.
    tower = {**TINY_TOWER, "num_attention_heads": 4, "image_size": 12}
    original = Original(tower, TINY_LM, scale_factor=3, seed=5)
    original.tower.save_pretrained(tmp_path / "clip")
    src = original.write(
        tmp_path / "TokenPacker-HD-tiny-16patch-64token", with_tower=False, image_aspect_ratio="slice",
        scale_factor=None,
    )  # fmt: skip
    dst = convert_original_checkpoint(src, tmp_path / "converted", vision_tower=str(tmp_path / "clip"))
    result = check_against_oracle(original, dst, photo(36, 24, seed=1), mode="slice")
    assert result["grid"] == (2, 3)  # tiles, thumbnail and both separators are exercised
    assert AutoProcessor.from_pretrained(dst).image_processor.max_slices == 16


def test_clip_l_width_projector_matches_original(tmp_path):
    """The projector at real CLIP-L widths (1024 per level, 4 levels, 8 heads, in_proj [3072, 1024]) on a
    24-layer 1024-wide tower whose config is inferred from the checkpoint's weights (4x4 patches, to stay fast);
    a small LLM."""
    tower = dict(TINY_TOWER, hidden_size=1024, num_attention_heads=16, intermediate_size=32, image_size=8)
    original = Original(tower, dict(TINY_LM, hidden_size=64), scale_factor=2, seed=11)
    assert original.projector.state_dict()["clip_attn.in_proj_weight"].shape == (3072, 1024)
    assert original.projector.state_dict()["k_proj_1.0.weight"].shape == (1024, 4096)
    src = original.write(tmp_path / "TokenPacker-clip-l-width", fmt="safetensors", shards=2)
    dst = convert_original_checkpoint(src, tmp_path / "converted")
    result = check_against_oracle(original, dst, photo(30, 24, seed=2))
    config = result["model"].config
    assert (config.projector_hidden_size, config.projector_num_heads, config.vision_config.num_attention_heads) == (
        1024, 8, 16)  # fmt: skip


def test_converted_folder_loads_without_the_package_and_generates(tmp_path):
    original = Original(TINY_TOWER, TINY_LM, scale_factor=2, seed=3)
    src = original.write(tmp_path / "TokenPacker-tiny-144token", fmt="bin", shards=2, scale_factor=None)
    dst = convert_original_checkpoint(src, tmp_path / "converted", dtype="float32")
    expected = check_against_oracle(original, dst, photo(40, 30))
    torch.save({"inputs": dict(expected["inputs"]), "logits": expected["logits"]}, tmp_path / "expected.pt")

    child = run_without_package(
        """
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
expected = torch.load("expected.pt", weights_only=False)
model = AutoModelForImageTextToText.from_pretrained("converted", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("converted", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = expected["inputs"]
with torch.no_grad():
    torch.testing.assert_close(model(**inputs).logits, expected["logits"], rtol=0, atol=1e-5)
output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
assert output.shape[1] == inputs["input_ids"].shape[1] + 5
assert model.config.image_token_id not in output[0, inputs["input_ids"].shape[1]:].tolist()
print("OK", processor.image_processor.image_mode)
""",
        cwd=tmp_path,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split()[-2:] == ["OK", "pad"]
    files = {p.name for p in dst.iterdir()}
    assert {"configuration_tokenpacker.py", "modeling_tokenpacker.py", "projector_tokenpacker.py",
            "processing_tokenpacker.py", "image_processing_tokenpacker.py", "generation_config.json", "README.md",
            "chat_template.jinja", "tokenizer.json"} <= files  # fmt: skip
    assert "TokenPacker" in (dst / "README.md").read_text() and "1e-4" in (dst / "README.md").read_text()


def test_dtype_is_applied_to_every_floating_weight(tmp_path):
    original = Original(TINY_TOWER, TINY_LM, scale_factor=2, seed=4)
    src = original.write(tmp_path / "src", fmt="safetensors", shards=1)
    dst = convert_original_checkpoint(src, tmp_path / "converted", dtype="bfloat16")
    with safe_open(dst / "model.safetensors", framework="pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------------------------
# What is resolved from the original config


def test_scale_factor_from_config_old_name_or_repo_name():
    assert resolve_scale_factor({"scale_factor": 3}, "x") == 3
    assert resolve_scale_factor({"down_rate": 4}, "x") == 4
    for name, expected in [("sunshine-lwt/TokenPacker-7b-144token", 2), ("TokenPacker-HD-13b-16patch-64token", 3),
                           ("TokenPacker-HD-13b-16patch-36token", 4)]:  # fmt: skip
        assert resolve_scale_factor({}, name) == expected
    assert resolve_scale_factor({}, "my-model", override=3) == 3
    with pytest.raises(ConversionError, match="cannot tell the scale factor.*pass scale_factor"):
        resolve_scale_factor({}, "my-model")
    with pytest.raises(ConversionError, match="scale_factor=3 was requested but the checkpoint's config.json"):
        resolve_scale_factor({"scale_factor": 2}, "x", override=3)


def test_max_slices_and_image_mode_resolution():
    assert resolve_max_slices({"patch_num": 16}, "x") == 16
    assert resolve_max_slices({}, "TokenPacker-HD-13b-16patch-144token") == 16
    assert resolve_max_slices({}, "TokenPacker-HD-7b-9patch-144token") == 9
    assert resolve_max_slices({}, "TokenPacker-7b-144token") == 9
    assert resolve_max_slices({}, "x", override=25) == 25
    assert [resolve_image_mode({"image_aspect_ratio": m}) for m in ("pad", "slice")] == ["pad", "slice"]
    assert resolve_image_mode({}) == "square"
    with pytest.raises(ConversionError, match="image_aspect_ratio must be one of .* found 'anyres'"):
        resolve_image_mode({"image_aspect_ratio": "anyres"})


def test_state_dict_mapping_matches_model_keys():
    """`convert_original_state_dict` yields exactly the keys and shapes `TokenPackerForConditionalGeneration`
    expects; `inv_freq` is dropped and the in-projection split q, k, v in that order."""
    original = Original(TINY_TOWER, TINY_LM, scale_factor=2)
    state = original.state_dict()
    converted = convert_original_state_dict(state)
    assert not any("inv_freq" in key for key in converted)
    in_proj = state["model.mm_projector.clip_attn.in_proj_weight"]
    for third, name in zip(in_proj.chunk(3), ("q_proj", "k_proj", "v_proj"), strict=True):
        assert torch.equal(converted[f"model.multi_modal_projector.region_attn.{name}.weight"], third)
    config = build_config(
        original.config(), dict(model_type="clip_vision_model", **TINY_TOWER),
        projector_settings(state, TINY_TOWER["hidden_size"]), 2, len(original.tokenizer), 0, torch.float32,
    )  # fmt: skip
    expected = expected_shapes(config)
    assert {key: t.shape for key, t in converted.items()} == dict(expected)


# ------------------------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing left behind


def assert_refused(src: Path, dst: Path, error: type, match: str, **kwargs) -> None:
    with pytest.raises(error, match=match):
        convert_original_checkpoint(src, dst, **kwargs)
    assert not dst.exists()
    assert [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")] == []


def test_plain_llava_mlp_projector_is_refused(tmp_path, tiny_original):
    state = {k: v for k, v in tiny_original.state_dict().items() if not k.startswith("model.mm_projector.")}
    state.update(
        {
            "model.mm_projector.0.weight": torch.zeros(48, 64),
            "model.mm_projector.0.bias": torch.zeros(48),
            "model.mm_projector.2.weight": torch.zeros(48, 48),
            "model.mm_projector.2.bias": torch.zeros(48),
        }
    )
    src = tiny_original.write(tmp_path / "llava-v1.5", state=state, mm_projector_type="mlp2x_gelu")
    assert_refused(src, tmp_path / "out", ConversionError, r"not a TokenPacker checkpoint.*0\.weight.*mlp2x_gelu")


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda s: s.pop("model.layers.1.mlp.down_proj.weight"),
            r"missing keys \(1\): model\.language_model\.layers\.1\.mlp\.down_proj\.weight",
        ),
        (
            lambda s: s.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(2, 2)}),
            r"unexpected keys \(1\): model\.language_model\.layers\.7",
        ),
        (
            lambda s: s.update({"model.mm_projector.mlp.2.weight": torch.zeros(48, 40)}),
            r"wrong shapes \(1\): model\.multi_modal_projector\.output_proj\.fc2\.weight: "
            r"expected \[48, 48\], found \[48, 40\]",
        ),
        (
            lambda s: s.update({"extra.head.weight": torch.zeros(2)}),
            r"unexpected checkpoint keys: extra\.head\.weight",
        ),
        (
            lambda s: s.update({"model.mm_projector.resampler.weight": torch.zeros(2)}),
            r"unexpected TokenPacker projector keys: resampler\.weight",
        ),
    ],
)
def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path, tiny_original, edit, match):
    state = tiny_original.state_dict()
    edit(state)
    src = tiny_original.write(tmp_path / "src", state=state, fmt="safetensors")
    assert_refused(src, tmp_path / "out", ConversionError, match)


def test_vision_tower_of_the_wrong_width_is_refused(tmp_path, tiny_original):
    CLIPVisionModel(CLIPVisionConfig(**dict(TINY_TOWER, hidden_size=32))).save_pretrained(tmp_path / "clip-b")
    src = tiny_original.write(tmp_path / "src", with_tower=False)
    assert_refused(src, tmp_path / "out", ConversionError, r"vision tower's width 32 does not match the projector.*"
                   r"q_proj_1\.weight is \[64, 64\]", vision_tower=str(tmp_path / "clip-b"))  # fmt: skip


def test_existing_destination_missing_source_and_bad_options(tmp_path, tiny_original):
    src = tiny_original.write(tmp_path / "src")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder"):
        convert_original_checkpoint(src, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert_refused(tmp_path / "nowhere", tmp_path / "out", FileNotFoundError, "neither a folder nor a Hugging Face")
    assert_refused(src, tmp_path / "out", ConversionError, "dtype must be one of", dtype="float64")
    assert_refused(src, tmp_path / "out", ConversionError, "scale_factor=4 was requested", scale_factor=4)
    (src / "config.json").unlink()
    assert_refused(src, tmp_path / "out", FileNotFoundError, "no config.json")


def test_failure_while_writing_leaves_no_destination(tmp_path, tiny_original, monkeypatch):
    """A failure after the weights are written (here an injected disk error in the last step) removes the
    temporary folder; an empty destination folder is accepted and stays as it was."""
    from tokenpacker_hf import convert_tokenpacker_original as module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "write_model_card", disk_full)
    src = tiny_original.write(tmp_path / "src")
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="No space left"):
        convert_original_checkpoint(src, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ------------------------------------------------------------------------------------------------------------
# Hub source and destination


def test_hub_repo_is_downloaded_converted_and_pushed(tmp_path, tiny_original, monkeypatch):
    """SRC as a repo id on a local server speaking the Hub API (the scale factor only in its name), the result
    pushed to another repo with its model card."""
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import HfApi

    from hub_server import LocalHub, point_clients_at

    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=2, scale_factor=None)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with LocalHub() as hub, point_clients_at(hub):
        HfApi().create_repo("sunshine-lwt/TokenPacker-tiny-144token")
        HfApi().upload_folder(folder_path=str(src), repo_id="sunshine-lwt/TokenPacker-tiny-144token")
        dst = convert_original_checkpoint("sunshine-lwt/TokenPacker-tiny-144token", tmp_path / "converted",
                                          push_to_hub="user/tokenpacker-tiny")  # fmt: skip
        pushed = hub.files("user/tokenpacker-tiny")
    assert set(pushed) == {p.name for p in dst.iterdir()}
    assert pushed["model-00001-of-00002.safetensors"] == (dst / "model-00001-of-00002.safetensors").read_bytes()
    card = pushed["README.md"].decode()
    assert "base_model:\n- sunshine-lwt/TokenPacker-tiny-144token\n" in card
    assert (
        "\n# tokenpacker-tiny\n" in card and 'from_pretrained("user/tokenpacker-tiny", trust_remote_code=True' in card
    )
    assert TokenPackerForConditionalGeneration.from_pretrained(dst).config.scale_factor == 2


# ------------------------------------------------------------------------------------------------------------
# Command line


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenpacker_hf.cli", "convert", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_cli_converts_and_refuses_bad_input_with_one_line(tmp_path, tiny_original):
    src = tiny_original.write(tmp_path / "src", fmt="safetensors", shards=1)
    done = run_cli(str(src), str(tmp_path / "out"), "--dtype", "float32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file() and "Converting shards" in done.stderr

    llava = tiny_original.write(tmp_path / "llava", state={"model.mm_projector.0.weight": torch.zeros(2, 2)})
    failed = run_cli(str(llava), str(tmp_path / "bad"), cwd=tmp_path)
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not a TokenPacker checkpoint"), failed.stderr[-3000:]
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------------------
# The released repos' tokenizer: a SentencePiece tokenizer.model and no tokenizer.json

# tokenizer_config.json and special_tokens_map.json as the released TokenPacker(-HD) repos have them (the Vicuna
# v1.5 settings, saved by transformers 4.31): legacy false, no pad token in the config, pad <unk> in the map.
_ADDED = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
RELEASED_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
    "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    **{name: {"__type": "AddedToken", "content": content, **_ADDED}
       for name, content in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))},
}  # fmt: skip
RELEASED_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<s>", **_ADDED}, "eos_token": {"content": "</s>", **_ADDED}, "pad_token": "<unk>",
    "unk_token": {"content": "<unk>", **_ADDED},
}  # fmt: skip
TOKENIZER_PROMPTS = [
    "A chat between a curious user and an assistant. USER: <image>\nWhat is in image 7? ASSISTANT:",
    "A chat. USER: <image>\nDescribe it. ASSISTANT: A cat, a dog.</s>USER: How many birds? ASSISTANT:",
    "A chat. USER: Compare <image> and  this, please.\n ASSISTANT:",
    "A chat. USER: Hello there ASSISTANT: Hi.</s>USER:  Line two\tthree \U0001f999 ASSISTANT:",
    "A chat. USER: <image> ASSISTANT: It shows 12 birds.</s>",
]


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    """A small SentencePiece BPE model with byte fallback and LLaMA's trainer settings (identity normaliser, dummy
    prefix, whitespace kept, digits split, <unk> <s> </s> at 0 1 2), trained on a few hundred prompt lines."""
    words = "cat dog bird image line what is in the a of and how many describe compare please hello there".split()
    corpus = [
        f"USER: {words[i % 19]} {words[(3 * i) % 19]}, {i} {words[(7 * i) % 19]}? ASSISTANT: A {words[i % 5]}.\n"
        for i in range(300)
    ]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=360, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def write_released_tokenizer(folder: Path, model_proto: bytes) -> None:
    """Replaces the folder's tokenizer files by a released repo's: `tokenizer.model` and its two configs."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.model").write_bytes(model_proto)
    (folder / "tokenizer_config.json").write_text(json.dumps(RELEASED_TOKENIZER_CONFIG, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(RELEASED_SPECIAL_TOKENS_MAP, indent=2))


def released_tokenizer_checkpoint(tmp_path: Path, model_proto: bytes, mode: str) -> Path:
    """A synthetic original checkpoint (pad, or HD with slice mode and its settings in the name) whose tokenizer is
    `model_proto` with the released tokenizer settings."""
    vocab_size = sentencepiece.SentencePieceProcessor(model_proto=model_proto).get_piece_size()
    original = Original(TINY_TOWER, TINY_LM, scale_factor=3, seed=7, vocab_size=vocab_size)
    if mode == "slice":
        src = original.write(tmp_path / "TokenPacker-HD-tiny-9patch-64token", fmt="safetensors", shards=1,
                             image_aspect_ratio="slice", scale_factor=None)  # fmt: skip
    else:
        src = original.write(tmp_path / "TokenPacker-tiny-64token", fmt="safetensors", shards=1)
    write_released_tokenizer(src, model_proto)
    return src


@pytest.mark.parametrize("mode", ["pad", "slice"])
def test_released_sentencepiece_tokenizer_converts_to_the_original_prompt_ids(tmp_path, sentencepiece_model, mode):
    """The converted processor's ids equal the original's `tokenizer_image_token` over SentencePiece itself, with
    transformers 4.31's slow `legacy=False` rules (dummy prefix on every chunk, `▁` cut after `</s>`)."""
    src = released_tokenizer_checkpoint(tmp_path, sentencepiece_model, mode)
    dst = convert_original_checkpoint(src, tmp_path / "converted")
    processor = AutoProcessor.from_pretrained(dst)
    assert processor.image_mode == mode and processor.tokenizer.init_kwargs["legacy"] is False
    assert processor.tokenizer.pad_token == "<unk>"

    sp = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model)
    oracle = SlowLlamaTokenizer(lambda text: sp.encode(text, out_type=str), sp.piece_to_id, legacy=False)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == sp.get_piece_size()
    separators = (sp.piece_to_id(","), sp.piece_to_id("\n"))
    assert separators[1] == sp.unk_id()  # "\n" is no piece, as in LLaMA's vocabulary
    tokens_per_tile = AutoConfig.from_pretrained(dst).num_image_tokens
    for index, prompt in enumerate(TOKENIZER_PROMPTS):
        images = [photo(36, 24, seed=index)] * prompt.count("<image>")
        out = processor(images=images or None, text=prompt)
        grids = [tuple(grid) for grid in out["image_grids"].tolist()] if images else []
        expected = expand_image_placeholders(
            tokenizer_image_token(prompt, oracle), grids, mode, tokens_per_tile, image_id, separators
        )
        assert out["input_ids"][0] == expected, prompt


@pytest.mark.parametrize("hidden, named", [("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")])
def test_missing_sentencepiece_or_protobuf_names_the_convert_extra(tmp_path, sentencepiece_model, hidden, named):
    src = released_tokenizer_checkpoint(tmp_path, sentencepiece_model, "pad")
    code = (
        f"import sys; sys.modules[{hidden!r}] = None\n"
        "from tokenpacker_hf.cli import main\n"
        "sys.exit(main(['convert', *sys.argv[1:]]))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert f"needs sentencepiece and protobuf, but {named} is not installed" in lines[0]
    assert "pip install 'tokenpacker-hf[convert]'" in lines[0]
    assert not (tmp_path / "out").exists()
