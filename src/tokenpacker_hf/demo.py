# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""`tokenpacker-hf demo`: a page to ask a TokenPacker model about an image, in any browser.

It shows the answer as it is generated, and what TokenPacker did: the image tokens the model used against the
tokens LLaVA-1.5's MLP projector would feed the LLM for the same tiles, the slice grid in HD mode, and the time
to the first answer token. Served with the standard library's HTTP server (one page, one streaming endpoint),
so it needs nothing beyond the package: Gradio, the usual choice, requires pillow<13 and the package supports
pillow 13.

Endpoints: `GET /` the page; `GET /sample` the default image; `POST /ask` with JSON
`{"model": DIR_OR_REPO, "question": TEXT, "image": DATA_URL}` answers with one JSON object per line:
`{"stats": {...}}` once the inputs are built, `{"text": ...}` pieces of the answer, then `{"done": {...}}`;
anything the user can fix (no image, a file that is not an image, a missing model folder) is one
`{"error": MESSAGE}` line, shown in the page.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from transformers import StoppingCriteria, TextIteratorStreamer

from . import cli

MAX_UPLOAD_BYTES = 20 * 2**20


class TimedStreamer(TextIteratorStreamer):
    """`TextIteratorStreamer` that also notes when the first generated token arrives (`first_token_at`, from
    `time.perf_counter`), since decoded text only comes out once a word is complete."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        self.first_token_at: float | None = None
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._prompt_seen = True
        super().put(value)


class Cancelled(StoppingCriteria):
    """Stops `generate` once `event` is set (by a request whose page went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Demo:
    """The models the page has asked for (loaded once each, the default one at start) and the answering itself.

    One generation runs at a time: the model is shared, and on a CPU two would only slow each other down.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.models: dict[str, tuple[Any, Any, str]] = {}
        self.lock = threading.Lock()
        self.model(args.model)

    def model(self, name: str) -> tuple[Any, Any, str]:
        """The model, processor and device for folder or repo `name`; a `cli.USER_ERRORS` error names what is
        wrong with it."""
        if name not in self.models:
            self.models[name] = cli.load_model(argparse.Namespace(**{**vars(self.args), "model": name}))
        return self.models[name]

    def ask(self, request: dict[str, Any]) -> Any:
        """Yields the events of one answer (see the module docstring); raises a `cli.USER_ERRORS` error for a
        request that cannot be answered."""
        import torch

        image = decode_image(request.get("image"))
        question = str(request.get("question") or "").strip()
        if not question:
            raise cli.UsageError("no question: type what to ask about the image")
        name = str(request.get("model") or "").strip() or self.args.model
        with self.lock:
            model, processor, device = self.model(name)
            inputs = cli.chat_inputs(processor, [image], question, device)
            yield {"stats": token_stats(model.config, processor, inputs)}
            streamer = TimedStreamer(processor.tokenizer)
            failure: list[BaseException] = []

            cancelled = threading.Event()

            def run() -> None:
                try:
                    with torch.inference_mode():
                        model.generate(**inputs, max_new_tokens=self.args.max_new_tokens, do_sample=False,
                                       streamer=streamer, stopping_criteria=[Cancelled(cancelled)])  # fmt: skip
                except BaseException as error:  # reported to the page below, after the stream ends
                    failure.append(error)
                    streamer.end()

            started = time.perf_counter()
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            pieces = []
            try:
                for piece in streamer:
                    # The same trimming as the command line: no leading whitespace before the answer.
                    if not pieces and not piece.strip():
                        continue
                    pieces.append(piece)
                    yield {"text": piece}
            finally:
                # A page that went away stops its generation, so the model is free for the next one.
                cancelled.set()
                worker.join()
            if failure:
                raise RuntimeError(f"generation failed: {cli.one_line(failure[0])}")
            first = streamer.first_token_at
            yield {"done": {"answer": "".join(pieces).strip(), "seconds": round(time.perf_counter() - started, 3),
                            "ttft_seconds": round(first - started, 3) if first is not None else None}}  # fmt: skip


def decode_image(data_url: Any) -> Any:
    """The uploaded image (a `data:` URL, as the page's FileReader gives it) as an RGB PIL image."""
    from .image_processing_tokenpacker import to_rgb_image

    if not data_url:
        raise cli.UsageError("no image: choose an image file (PNG, JPEG, ...)")
    if not isinstance(data_url, str) or not data_url.startswith("data:") or "," not in data_url:
        raise cli.UsageError("the image must be sent as a data: URL")
    try:
        data = base64.b64decode(data_url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise cli.UsageError("the image upload is not valid base64") from None
    if len(data) > MAX_UPLOAD_BYTES:
        raise cli.UsageError(f"the image is {len(data) / 2**20:.0f} MiB; at most {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        return to_rgb_image(data)
    except Exception as error:  # PIL raises several types for a file that is not an image
        raise cli.UsageError(f"the uploaded file is not an image that can be read: {cli.one_line(error)}") from None


def token_stats(config: Any, processor: Any, inputs: Any) -> dict[str, Any]:
    """What TokenPacker did with the image: positions it takes in the LLM's input, against the positions
    LLaVA-1.5's MLP projector (one token per patch, no compression) would take for the same tiles."""
    tiles = int(inputs["pixel_values"].shape[0])
    rows, cols = (int(value) for value in inputs["image_grids"][0])
    mode = getattr(processor.image_processor, "image_mode", "pad")
    return {
        "image_tokens": int((inputs["input_ids"] == config.image_token_id).sum()),
        "llava_tokens": tiles * config.patch_grid_size**2,
        "tiles": tiles,
        "image_mode": mode,
        "slice_grid": [rows, cols] if mode == "slice" else None,
        "scale_factor": config.scale_factor,
    }


def page(args: argparse.Namespace, has_sample: bool) -> bytes:
    """The demo page, with the default model, question and (when there is one) image filled in."""
    settings = json.dumps({"model": args.model, "question": args.prompt, "sample": has_sample})
    return PAGE.replace("/*SETTINGS*/null", settings.replace("</", "<\\/")).encode()


def handler_class(demo: Demo, sample: bytes | None) -> type[BaseHTTPRequestHandler]:
    """The request handler of the demo's server, bound to `demo` and the default image's bytes."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "tokenpacker-hf-demo"

        def do_GET(self) -> None:
            if self.path == "/":
                self.reply(200, "text/html; charset=utf-8", page(demo.args, sample is not None))
            elif self.path == "/sample" and sample is not None:
                self.reply(200, "application/octet-stream", sample)
            else:
                self.reply(404, "text/plain; charset=utf-8", b"not found")

        def do_POST(self) -> None:
            if self.path != "/ask":
                self.reply(404, "text/plain; charset=utf-8", b"not found")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > 2 * MAX_UPLOAD_BYTES:
                self.reply(413, "text/plain; charset=utf-8", b"upload too large")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            events = None
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise cli.UsageError("the request must be a JSON object")
                events = demo.ask(request)
                for event in events:
                    self.send_event(event)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page was closed or reloaded mid-answer: nobody is left to tell
            except json.JSONDecodeError:
                self.send_event({"error": "the request is not valid JSON"})
            except (*cli.USER_ERRORS, RuntimeError) as error:
                self.send_event({"error": cli.one_line(error)})
            finally:
                if events is not None:
                    events.close()  # releases the model for the next request now, not when garbage-collected

        def send_event(self, event: dict[str, Any]) -> None:
            self.wfile.write(json.dumps(event).encode() + b"\n")
            self.wfile.flush()

        def reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            if demo.args.verbose:
                super().log_message(format, *args)

    return Handler


def serve(args: argparse.Namespace) -> None:
    """Loads the default model (a problem with it is an error before anything is served), then serves the page
    until interrupted. Prints the page's address, the one line on stdout."""
    sample = None
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise cli.UsageError(f"image not found: {args.image} (pass --image, or --image '' for none)")
        sample = path.read_bytes()
    demo = Demo(args)
    server = ThreadingHTTPServer((args.host, args.port), handler_class(demo, sample))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"TokenPacker demo on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>TokenPacker demo</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: 0.2rem; }
  .sub { color: #666; margin-top: 0; }
  label { display: block; margin: 0.8rem 0 0.2rem; font-weight: 600; }
  input[type=text] { width: 100%; box-sizing: border-box; padding: 0.4rem; font-size: 1rem; }
  #preview { display: block; width: 10rem; height: auto; margin: 0.5rem 0; image-rendering: pixelated;
             border: 1px solid #ccc; }
  button { margin-top: 1rem; padding: 0.5rem 1.4rem; font-size: 1rem; }
  #answer { font-size: 1.6rem; font-family: ui-monospace, monospace; min-height: 2rem; margin: 1rem 0 0.4rem;
            white-space: pre-wrap; }
  #stats { color: #444; }
  #error { color: #b00020; font-weight: 600; }
</style>
</head>
<body>
<h1>TokenPacker</h1>
<p class="sub">Ask a TokenPacker model (<a href="https://arxiv.org/abs/2407.02392">arXiv 2407.02392</a>) about an
image, and see how few tokens it spent on it.</p>
<form id="form">
  <label for="file">Image</label>
  <input type="file" id="file" accept="image/*">
  <img id="preview" alt="the image to ask about" hidden>
  <label for="model">Model folder or Hub repo</label>
  <input type="text" id="model">
  <label for="question">Question</label>
  <input type="text" id="question">
  <button type="submit" id="ask">Ask</button>
</form>
<div id="answer" aria-live="polite"></div>
<div id="stats"></div>
<div id="error" role="alert"></div>
<script>
const settings = /*SETTINGS*/null;
const $ = (id) => document.getElementById(id);
let image = null;

function show(dataUrl) {
  image = dataUrl;
  $("preview").src = dataUrl || "";
  $("preview").hidden = !dataUrl;
}

function readFile(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

$("model").value = settings.model;
$("question").value = settings.question;
if (settings.sample) {
  fetch("/sample").then((r) => r.blob()).then(readFile).then(show);
}
$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  show(file ? await readFile(file) : null);
});

function describe(stats) {
  const saved = stats.llava_tokens / stats.image_tokens;
  let text = `${stats.image_tokens} image tokens (LLaVA-1.5's projector: ${stats.llava_tokens}, ` +
             `${saved.toFixed(1)}x more) from ${stats.tiles} tile${stats.tiles > 1 ? "s" : ""}`;
  if (stats.slice_grid) text += `, sliced ${stats.slice_grid[0]}x${stats.slice_grid[1]}`;
  return text;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("answer").textContent = "";
  $("stats").textContent = "";
  $("error").textContent = "";
  document.body.dataset.state = "running";
  $("ask").disabled = true;
  let stats = null;
  try {
    const response = await fetch("/ask", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: $("model").value, question: $("question").value, image: image}),
    });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let newline;
      while ((newline = buffer.indexOf("\\n")) >= 0) {
        const message = JSON.parse(buffer.slice(0, newline));
        buffer = buffer.slice(newline + 1);
        if (message.error) { $("error").textContent = message.error; document.body.dataset.state = "error"; }
        if (message.stats) { stats = message.stats; $("stats").textContent = describe(stats); }
        if (message.text) $("answer").textContent += message.text;
        if (message.done) {
          $("answer").textContent = message.done.answer;
          const ttft = message.done.ttft_seconds;
          $("stats").textContent = describe(stats) +
            (ttft === null ? "" : `; first token after ${ttft.toFixed(2)} s`) +
            `, answer after ${message.done.seconds.toFixed(2)} s`;
          document.body.dataset.state = "done";
        }
      }
    }
  } catch (error) {
    $("error").textContent = `the demo server cannot be reached: ${error.message}`;
    document.body.dataset.state = "error";
  } finally {
    $("ask").disabled = false;
  }
});
</script>
</body>
</html>
"""
