"""`tokenpacker-hf demo` in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, driven
by Selenium) opens the page the command serves, uploads the shipped sample grid, asks the question and reads
the shipped model's answer; bad uploads and a missing model folder are messages in the page."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "digits" / "sample_grid.png"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Chromium as a test browser: no sandbox (CI containers run as root), no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=900,800"]  # fmt: skip


def start_demo(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "tokenpacker_hf", "demo", "--port", "0", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def demo_url():
    """The demo serving the shipped model (the command's defaults) on a free port of 127.0.0.1."""
    server = start_demo()
    try:
        line = server.stdout.readline()  # the one line it prints, once the model is loaded and the port bound
        assert line.startswith("TokenPacker demo on http://127.0.0.1:"), line + server.stderr.read()
        yield line.split()[3]
    finally:
        server.terminate()
        server.wait(timeout=30)


def ask_over_http(url: str, request: dict) -> list[dict]:
    data = json.dumps(request).encode()
    with urllib.request.urlopen(urllib.request.Request(url + "ask", data=data), timeout=120) as response:
        return [json.loads(line) for line in response.read().decode().splitlines()]


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Chromium and its driver (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def submit(driver, image: Path | None, question: str, model: str | None = None) -> str:
    """Fills the form as a user does, clicks Ask and waits for the answer or an error; returns the page state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if image is not None:
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 10).until(
            lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:")
        )
    for field, value in (("question", question), ("model", model)):
        if value is not None:
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "ask").click()
    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error")
    )
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_page_reads_the_sample_grid_and_shows_what_tokenpacker_saved(demo_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    started = time.perf_counter()
    browser.get(demo_url)
    assert submit(browser, SAMPLE, "Read the digits.") == "done", browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "answer").text == "3168"
    stats = browser.find_element(By.ID, "stats").text
    assert "4 image tokens (LLaVA-1.5's projector: 64, 16.0x more) from 1 tile; first token after" in stats

    (tmp_path / "notes.txt").write_text("not an image")
    assert submit(browser, tmp_path / "notes.txt", "Read the digits.") == "error"
    assert browser.find_element(By.ID, "error").text.startswith("the uploaded file is not an image that can be read")
    assert browser.find_element(By.ID, "answer").text == ""

    assert submit(browser, SAMPLE, "Read the digits.", model="no/such/folder") == "error"
    assert browser.find_element(By.ID, "error").text == "no model folder at no/such/folder"
    assert time.perf_counter() - started < 60


def test_requests_without_an_image_or_question_are_one_message(demo_url):
    sample = "data:image/png;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
    assert ask_over_http(demo_url, {"question": "Read the digits."}) == [
        {"error": "no image: choose an image file (PNG, JPEG, ...)"}
    ]
    assert ask_over_http(demo_url, {"image": sample, "question": " "}) == [
        {"error": "no question: type what to ask about the image"}
    ]
    events = ask_over_http(demo_url, {"image": sample, "question": "Read the digits."})
    assert events[0]["stats"]["image_tokens"] == 4 and events[-1]["done"]["answer"] == "3168"
    assert "".join(event.get("text", "") for event in events) == "3168"


def test_demo_with_a_missing_model_or_image_is_one_error_line(tmp_path, capsys):
    from tokenpacker_hf.cli import main

    assert main(["demo", "--model", str(tmp_path / "missing"), "--image", ""]) == 2
    assert capsys.readouterr() == ("", f"error: no model folder at {tmp_path / 'missing'}\n")
    assert main(["demo", "--image", str(tmp_path / "missing.png")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: image not found: {tmp_path / 'missing.png'} (pass --image, or --image '' for none)\n"
    )


def test_slice_mode_stats_name_the_grid_and_the_answer_is_the_command_line_s(tmp_path, capsys):
    """The page's numbers for a TokenPacker-HD processor, from the demo's own answering code (no server needed):
    image tokens against one token per patch for the same tiles, the slice grid, the time to first token, and
    the streamed pieces add up to what `generate` prints."""
    import numpy as np
    import torch
    from PIL import Image

    from tokenpacker_hf import TokenPackerForConditionalGeneration
    from tokenpacker_hf.cli import build_parser, main
    from tokenpacker_hf.demo import Demo
    from tokenpacker_hf.tiny import tiny_config

    from builders import make_processor

    torch.manual_seed(0)
    config, folder = tiny_config(), tmp_path / "hd"
    TokenPackerForConditionalGeneration(config).save_pretrained(folder)
    processor = make_processor("slice")
    processor.save_pretrained(folder)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    data_url = "data:image/png;base64," + base64.b64encode((tmp_path / "wide.png").read_bytes()).decode()

    args = build_parser().parse_args(["demo", "--model", str(folder), "--image", "", "--max-new-tokens", "24"])
    events = list(Demo(args).ask({"image": data_url, "question": "What is it?"}))
    stats, pieces, done = events[0]["stats"], [e["text"] for e in events if "text" in e], events[-1]["done"]

    grid = processor(images=[Image.open(tmp_path / "wide.png").convert("RGB")], text="<image>")["image_grids"][0]
    tiles = int(grid[0] * grid[1]) + 1  # the slices and the thumbnail
    assert stats == {"image_tokens": tiles * config.num_image_tokens, "llava_tokens": tiles * config.patch_grid_size**2,
                     "tiles": tiles, "image_mode": "slice", "slice_grid": [int(grid[0]), int(grid[1])],
                     "scale_factor": 2}  # fmt: skip
    assert grid.tolist() != [1, 1]  # a wide image is sliced
    assert done["ttft_seconds"] is not None and 0 < done["ttft_seconds"] <= done["seconds"]
    assert "".join(pieces).strip() == done["answer"]

    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "wide.png"), "--prompt", "What is it?",
                 "--max-new-tokens", "24"]) == 0  # fmt: skip
    assert capsys.readouterr().out == done["answer"] + "\n"


def test_a_request_whose_page_went_away_stops_its_generation():
    """`Cancelled` is what the demo gives `generate`: once set, the next token is the last one."""
    import threading

    import torch

    from tokenpacker_hf import TokenPackerForConditionalGeneration
    from tokenpacker_hf.demo import Cancelled
    from tokenpacker_hf.tiny import tiny_config

    torch.manual_seed(0)
    model = TokenPackerForConditionalGeneration(tiny_config()).eval()
    prompt = torch.tensor([[1, 70, 71, 72]])
    cancelled = threading.Event()
    running = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, stopping_criteria=[Cancelled(cancelled)])
    cancelled.set()
    stopped = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, stopping_criteria=[Cancelled(cancelled)])
    assert running.shape[1] == 4 + 12 and stopped.shape[1] == 4 + 1
