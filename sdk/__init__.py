"""polymodal: fast multimodal LLM inference."""

from polymodal.llm_core.errors import (
    InvalidInputError,
    MediaError,
    ModelLoadError,
    ModelNotFoundError,
    PolymodalError,
    UnsupportedModelError,
)

__all__ = [
    "InvalidInputError",
    "MediaError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PolymodalError",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
