"""PEFT LoRA on TokenPacker: what the adapter holds, and the round trip a user without this package makes
(load the base through remote code, attach the adapter, generate, merge, save, reload) with equal logits."""

from __future__ import annotations

import textwrap

import torch
from safetensors import safe_open

from tokenpacker_hf import TokenPackerForConditionalGeneration

from builders import example_inputs, make_processor, trained_looking_lora
from subprocess_utils import run_without_package
from tiny import tiny_config


def test_adapter_holds_lm_lora_and_the_full_projector_only(tmp_path):
    peft_model = trained_looking_lora(TokenPackerForConditionalGeneration(tiny_config()))
    peft_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    lora_modules = {key.rsplit(".lora_", 1)[0] for key in keys if ".lora_" in key}
    expected = {
        f"base_model.model.model.language_model.layers.{layer}.{module}"
        for layer in range(2)
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert lora_modules == expected
    projector = {key for key in keys if ".lora_" not in key}
    # PEFT stores the trained projector copy under the original module's parameter names.
    plain_projector = TokenPackerForConditionalGeneration(tiny_config()).model.multi_modal_projector
    assert projector == {
        f"base_model.model.model.multi_modal_projector.{name}" for name, _ in plain_projector.named_parameters()
    }


def test_lora_round_trip_through_remote_code_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    base = TokenPackerForConditionalGeneration(tiny_config())
    base.save_pretrained(tmp_path / "base")
    processor = make_processor(padding_side="right")
    processor.save_pretrained(tmp_path / "base")
    inputs = example_inputs(processor)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    peft_model = trained_looking_lora(base)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        logits = peft_model(**inputs).logits
    assert not torch.allclose(logits, base_logits, atol=1e-3), "the adapter must change the outputs"
    torch.save({"inputs": inputs, "logits": logits}, tmp_path / "expected.pt")

    code = textwrap.dedent(
        """
        import torch
        from peft import PeftModel
        from safetensors import safe_open
        from transformers import AutoModelForImageTextToText

        expected = torch.load("expected.pt", weights_only=True)
        inputs, reference = expected["inputs"], expected["logits"]
        base = AutoModelForImageTextToText.from_pretrained("base", trust_remote_code=True)
        assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
        model = PeftModel.from_pretrained(base, "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, reference, rtol=0, atol=1e-6)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert generated.shape == (1, inputs["input_ids"].shape[1] + 3), generated.shape

        merged = model.merge_and_unload()
        assert type(merged).__name__ == "TokenPackerForConditionalGeneration"
        with torch.no_grad():
            torch.testing.assert_close(merged(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
        merged.save_pretrained("merged")
        with safe_open("merged/model.safetensors", "pt") as handle:
            leftovers = [k for k in handle.keys() if "lora" in k or "base_layer" in k or "modules_to_save" in k]
        assert not leftovers, leftovers
        reloaded = AutoModelForImageTextToText.from_pretrained("merged", trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
        again = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(again, generated), (again, generated)
        print("ROUND TRIP OK")
        """
    )
    result = run_without_package(code, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ROUND TRIP OK" in result.stdout
