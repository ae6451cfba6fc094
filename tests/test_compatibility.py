"""The model across transformers releases: the KV cache under either name (transformers 5.24 renamed
`past_key_values` to `cache`), tuple outputs, the version floor, the transformers APIs the remote code relies on,
and folders saved under one environment running under the other.

The whole suite runs in two environments (`.ci/run`: the oldest and the newest releases pyproject allows); the
cross-environment tests run when `TOKENPACKER_OTHER_PYTHON` names the other environment's python."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache, LlamaForCausalLM

from tokenpacker_hf import TokenPackerModel
from tokenpacker_hf.configuration_tokenpacker import MIN_TRANSFORMERS_VERSION, check_transformers_version
from tokenpacker_hf.modeling_tokenpacker import CACHE_NAME

from builders import make_model, pixels, prompt
from subprocess_utils import run_without_package
from tiny import text_config

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "tokenpacker_hf"
DIGITS_MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "tokenpacker-digits"
REMOTE_CODE_MODULES = ("configuration", "projector", "modeling", "image_processing", "processing")
OTHER_PYTHON = os.environ.get("TOKENPACKER_OTHER_PYTHON")


def inputs(images: int = 1) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([prompt(images=images)]), "pixel_values": pixels(images)}


def assert_same_values(left, right):
    """Equal nested outputs: tensors exactly, caches by their key/value tensors, tuples element by element."""
    assert type(left) is type(right) or isinstance(left, tuple), (type(left), type(right))
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right)
    elif isinstance(left, DynamicCache):
        assert left.get_seq_length() == right.get_seq_length() > 0
        for mine, theirs in zip(left.layers, right.layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    else:
        assert len(left) == len(right)
        for mine, theirs in zip(left, right, strict=True):
            assert_same_values(mine, theirs)


# --- the KV cache's name -------------------------------------------------------------------------


def test_outputs_name_the_cache_as_the_installed_transformers_does():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(transformers.LlamaConfig(**text_config())).eval()
    ids = torch.tensor([prompt()])
    with torch.no_grad():
        own = llama(input_ids=ids, use_cache=True)
        ours = make_model()(**inputs(), use_cache=True)
        base = make_model().model(**inputs(), use_cache=True)
    cache_key = next(key for key, value in own.items() if isinstance(value, DynamicCache))
    assert cache_key == CACHE_NAME
    assert list(ours.keys()) == ["logits", CACHE_NAME, "image_hidden_states"]
    assert list(base.keys()) == ["last_hidden_state", CACHE_NAME, "image_hidden_states"]
    assert isinstance(ours[CACHE_NAME], DynamicCache) and isinstance(base[CACHE_NAME], DynamicCache)


@pytest.mark.parametrize("prefill_name, step_name", [("cache", "past_key_values"), ("past_key_values", "cache")])
def test_forward_takes_the_cache_under_either_name(prefill_name, step_name):
    model = make_model()
    ids, pv = torch.tensor([prompt()]), pixels(1)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], pixel_values=pv, use_cache=True, **{prefill_name: cache})
        step = model(input_ids=ids[:, -1:], use_cache=True, **{step_name: cache}).logits[:, -1]
        full = model(input_ids=ids, pixel_values=pv).logits[:, -1]
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_the_cache_under_both_names_at_once_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="as `cache` or as `past_key_values`, not both"):
        model(**inputs(), cache=DynamicCache(), past_key_values=DynamicCache())


# transformers before 5.24 takes the cache in `generate` only as `past_key_values`; 5.24 takes both names.
GENERATE_CACHE_NAMES = sorted({"past_key_values", CACHE_NAME})


@pytest.mark.parametrize("name", GENERATE_CACHE_NAMES)
def test_generate_with_a_cache_passed_under_each_name_the_installed_version_accepts(name):
    model = make_model()
    expected = model.generate(**inputs(2), max_new_tokens=5, do_sample=False)
    cache = DynamicCache(config=model.config.text_config)
    generated = model.generate(**inputs(2), max_new_tokens=5, do_sample=False, **{name: cache})
    assert torch.equal(generated, expected)
    assert cache.get_seq_length() == expected.shape[1] - 1  # the last token is sampled, never fed back


# --- return_dict=False ---------------------------------------------------------------------------


@pytest.mark.parametrize("head", [True, False])
def test_return_dict_false_gives_the_dict_outputs_as_a_tuple(head):
    model = make_model()
    model = model if head else model.model
    ids = torch.tensor([prompt(images=2)])
    kwargs = {"input_ids": ids, "pixel_values": pixels(2), "use_cache": True, "output_hidden_states": True}
    if head:
        kwargs["labels"] = ids.masked_fill(ids == model.config.image_token_id, -100)
    with torch.no_grad():
        as_dict = model(**kwargs)
        as_tuple = model(**kwargs, return_dict=False)
    assert type(as_tuple) is tuple and len(as_tuple) == len(as_dict.keys()) == (5 if head else 4)
    assert_same_values(as_tuple, as_dict.to_tuple())


def test_return_dict_false_in_the_config_gives_tuples_too():
    model = make_model(return_dict=False)
    with torch.no_grad():
        logits, cache, image_hidden_states = model(**inputs(), use_cache=True)
    assert isinstance(cache, DynamicCache) and image_hidden_states.shape == (4, model.config.text_config.hidden_size)
    torch.testing.assert_close(logits, model(**inputs(), return_dict=True).logits, rtol=0, atol=0)


def test_base_model_return_dict_false_keeps_the_language_models_outputs_whole():
    model = make_model().model
    assert isinstance(model, TokenPackerModel)
    with torch.no_grad():
        hidden, cache, image_hidden_states = model(**inputs(), use_cache=True, return_dict=False)
    assert hidden.shape[:2] == (1, len(prompt())) and cache.get_seq_length() == len(prompt())


# --- the version floor ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "installed, refused",
    [
        ("5.17.0", True),
        ("5.22.2", True),
        ("4.57.6", True),
        (MIN_TRANSFORMERS_VERSION, False),
        ("5.24.0", False),
        ("6.1.0", False),
    ],
)
def test_version_check_refuses_exactly_the_releases_below_the_floor(installed, refused):
    if refused:
        with pytest.raises(
            ImportError,
            match=f"needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers {installed} is installed",
        ):
            check_transformers_version(installed)
    else:
        check_transformers_version(installed)


def test_floor_in_the_remote_code_is_the_floor_pyproject_declares():
    pyproject = (PACKAGE_DIR.parents[1] / "pyproject.toml").read_text()
    assert f'"transformers>={MIN_TRANSFORMERS_VERSION.removesuffix(".0")},<6"' in pyproject


# An older transformers is simulated by the version its installed metadata reports: the check runs before anything
# an older release lacks is imported, so that version is all it reads.
PRETEND_OLD = """
import importlib.metadata
_installed = importlib.metadata.version
importlib.metadata.version = lambda name: "5.17.0" if name == "transformers" else _installed(name)
"""


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_importing_the_package_below_the_floor_fails_with_one_line(tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", PRETEND_OLD + "import tokenpacker_hf"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 1
    assert last_line(child.stderr) == (
        f"ImportError: TokenPacker needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers 5.17.0 is "
        f"installed; upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
    )


@pytest.mark.parametrize(
    "auto_class", ["AutoConfig", "AutoModelForImageTextToText", "AutoProcessor", "AutoImageProcessor"]
)
def test_loading_a_saved_folder_below_the_floor_fails_with_one_line(tmp_path, auto_class):
    code = PRETEND_OLD + (
        f"from transformers import {auto_class}\n"
        f"{auto_class}.from_pretrained({str(DIGITS_MODEL)!r}, trust_remote_code=True)\n"
    )
    child = run_without_package(code, cwd=tmp_path)
    assert child.returncode == 1
    assert last_line(child.stderr).startswith(
        f"ImportError: TokenPacker needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers 5.17.0 is installed"
    ), child.stderr[-2000:]


# --- the transformers APIs the remote code relies on ---------------------------------------------

# Every name the five remote-code modules import from transformers / huggingface_hub, and where its behaviour is
# tested (in both CI environments). A new import must be added here, with its test, and to docs/compatibility.md.
AUDITED_IMPORTS = {
    ("huggingface_hub.dataclasses", "strict"): "test_configuration.py (field validation)",
    ("transformers", "AutoConfig"): "test_configuration.py",
    ("transformers", "AutoModel"): "test_modeling.py",
    ("transformers", "AutoModelForCausalLM"): "test_compose.py",
    ("transformers", "AutoImageProcessor"): "test_compose.py (the tower's normalisation)",
    ("transformers", "AutoTokenizer"): "test_compose.py",
    (
        "transformers.models.auto.modeling_auto",
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    ): "test_compose.py::test_an_llm_that_is_not_a_causal_lm_is_named",
    (
        "transformers",
        "initialization",
    ): "test_projector.py::test_fresh_model_initialises_the_projector_like_the_original",
    ("transformers.activations", "ACT2FN"): "test_projector.py (oracle parity)",
    ("transformers.cache_utils", "Cache"): "this file",
    ("transformers.configuration_utils", "PreTrainedConfig"): "test_configuration.py",
    ("transformers.configuration_utils", "SubConfigSpec"): "test_configuration.py (default sub-configs)",
    ("transformers.feature_extraction_utils", "BatchFeature"): "test_processing.py",
    ("transformers.generation", "GenerationMixin"): "test_modeling.py (generate)",
    ("transformers.image_processing_utils", "BaseImageProcessor"): "test_image_processing.py",
    ("transformers.image_processing_utils", "BatchFeature"): "test_image_processing.py",
    ("transformers.image_transforms", "center_crop"): "test_image_processing.py",
    ("transformers.image_transforms", "get_resize_output_image_size"): "test_image_processing.py",
    ("transformers.image_transforms", "normalize"): "test_image_processing.py",
    ("transformers.image_transforms", "rescale"): "test_image_processing.py",
    ("transformers.image_transforms", "resize"): "test_image_processing.py",
    ("transformers.image_utils", "ChannelDimension"): "test_image_processing.py",
    ("transformers.image_utils", "OPENAI_CLIP_MEAN"): "test_image_processing.py",
    ("transformers.image_utils", "OPENAI_CLIP_STD"): "test_image_processing.py",
    ("transformers.image_utils", "PILImageResampling"): "test_image_processing.py",
    ("transformers.modeling_outputs", "BaseModelOutputWithPast"): "this file",
    ("transformers.modeling_outputs", "BaseModelOutputWithPooling"): "test_modeling.py (get_image_features)",
    ("transformers.modeling_outputs", "CausalLMOutputWithPast"): "this file",
    ("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS"): "test_projector.py (sdpa/eager parity)",
    ("transformers.modeling_utils", "PreTrainedModel"): "test_modeling.py",
    ("transformers.modeling_utils", "slice_logits_to_keep"): "this file",
    ("transformers.processing_utils", "ImagesKwargs"): "test_processing.py",
    ("transformers.processing_utils", "MultiModalData"): "test_processing.py",
    ("transformers.processing_utils", "ProcessingKwargs"): "test_processing.py",
    ("transformers.processing_utils", "ProcessorMixin"): "test_processing.py",
    ("transformers.utils", "can_return_tuple"): "this file",
    (
        "transformers.utils",
        "torch_compilable_check",
    ): "test_modeling.py::test_image_token_count_mismatch_names_both_numbers",
}


def remote_code_imports() -> set[tuple[str, str]]:
    found = set()
    for name in REMOTE_CODE_MODULES:
        tree = ast.parse((PACKAGE_DIR / f"{name}_tokenpacker.py").read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in ("transformers", "huggingface_hub")
            ):
                found |= {(node.module, alias.name) for alias in node.names}
    return found


def test_every_transformers_import_of_the_remote_code_is_audited():
    assert remote_code_imports() == set(AUDITED_IMPORTS)


def test_slice_logits_to_keep_keeps_the_positions_the_head_needs():
    from transformers.modeling_utils import slice_logits_to_keep

    hidden = torch.randn(2, 7, 3)
    assert torch.equal(slice_logits_to_keep(hidden, 0), hidden)
    assert torch.equal(slice_logits_to_keep(hidden, 1), hidden[:, -1:])
    assert torch.equal(slice_logits_to_keep(hidden, torch.tensor([0, 4])), hidden[:, [0, 4]])
    model = make_model()
    with torch.no_grad():
        last = model(**inputs(), logits_to_keep=1).logits
        full = model(**inputs()).logits
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)


# --- folders across environments -----------------------------------------------------------------

SAVE_AND_GENERATE = """
import sys, torch
from tokenpacker_hf import TokenPackerForConditionalGeneration
from tokenpacker_hf.tiny import tiny_config
torch.manual_seed(11)
model = TokenPackerForConditionalGeneration(tiny_config()).eval()
model.save_pretrained(sys.argv[1])
inputs = torch.load("inputs.pt")
torch.save(model.generate(**inputs, max_new_tokens=6, do_sample=False), sys.argv[2])
"""

LOAD_AND_GENERATE = """
import sys, torch, transformers
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = torch.load("inputs.pt")
torch.save(model.generate(**inputs, max_new_tokens=6, do_sample=False), sys.argv[2])
print(transformers.__version__)
"""

needs_other_environment = pytest.mark.skipif(
    not OTHER_PYTHON, reason="TOKENPACKER_OTHER_PYTHON is not set (.ci/run sets it for the second environment)"
)


def run_in(python: str, code: str, cwd: Path, *args: str, hide_package: bool) -> str:
    """Runs `code` with `python` in `cwd`; with `hide_package`, where `tokenpacker_hf` cannot be imported.
    Returns stdout; fails the test with the child's stderr if it fails."""
    if hide_package:
        child = run_without_package(code, cwd=cwd, python=python, args=args)
    else:
        child = subprocess.run([python, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout


def other_version() -> str:
    return subprocess.run(
        [OTHER_PYTHON, "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@needs_other_environment
def test_a_folder_saved_here_generates_the_same_tokens_in_the_other_environment(tmp_path):
    torch.save(inputs(2), tmp_path / "inputs.pt")
    run_in(sys.executable, SAVE_AND_GENERATE, tmp_path, "model", "here.pt", hide_package=False)
    printed = run_in(OTHER_PYTHON, LOAD_AND_GENERATE, tmp_path, "model", "there.pt", hide_package=True)
    assert printed.strip() == other_version() != transformers.__version__
    assert torch.equal(torch.load(tmp_path / "there.pt"), torch.load(tmp_path / "here.pt"))


@needs_other_environment
def test_a_folder_saved_in_the_other_environment_generates_the_same_tokens_here(tmp_path):
    torch.save(inputs(2), tmp_path / "inputs.pt")
    run_in(OTHER_PYTHON, SAVE_AND_GENERATE, tmp_path, "model", "there.pt", hide_package=False)
    printed = run_in(sys.executable, LOAD_AND_GENERATE, tmp_path, "model", "here.pt", hide_package=True)
    assert printed.strip() == transformers.__version__ != other_version()
    assert torch.equal(torch.load(tmp_path / "here.pt"), torch.load(tmp_path / "there.pt"))
