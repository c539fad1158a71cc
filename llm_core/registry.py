"""ONE table: HF `architectures` name -> decoder class and, for multimodal models, processor.

Entries are "module:Class" strings imported on first use, so a text-only user never
imports vision code. A model opts into features with plain class attributes.
"""

from __future__ import annotations

import importlib

from polymodal.llm_core.errors import UnsupportedModelError

_LLAMA = "polymodal.llm_core.models.llama:LlamaForCausalLM"
_QWEN_VL = "polymodal.llm_core.models.qwen2_vl:Qwen2VLForConditionalGeneration"
_QWEN_VL_PROCESSOR = "polymodal.processors.qwen_vl:QwenVLProcessor"

#: architecture -> (decoder, processor or None for text-only); "module:Class" or the class
MODELS: dict[str, tuple[str | type, str | type | None]] = {
    "LlamaForCausalLM": (_LLAMA, None),
    "MistralForCausalLM": (_LLAMA, None),
    "Qwen2ForCausalLM": (_LLAMA, None),
    "Qwen3ForCausalLM": (_LLAMA, None),
    "Phi3ForCausalLM": (_LLAMA, None),
    "Qwen2VLForConditionalGeneration": (_QWEN_VL, _QWEN_VL_PROCESSOR),
    "Qwen2_5_VLForConditionalGeneration": (_QWEN_VL, _QWEN_VL_PROCESSOR),
}


def register_model(
    architecture: str, decoder: str | type, processor: str | type | None = None
) -> None:
    """Serve checkpoints whose config.json names `architecture` with `decoder` (and, for a
    multimodal model, `processor`): classes or lazy "module:Class" strings. Replaces any
    earlier row. A new vision tower also needs `polymodal.encoders.register_encoder`;
    `examples/custom_encoder.py` shows both."""
    MODELS[architecture] = (decoder, processor)


def _import(path: str | type):
    if not isinstance(path, str):
        return path
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def check_supported(architecture: str) -> None:
    """Raise UnsupportedModelError naming `architecture` and the supported list unless the
    table serves it."""
    if architecture not in MODELS:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {sorted(MODELS)}"
        )


def _entry(architecture: str) -> tuple[str, str | None]:
    check_supported(architecture)
    return MODELS[architecture]


def model_class(architecture: str):
    """The decoder class for an HF architecture name."""
    return _import(_entry(architecture)[0])


def processor_class(architecture: str):
    """The multimodal processor class, or None for a text-only model."""
    path = _entry(architecture)[1]
    return _import(path) if path else None
