"""Session fixtures shared by test files: the real LLaMA vocabulary (read from the cache the README's test command
fills; never downloaded at test time) and LLaMA tokenizers built from it."""

import pytest

from llama_vocab import llama_vocabulary, make_llama_tokenizer


@pytest.fixture(scope="session")
def llama_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """(pieces in id order, merges) of the 32,000-token LLaMA tokenizer."""
    try:
        return llama_vocabulary()
    except FileNotFoundError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def llama_tokenizers(llama_vocab) -> dict[bool, object]:
    """{legacy: LlamaTokenizer} for legacy False (what the released TokenPacker repos ship) and True. Shared by the
    session: do not modify them."""
    return {legacy: make_llama_tokenizer(*llama_vocab, legacy=legacy) for legacy in (False, True)}
