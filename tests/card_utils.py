"""Running a model card's usage snippet exactly as it is written: its Python block, in a fresh process without
the package, offline, with the one image URL a generic card names answered by a local HTTP proxy."""

from __future__ import annotations

import contextlib
import io
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def python_block(card: str) -> str:
    """The card's one fenced Python block."""
    blocks = re.findall(r"^```python\n(.*?)^```$", card, flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one python block in the card, found {len(blocks)}"
    return blocks[0]


@contextlib.contextmanager
def image_proxy(image: Image.Image) -> Iterator[tuple[dict[str, str], list[str]]]:
    """An HTTP proxy on 127.0.0.1 that answers every GET with `image` as a PNG. Yields the environment that routes
    a child's plain-http requests through it (the Hub stays offline) and the list of URLs it was asked for."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body, requested = buffer.getvalue(), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)  # through a proxy, the path is the whole URL
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield {"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}, requested
    finally:
        server.shutdown()
        server.server_close()
