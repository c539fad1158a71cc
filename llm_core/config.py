"""Typed model config, parsed from a checkpoint's config.json through transformers' AutoConfig.

AutoConfig fills each model type's defaults (head_dim, rope parameters from legacy
`rope_scaling`, layer types); this module keeps only what the decoder core reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.llm_core.pooling_config import declares_pooling, sentence_bert_config
from polymodal.llm_core.registry import check_supported, model_class, model_row

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "auto": None,
}


@dataclass
class ModelConfig:
    """What the decoder core needs to build and run a model."""

    model_dir: Path
    architecture: str
    hf_config: Any  # the full transformers config (vision_config etc. for multimodal models)
    text_config: Any  # its text part (== hf_config for text-only models)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rotary_dim: int
    mrope_section: list[int] | None
    sliding_windows: list[int | None]  # per layer; None = full attention
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    # config.json's `quantization_config` (a pre-quantized checkpoint), else None
    quantization_config: dict | None = None
    # what the engine serves: the registry row's task, or "embed" for a generation model run as
    # an embedding model (`served_task`)
    task: str = "generate"
    # sentence_bert_config.json (sentence-transformers checkpoints): the longest input
    # (max_model_len is capped at it) and whether text prompts are lower-cased first
    max_seq_length: int | None = None
    do_lower_case: bool = False

    @property
    def is_multimodal(self) -> bool:
        return self.text_config is not self.hf_config


def load_config(
    model_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    runner: str = "auto",
    hf_overrides: dict | None = None,
) -> ModelConfig:
    """Parse `model_dir/config.json` (and generation_config.json for EOS ids); `runner` as
    `served_task` takes it; `hf_overrides` (vLLM's): {"architectures": [name]} serves the
    checkpoint as that registered architecture."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (is this a model checkpoint?)")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: cannot parse the model config: {exc}") from exc
    archs = (raw.get("architectures") or []) if isinstance(raw, dict) else []
    archs = override_architectures(hf_overrides) or archs
    if not archs:
        raise ModelLoadError(f"{path}: no 'architectures' entry, cannot pick an implementation")
    # The architecture first: an unserved one (Whisper, BERT for masked LM, ...) is named as
    # such, whatever fields its config has or lacks.
    check_supported(archs[0])
    task = served_task(archs[0], model_dir, runner)
    # a model class may parse configs transformers does not know (DeciLM's "nemotron-nas")
    cls = model_class(archs[0])
    config_class = getattr(cls, "hf_config_class", None) or AutoConfig
    try:
        hf = config_class.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{path}: cannot parse the model config: {exc}") from exc
    text = hf.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {})
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0))
    return ModelConfig(
        model_dir=model_dir,
        architecture=archs[0],
        hf_config=hf,
        text_config=text,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        max_position_embeddings=cls.max_prompt_positions(text),
        tie_word_embeddings=bool(
            getattr(hf, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
        ),
        rotary_dim=int(head_dim * partial),
        mrope_section=rope.get("mrope_section"),
        sliding_windows=_sliding_windows(text),
        eos_token_ids=_eos_ids(model_dir, hf, text),
        dtype=_resolve_dtype(dtype, raw, text),
        quantization_config=raw.get("quantization_config")
        or (raw.get("text_config") or {}).get("quantization_config"),
        task=task,
        **sentence_bert_config(model_dir),
    )


def override_architectures(hf_overrides: dict | None) -> list[str] | None:
    """The architecture list `hf_overrides` names (None: no override); any other key raises
    InvalidInputError naming it (polymodal applies no other config override)."""
    if not hf_overrides:
        return None
    if not isinstance(hf_overrides, dict):
        raise InvalidInputError(f"hf_overrides must be a dict, got {type(hf_overrides).__name__}")
    other = sorted(set(hf_overrides) - {"architectures"})
    if other:
        raise InvalidInputError(
            f"hf_overrides: only 'architectures' is supported, not {', '.join(map(repr, other))}"
        )
    archs = hf_overrides["architectures"]
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        raise InvalidInputError(
            f"hf_overrides['architectures'] must be a non-empty list of names, got {archs!r}"
        )
    return archs


RUNNERS = ("auto", "generate", "pooling")


def served_task(architecture: str, model_dir: Path, runner: str = "auto") -> str:
    """What the engine serves the checkpoint for (vLLM's `runner`): "auto" = the registry
    row's task, except that a generation model whose checkpoint has sentence-transformers files
    naming a Pooling module is an embedding model (Qwen3-Embedding: `Qwen3ForCausalLM`);
    "pooling" runs a generation model as an embedding model (vLLM's `runner="pooling"`, its
    convert "embed"); "generate" refuses a pooling model."""
    if runner not in RUNNERS:
        raise InvalidInputError(f"runner must be one of {RUNNERS}, got {runner!r}")
    task = model_row(architecture).task
    if task != "generate":
        if runner == "generate":
            raise InvalidInputError(
                f"runner='generate': {architecture} is a pooling model (task {task!r}); it "
                "does not generate text"
            )
        return task
    if runner == "pooling" or (runner == "auto" and declares_pooling(model_dir)):
        return "embed"
    return "generate"


def _sliding_windows(text) -> list[int | None]:
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window] * text.num_hidden_layers


def _eos_ids(model_dir: Path, hf, text) -> list[int]:
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    sources = [getattr(hf, "eos_token_id", None), getattr(text, "eos_token_id", None)]
    if gen.is_file():
        sources.insert(0, json.loads(gen.read_text()).get("eos_token_id"))
    for src in sources:
        for i in src if isinstance(src, list) else [src]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _resolve_dtype(dtype: str | torch.dtype, raw: dict, text) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if _DTYPES[dtype] is not None:
        return _DTYPES[dtype]
    name = raw.get("dtype") or raw.get("torch_dtype") or getattr(text, "dtype", None)
    name = str(name).replace("torch.", "") if name else "float32"
    return _DTYPES.get(name) or torch.float32
