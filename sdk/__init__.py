"""polymodal: fast multimodal LLM inference."""

from polymodal.llm_core.errors import (
    InvalidInputError,
    MediaError,
    ModelLoadError,
    ModelNotFoundError,
    PolymodalError,
    UnsupportedModelError,
)
from polymodal.llm_core.outputs import CompletionOutput, RequestOutput, Usage
from polymodal.llm_core.registry import register_model
from polymodal.llm_core.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM and Pipeline import the engine (torch models): load them on first use.
    if name == "LLM":
        from polymodal.llm import LLM

        return LLM
    if name in ("Pipeline", "Result"):
        from polymodal import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'polymodal' has no attribute {name!r}")


__all__ = [
    "LLM",
    "Pipeline",
    "Result",
    "SamplingParams",
    "CompletionOutput",
    "RequestOutput",
    "Usage",
    "register_model",
    "InvalidInputError",
    "MediaError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PolymodalError",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
