"""A saved folder must load with `trust_remote_code=True` in a process where `tokenpacker_hf` is not importable."""

import torch

from builders import make_model, pixels, prompt
from subprocess_utils import run_without_package

CHILD = """
import torch
from transformers import AutoModel, AutoModelForImageTextToText
inputs = torch.load("inputs.pt")
full = AutoModelForImageTextToText.from_pretrained("model", trust_remote_code=True).eval()
base = AutoModel.from_pretrained("model", trust_remote_code=True).eval()
assert type(full).__module__.startswith("transformers_modules"), type(full).__module__
assert type(full).__name__ == "TokenPackerForConditionalGeneration" and type(base).__name__ == "TokenPackerModel"
with torch.no_grad():
    logits = full(**inputs).logits
    hidden = base(**inputs).last_hidden_state
generated = full.generate(**inputs, max_new_tokens=4, do_sample=False)
torch.save({"logits": logits, "hidden": hidden, "generated": generated}, "outputs.pt")
"""


def test_folder_loads_through_remote_code_in_a_fresh_process(tmp_path):
    model = make_model(seed=7)
    model.save_pretrained(tmp_path / "model")
    inputs = {"input_ids": torch.tensor([prompt(images=2)]), "pixel_values": pixels(2)}
    torch.save(inputs, tmp_path / "inputs.pt")

    child = run_without_package(CHILD, cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]

    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = model(**inputs)
    torch.testing.assert_close(outputs["logits"], expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head(outputs["hidden"]), expected.logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(outputs["generated"], model.generate(**inputs, max_new_tokens=4, do_sample=False))
