"""Fetch the LLaMA vocabulary the tests use, once, before the tests run (the README's test command runs this).

The npm package `llama-tokenizer-js` (MIT, belladore.ai) carries the 32,000-token LLaMA / LLaMA-2 SentencePiece
vocabulary and its BPE merges, the tokenizer Vicuna and so the released TokenPacker models use. Nothing may be
downloaded from the Hugging Face Hub, and tests never download anything: this script puts the package's tarball,
checked against its pinned sha512, into the git-ignored `.cache/llama-tokenizer-js/` of the repository, where
`tests/llama_vocab.py` reads it. It uses `npm pack` when npm is installed and the registry's tarball URL otherwise,
and does nothing when the tarball is already there.

    python tests/assets/fetch_llama_tokenizer.py
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

PACKAGE = "llama-tokenizer-js"
VERSION = "1.2.2"
# The registry's `dist.integrity` of this version (`npm view llama-tokenizer-js@1.2.2 dist.integrity`).
INTEGRITY = "sha512-Wmth393dc3odWU3IzARJ3r2oIfWgw9GdJ5Gm+hGhfECNO18UHLRqEFSf511jn4E9KcQGzuuKw4Wl08pHAemLAw=="
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / PACKAGE
TARBALL = CACHE_DIR / f"{PACKAGE}-{VERSION}.tgz"


def integrity_of(data: bytes) -> str:
    """The npm `sha512-<base64>` integrity string of `data`."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def download(folder: Path) -> Path:
    """The tarball, packed into `folder` by npm when it is installed, else downloaded from the registry."""
    target = folder / TARBALL.name
    if shutil.which("npm"):
        subprocess.run(
            ["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=folder, check=True, stdout=subprocess.DEVNULL
        )
    else:
        with urllib.request.urlopen(TARBALL_URL, timeout=60) as response:
            target.write_bytes(response.read())
    return target


def fetch() -> Path:
    """Path of the verified tarball, fetching it when it is not cached yet."""
    if TARBALL.is_file() and integrity_of(TARBALL.read_bytes()) == INTEGRITY:
        return TARBALL
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as folder:
        fetched = download(Path(folder))
        found = integrity_of(fetched.read_bytes())
        if found != INTEGRITY:
            raise SystemExit(f"{PACKAGE}@{VERSION}: expected integrity {INTEGRITY}, got {found}; not cached")
        fetched.replace(TARBALL)
    return TARBALL


if __name__ == "__main__":
    print(fetch(), file=sys.stderr)
