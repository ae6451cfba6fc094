"""TokenPacker (arXiv 2407.02392) as a Hugging Face transformers model."""

from .configuration_tokenpacker import TokenPackerConfig

__all__ = ["TokenPackerConfig"]
