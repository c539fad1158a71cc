"""polymodal: fast multimodal LLM inference."""

from polymodal import log
from polymodal.llm_core.errors import (
    EngineDeadError,
    InvalidInputError,
    MediaError,
    ModelLoadError,
    ModelNotFoundError,
    PolymodalError,
    UnsupportedModelError,
)
from polymodal.llm_core.outputs import CompletionOutput, RequestMetrics, RequestOutput, Usage
from polymodal.llm_core.registry import register_model
from polymodal.llm_core.sampling_params import SamplingParams, StructuredOutputsParams

log.configure()

POOLING_NAMES = (
    "PoolingParams",
    "PoolingOutput",
    "PoolingRequestOutput",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
)


def __getattr__(name: str):
    # LLM and Pipeline import the engine (torch models): load them on first use.
    if name == "LLM":
        from polymodal.llm import LLM

        return LLM
    if name in ("Pipeline", "Result"):
        from polymodal import pipeline

        return getattr(pipeline, name)
    if name in ("BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"):
        from polymodal import beam_search

        return getattr(beam_search, name)
    if name == "LoRARequest":
        from polymodal.llm_core.lora.adapter import LoRARequest

        return LoRARequest
    if name in POOLING_NAMES:  # vLLM exports these at its top level too
        from polymodal.llm_core import pooling

        return getattr(pooling, name)
    raise AttributeError(f"module 'polymodal' has no attribute {name!r}")


__all__ = [
    "LLM",
    "Pipeline",
    "Result",
    "SamplingParams",
    "StructuredOutputsParams",
    "LoRARequest",
    *POOLING_NAMES,
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "CompletionOutput",
    "RequestMetrics",
    "RequestOutput",
    "Usage",
    "register_model",
    "EngineDeadError",
    "InvalidInputError",
    "MediaError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PolymodalError",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
