"""ONE table: HF `architectures` name -> a `ModelRow` naming its model, processor, encoder and
task.

Classes are "module:Class" strings imported on first use, so a text-only user never imports
vision code. A model opts into features with plain class attributes and the capability
interfaces of `llm_core/interfaces.py` (`SupportsMultiModal`, `SupportsPooling`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from polymodal.llm_core.errors import UnsupportedModelError

#: What a model is served for: text generation, or one of the pooling tasks (vLLM's names).
TASKS = ("generate", "classify", "reward", "embed")


@dataclass(frozen=True)
class ModelRow:
    """How one architecture is served.

    `model`: the model class (or "module:Class"). `processor`: the multimodal processor, None
    for text-only models (`TextProcessor`). `encoder`: the name its media tower is registered
    under in `polymodal.encoders` (None: no tower). `task`: one of `TASKS`.
    """

    model: str | type
    processor: str | type | None = None
    encoder: str | None = None
    task: str = "generate"


_M = "polymodal.llm_core.models."
_LLAMA = _M + "llama:LlamaForCausalLM"
_P = "polymodal.processors."
_QWEN_VL_PROCESSOR = _P + "qwen_vl:QwenVLProcessor"
_QWEN_VL = _M + "qwen2_vl:Qwen2VLForConditionalGeneration"
_LLAVA = _M + "llava:LlavaForConditionalGeneration"

MODELS: dict[str, ModelRow] = {
    "LlamaForCausalLM": ModelRow(_LLAMA),
    "MistralForCausalLM": ModelRow(_LLAMA),
    "Qwen2ForCausalLM": ModelRow(_M + "llama:Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ModelRow(_M + "llama:Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ModelRow(_LLAMA),
    "Gemma3ForCausalLM": ModelRow(_M + "gemma3:Gemma3ForCausalLM"),
    "Exaone4ForCausalLM": ModelRow(_M + "exaone4:Exaone4ForCausalLM"),
    "NemotronForCausalLM": ModelRow(_M + "nemotron:NemotronForCausalLM"),
    "MixtralForCausalLM": ModelRow(_M + "mixtral:MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ModelRow(_M + "mixtral:Qwen3MoeForCausalLM"),
    "DeepseekV3ForCausalLM": ModelRow(_M + "deepseek_v3:DeepseekV3ForCausalLM"),
    "DeciLMForCausalLM": ModelRow(_M + "decilm:DeciLMForCausalLM"),
    "Llama4ForCausalLM": ModelRow(_M + "llama4:Llama4ForCausalLM"),
    "NemotronNASForCausalLM": ModelRow(_M + "decilm:DeciLMForCausalLM"),
    "BertForSequenceClassification": ModelRow(
        _M + "bert:BertForSequenceClassification", task="classify"
    ),
    "BertModel": ModelRow(_M + "bert:BertEmbeddingModel", task="embed"),
    "RobertaModel": ModelRow(_M + "roberta:RobertaEmbeddingModel", task="embed"),
    # bge-m3: dense + its lexical-weight / ColBERT heads when the checkpoint has their files;
    # "BgeM3EmbeddingModel" is vLLM's name for it (its hf_overrides architecture switch)
    "XLMRobertaModel": ModelRow(_M + "bge_m3:BgeM3EmbeddingModel", task="embed"),
    "BgeM3EmbeddingModel": ModelRow(_M + "bge_m3:BgeM3EmbeddingModel", task="embed"),
    "RobertaForSequenceClassification": ModelRow(
        _M + "roberta:RobertaForSequenceClassification", task="classify"
    ),
    "XLMRobertaForSequenceClassification": ModelRow(
        _M + "roberta:RobertaForSequenceClassification", task="classify"
    ),
    # bare decoders (no LM head): embedding models (`models/decoder_embedding.py`)
    "LlamaModel": ModelRow(_LLAMA, task="embed"),
    "MistralModel": ModelRow(_LLAMA, task="embed"),
    "Qwen2Model": ModelRow(_M + "llama:Qwen2ForCausalLM", task="embed"),
    "Qwen3Model": ModelRow(_M + "llama:Qwen3ForCausalLM", task="embed"),
    "Qwen2ForRewardModel": ModelRow(_M + "qwen2_rm:Qwen2ForRewardModel", task="reward"),
    "Qwen2ForProcessRewardModel": ModelRow(
        _M + "qwen2_rm:Qwen2ForProcessRewardModel", task="reward"
    ),
    "Qwen2VLForConditionalGeneration": ModelRow(
        _QWEN_VL, _QWEN_VL_PROCESSOR, "Qwen2VLForConditionalGeneration"
    ),
    "Qwen2_5_VLForConditionalGeneration": ModelRow(
        _QWEN_VL, _QWEN_VL_PROCESSOR, "Qwen2_5_VLForConditionalGeneration"
    ),
    "LlavaForConditionalGeneration": ModelRow(
        _LLAVA, _P + "llava:LlavaProcessor", "LlavaForConditionalGeneration"
    ),
    "LlavaNextForConditionalGeneration": ModelRow(
        _LLAVA, _P + "llava:LlavaNextProcessor", "LlavaNextForConditionalGeneration"
    ),
    "LlavaOnevisionForConditionalGeneration": ModelRow(
        _LLAVA,
        _P + "llava_onevision:LlavaOnevisionProcessor",
        "LlavaOnevisionForConditionalGeneration",
    ),
    "Mistral3ForConditionalGeneration": ModelRow(
        _LLAVA, _P + "pixtral:PixtralProcessor", "Mistral3ForConditionalGeneration"
    ),
    "Gemma3ForConditionalGeneration": ModelRow(
        _M + "gemma3_vl:Gemma3ForConditionalGeneration",
        _P + "gemma3:Gemma3Processor",
        "Gemma3ForConditionalGeneration",
    ),
    "Llama4ForConditionalGeneration": ModelRow(
        _M + "llama4_vl:Llama4ForConditionalGeneration",
        _P + "llama4:Llama4Processor",
        "Llama4ForConditionalGeneration",
    ),
    "Phi4MultimodalForCausalLM": ModelRow(
        _M + "phi4mm:Phi4MMForCausalLM", _P + "phi4mm:Phi4MMProcessor", "Phi4MMForCausalLM"
    ),
    # the hub's own layout (model_type phi4mm): same classes, config read by phi4mm_hub.py
    "Phi4MMForCausalLM": ModelRow(
        _M + "phi4mm:Phi4MMForCausalLM", _P + "phi4mm:Phi4MMProcessor", "Phi4MMForCausalLM"
    ),
    "LlavaLlamaModel": ModelRow(
        _M + "vila:LlavaLlamaModel", _P + "vila:VilaProcessor", "LlavaLlamaModel"
    ),
    "HCXVisionForCausalLM": ModelRow(
        _M + "hcx_vision:HCXVisionForCausalLM",
        _P + "hcx_vision:HCXVisionProcessor",
        "HCXVisionForCausalLM",
    ),
    "WhisperForConditionalGeneration": ModelRow(
        _M + "whisper:WhisperForConditionalGeneration",
        _P + "whisper:WhisperProcessor",
        "WhisperForConditionalGeneration",
    ),
    "MllamaForConditionalGeneration": ModelRow(
        _M + "mllama:MllamaForConditionalGeneration",
        _P + "mllama:MllamaProcessor",
        "MllamaForConditionalGeneration",
    ),
}


def register_model(
    architecture: str,
    decoder: str | type,
    processor: str | type | None = None,
    encoder: str | None = None,
    task: str = "generate",
) -> None:
    """Serve checkpoints whose config.json names `architecture` with `decoder` (and, for a
    multimodal model, `processor`): classes or lazy "module:Class" strings. Replaces any
    earlier row. A multimodal model's tower is looked up in `polymodal.encoders` under
    `encoder` (default: the architecture name); `examples/custom_encoder.py` shows both."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if processor is not None and encoder is None:
        encoder = architecture
    MODELS[architecture] = ModelRow(decoder, processor, encoder, task)


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


def model_row(architecture: str) -> ModelRow:
    """The table's row for an HF architecture name (UnsupportedModelError if none)."""
    check_supported(architecture)
    return MODELS[architecture]


def model_class(architecture: str, task: str | None = None):
    """The model class for an HF architecture name, served for `task` (`ModelConfig.task`;
    default: the row's): for "embed", a generation model's class becomes its embedding model
    (`as_embedding_model`: `runner="pooling"`, the bare-decoder rows)."""
    row = model_row(architecture)
    cls = _import(row.model)
    if (task or row.task) == "embed" and not getattr(cls, "is_pooling_model", False):
        return _import(_M + "decoder_embedding:as_embedding_model")(cls)
    return cls


def processor_class(architecture: str):
    """The multimodal processor class, or None for a text-only model."""
    path = model_row(architecture).processor
    return _import(path) if path else None


def encoder_class(architecture: str):
    """The media tower class of a multimodal architecture (None for text-only), resolved
    through the encoder registry by the row's `encoder` name."""
    name = model_row(architecture).encoder
    if name is None:
        return None
    return _import("polymodal.encoders.registry:get_encoder_class")(name)


def tower_graphs(tower):
    """`tower` wrapped in the encoders' CUDA-graph replayer (for towers that opt in with
    `supports_cuda_graphs`); named here so model files never import the encoders package."""
    return _import("polymodal.encoders.graphs:EncoderGraphs")(tower)


def model_modules() -> list[str]:
    """The modules of every registered model class given as a "module:Class" string, in table
    order, once each (where per-family declarations such as `TINY_CONFIGS` live)."""
    modules: list[str] = []
    for row in MODELS.values():
        if isinstance(row.model, str):
            module = row.model.split(":")[0]
            if module not in modules:
                modules.append(module)
    return modules
