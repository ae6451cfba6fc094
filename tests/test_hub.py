"""`push_to_hub` of a full model and of a LoRA adapter, with processor and model card, against a local HTTP server
that speaks the Hub's upload API; then loading the repos in a fresh process without this package."""

from __future__ import annotations

import textwrap

import torch
import yaml

from tokenpacker_hf import TokenPackerForConditionalGeneration
from tokenpacker_hf.hub import push_to_hub

from builders import example_inputs, make_processor, trained_looking_lora
from hub_server import LocalHub, hub_env
from subprocess_utils import run_without_package
from tiny import tiny_config

BASES = ["openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"]


def card_metadata(readme: bytes) -> dict:
    _, front_matter, _ = readme.decode().split("---\n", 2)
    return yaml.safe_load(front_matter)


def run_against_hub(hub: LocalHub, tmp_path, code: str):
    env = {**hub_env(hub, tmp_path / "hf_home", base={}), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    result = run_without_package(textwrap.dedent(code), cwd=tmp_path, env_extra=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_push_model_and_processor_then_load_remote_code_in_fresh_process(hub, tmp_path):
    torch.manual_seed(0)
    model, processor = TokenPackerForConditionalGeneration(tiny_config()).eval(), make_processor(padding_side="right")
    push_to_hub(model, processor, "user/tiny-tp", base_models=BASES, datasets=["liuhaotian/LLaVA-Instruct-150K"])

    files = hub.files("user/tiny-tp")
    assert {
        "config.json", "model.safetensors", "configuration_tokenpacker.py", "modeling_tokenpacker.py",
        "projector_tokenpacker.py", "processing_tokenpacker.py", "image_processing_tokenpacker.py",
        "processor_config.json", "tokenizer.json", "chat_template.jinja", "README.md",
    } <= set(files)  # fmt: skip
    metadata = card_metadata(files["README.md"])
    assert metadata["pipeline_tag"] == "image-text-to-text" and metadata["library_name"] == "transformers"
    assert metadata["base_model"] == BASES and "tokenpacker" in metadata["tags"]
    readme = files["README.md"].decode()
    assert "4 tokens per 16 px tile" in readme
    assert 'AutoModelForImageTextToText.from_pretrained("user/tiny-tp", trust_remote_code=True' in readme

    inputs = example_inputs(processor)
    with torch.no_grad():
        torch.save({"inputs": inputs, "logits": model(**inputs).logits}, tmp_path / "expected.pt")
    result = run_against_hub(
        hub,
        tmp_path,
        """
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        expected = torch.load("expected.pt", weights_only=True)
        model = AutoModelForImageTextToText.from_pretrained("user/tiny-tp", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("user/tiny-tp", trust_remote_code=True)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[Image.new("RGB", (24, 16), (200, 30, 90))], text=prompt, return_tensors="pt")
        for key, value in expected["inputs"].items():
            assert torch.equal(inputs[key], value), key
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, expected["logits"], rtol=0, atol=0)
        print("LOADED", type(model).__module__)
        """,
    )
    assert "LOADED transformers_modules" in result.stdout
    downloads = [path for method, path in hub.requests if method == "GET" and "/user/tiny-tp/resolve/" in path]
    assert any(path.split("?")[0].endswith("/model.safetensors") for path in downloads), downloads


def test_push_lora_adapter_then_attach_to_remote_code_base(hub, tmp_path):
    torch.manual_seed(0)
    base, processor = TokenPackerForConditionalGeneration(tiny_config()), make_processor(padding_side="right")
    push_to_hub(base, processor, "user/tiny-tp", base_models=BASES)
    peft_model = trained_looking_lora(base)
    card = push_to_hub(peft_model, processor, "user/tiny-tp-lora", adapter_base="user/tiny-tp")

    files = hub.files("user/tiny-tp-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "README.md"} <= set(files)
    assert not any(name.endswith("model.safetensors") and name != "adapter_model.safetensors" for name in files)
    metadata = card_metadata(files["README.md"])
    assert metadata["library_name"] == "peft" and metadata["base_model"] == ["user/tiny-tp"]
    assert {"lora", "peft"} <= set(metadata["tags"]) and str(card) == files["README.md"].decode()

    inputs = example_inputs(processor)
    with torch.no_grad():
        torch.save({"inputs": inputs, "logits": peft_model(**inputs).logits}, tmp_path / "expected.pt")
    run_against_hub(
        hub,
        tmp_path,
        """
        import torch
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText

        expected = torch.load("expected.pt", weights_only=True)
        base = AutoModelForImageTextToText.from_pretrained("user/tiny-tp", trust_remote_code=True)
        model = PeftModel.from_pretrained(base, "user/tiny-tp-lora").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**expected["inputs"]).logits, expected["logits"], rtol=0, atol=1e-6)
        """,
    )
