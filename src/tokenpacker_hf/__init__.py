"""TokenPacker (arXiv 2407.02392) as a Hugging Face transformers model.

Importing the package registers it with the Auto classes, and marks its classes for remote code so that
`save_pretrained` / `push_to_hub` write folders that load with `trust_remote_code=True` anywhere.
"""

from importlib.metadata import PackageNotFoundError, version

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_tokenpacker import TokenPackerConfig
from .image_processing_tokenpacker import TokenPackerImageProcessor, get_slice_grid
from .modeling_tokenpacker import TokenPackerForConditionalGeneration, TokenPackerModel, TokenPackerPreTrainedModel
from .processing_tokenpacker import TokenPackerProcessor, count_image_tokens
from .projector_tokenpacker import (
    AvgPoolProjector,
    MLPProjector,
    PixelShuffleProjector,
    TokenPackerProjector,
    build_projector,
)

try:
    # The installed distribution's version, which pyproject.toml sets: one source of truth.
    __version__ = version("tokenpacker-hf")
except PackageNotFoundError:  # a source tree on sys.path that was never installed has no metadata to read
    __version__ = "0+unknown"

AutoConfig.register("tokenpacker", TokenPackerConfig, exist_ok=True)
AutoModel.register(TokenPackerConfig, TokenPackerModel, exist_ok=True)
AutoModelForImageTextToText.register(TokenPackerConfig, TokenPackerForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    TokenPackerConfig, image_processor_classes={"pil": TokenPackerImageProcessor}, exist_ok=True
)
AutoProcessor.register(TokenPackerConfig, TokenPackerProcessor, exist_ok=True)
TokenPackerConfig.register_for_auto_class()
TokenPackerImageProcessor.register_for_auto_class("AutoImageProcessor")
TokenPackerProcessor.register_for_auto_class("AutoProcessor")
TokenPackerModel.register_for_auto_class("AutoModel")
TokenPackerForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "__version__",
    "TokenPackerConfig",
    "TokenPackerPreTrainedModel",
    "TokenPackerModel",
    "TokenPackerForConditionalGeneration",
    "TokenPackerImageProcessor",
    "TokenPackerProcessor",
    "get_slice_grid",
    "count_image_tokens",
    "TokenPackerProjector",
    "MLPProjector",
    "AvgPoolProjector",
    "PixelShuffleProjector",
    "build_projector",
]
