"""The LLaMA / LLaMA-2 vocabulary (32,000 SentencePiece pieces and their BPE merges) for the tests, read offline
from the npm package `llama-tokenizer-js` that `tests/assets/fetch_llama_tokenizer.py` caches (the README's test
command runs it first; tests never download).

The package stores the vocabulary as base64 of the pieces joined by "\\n" (in id order) and the merges as base64 of
little-endian uint16 pairs of piece ids, highest priority first (its `data-conversion.py`). The decoded lists are
cached as JSON next to the tarball.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "assets"))
from fetch_llama_tokenizer import CACHE_DIR, TARBALL, VERSION  # noqa: E402

DECODED = CACHE_DIR / f"vocab-merges-{VERSION}.json"


def decode_package(source: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(pieces in id order, merges) from the text of the package's `llama-tokenizer.js`."""
    vocab_base64 = re.search(r'const llama_vocab_base64 = "([^"]*)"', source).group(1)
    merges_base64 = re.search(r'const llama_merges_binary = "([^"]*)"', source).group(1)
    vocab = base64.b64decode(vocab_base64).decode("utf-8").split("\n")
    merge_bytes = base64.b64decode(merges_base64)
    ids = struct.unpack(f"<{len(merge_bytes) // 2}H", merge_bytes)
    return vocab, [(vocab[ids[i]], vocab[ids[i + 1]]) for i in range(0, len(ids), 2)]


def llama_vocabulary() -> tuple[list[str], list[tuple[str, str]]]:
    """(pieces, merges) of the LLaMA tokenizer, from the on-disk cache; raises FileNotFoundError naming the fetch
    command when the tarball has not been fetched."""
    if DECODED.is_file():
        data = json.loads(DECODED.read_text(encoding="utf-8"))
        return data["vocab"], [tuple(pair) for pair in data["merges"]]
    if not TARBALL.is_file():
        raise FileNotFoundError(
            f"expected the llama-tokenizer-js tarball at {TARBALL.relative_to(CACHE_DIR.parents[1])}, found none; run "
            "`python tests/assets/fetch_llama_tokenizer.py` first (the README's test command does)"
        )
    with tarfile.open(TARBALL) as archive:
        source = archive.extractfile("package/llama-tokenizer.js").read().decode("utf-8")
    vocab, merges = decode_package(source)
    DECODED.write_text(json.dumps({"vocab": vocab, "merges": merges}), encoding="utf-8")
    return vocab, merges


def package_test_cases() -> list[tuple[str, list[int]]]:
    """The (text, expected ids with BOS) pairs of the package's own tests of the real LLaMA tokenizer, as far as
    they are plain string literals (`testCase("...", [1, ...])`)."""
    with tarfile.open(TARBALL) as archive:
        source = archive.extractfile("package/llama-tokenizer.js").read().decode("utf-8")
    cases = []
    literal = r'"(?:[^"\\\n]|\\.)*"|\'[^\'\\\n]*\''
    for text, ids in re.findall(rf"testCase\(({literal}),\s*\[([\d,\s]+)\]\)", source):
        # A double-quoted JS literal reads as JSON (with raw tabs); the single-quoted ones hold no escapes.
        value = json.loads(text, strict=False) if text.startswith('"') else text[1:-1]
        cases.append((value, [int(token) for token in ids.split(",")]))
    return cases


def make_llama_tokenizer(vocab: list[str], merges: list[tuple[str, str]], legacy: bool):
    """transformers' `LlamaTokenizer` (a `tokenizers` BPE with byte fallback and LLaMA's Metaspace pre-tokenizer,
    `prepend_scheme` "first" for legacy=False, "always" for legacy=True) on the LLaMA vocabulary, with BOS, the
    `<image>` special token (id 32000) and pad `<unk>`, as the released TokenPacker tokenizers are set up."""
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer(
        vocab={piece: index for index, piece in enumerate(vocab)}, merges=merges, legacy=legacy, add_bos_token=True
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
