"""`LLM(...)` keywords (vLLM's spellings and polymodal's own; `limit_mm_per_prompt`, also checked
against each processed prompt) and generation_config.json defaults.

Every keyword either has an effect or is refused with an error naming it: nothing a vLLM user
passes is silently dropped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.llm_core.sampling_params import GENERATION_CONFIG_FIELDS, SamplingParams

logger = logging.getLogger("polymodal")

ENGINE_KEYWORDS = {f.name for f in fields(EngineConfig)}
# vLLM keywords polymodal accepts only at vLLM's default value (anything else needs a feature
# polymodal does not have, and is refused).
VLLM_DEFAULT_ONLY = {
    "pipeline_parallel_size": 1,
    "tokenizer_mode": "auto",
    "tokenizer_revision": None,
    "cpu_offload_gb": 0,
    "model_impl": "auto",
}
# vLLM keywords polymodal takes with nothing to do (what it does instead), logged when given.
VLLM_NO_EFFECT = {
    "swap_space": "preempted requests are recomputed, never swapped to the CPU (as vLLM v1)",
    "max_seq_len_to_capture": "CUDA graphs serve every context length",
    "disable_custom_all_reduce": "tensor parallelism uses NCCL's all-reduce",
    "disable_log_stats": "polymodal logs no periodic stats",
    "max_parallel_loading_workers": "the checkpoint loads in one pass",
    "long_prefill_token_threshold": "long prompts are split by the step's token budget",
    "max_num_partial_prefills": "long prompts are split by the step's token budget",
    "cuda_graph_sizes": "decode graphs are captured for every batch size up to the graph limit",
    "compilation_config": "polymodal runs its own kernels and CUDA graphs, not torch.compile",
}
# vLLM keywords with a polymodal effect under another name.
VLLM_DTYPES = {"half": "float16", "float": "float32"}
# vLLM keywords handled one by one below: enforce_eager (-> cuda_graphs), tokenizer (only the
# model's own), num_gpu_blocks_override (-> num_kv_blocks), trust_remote_code (accepted:
# polymodal never runs code shipped with a checkpoint, so there is nothing to trust or refuse),
# enable_chunked_prefill (always on).
VLLM_KEYWORDS = ("enforce_eager", "tokenizer", "trust_remote_code", "enable_chunked_prefill",
                 "num_gpu_blocks_override")  # fmt: skip


def engine_config_kwargs(model: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """EngineConfig keywords from `LLM(...)`'s keywords; unknown or unsupported ones raise
    `InvalidInputError` naming every one of them."""
    out, unknown = {}, []
    for key, value in kwargs.items():
        if key in ENGINE_KEYWORDS:
            out[key] = VLLM_DTYPES.get(value, value) if key == "dtype" else value
        elif key == "enforce_eager":
            out["cuda_graphs"] = not value
        elif key == "num_gpu_blocks_override":  # vLLM's name for the KV pool's size
            out["num_kv_blocks"] = value
        elif key == "tokenizer":
            if value is not None and str(value) != str(model):
                raise InvalidInputError(
                    f"LLM(tokenizer={value!r}): a tokenizer other than the model's is not "
                    "supported; the checkpoint's own tokenizer is used"
                )
        elif key in VLLM_NO_EFFECT:
            logger.info("LLM(%s=%r) has no effect: %s", key, value, VLLM_NO_EFFECT[key])
        elif key == "enable_chunked_prefill":
            if value is False:
                raise InvalidInputError(
                    "LLM(enable_chunked_prefill=False) is not supported: polymodal always splits "
                    "long prompts across steps"
                )
        elif key in VLLM_DEFAULT_ONLY:
            if value != VLLM_DEFAULT_ONLY[key]:
                raise InvalidInputError(
                    f"LLM({key}={value!r}) is not supported by polymodal "
                    f"(only {VLLM_DEFAULT_ONLY[key]!r})"
                )
        elif key != "trust_remote_code":
            unknown.append(key)
    if unknown:
        known = sorted(ENGINE_KEYWORDS | set(VLLM_DEFAULT_ONLY) | set(VLLM_KEYWORDS)
                       | set(VLLM_NO_EFFECT))  # fmt: skip
        raise InvalidInputError(
            f"LLM() got unknown keyword(s) {', '.join(map(repr, unknown))}; "
            f"engine keywords are {', '.join(known)}"
        )
    return out


def generation_defaults(
    model_dir: Path, generation_config: str = "auto", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sampling defaults from generation_config.json, as vLLM reads them: temperature, top_p,
    top_k, min_p, repetition_penalty and max_new_tokens (-> max_tokens).

    `generation_config` is "auto" (the model's folder), "vllm" (none: SamplingParams' own
    defaults) or a folder holding a generation_config.json; `overrides` win over the file.
    """
    if generation_config == "vllm":
        raw: dict[str, Any] = {}
    else:
        folder = model_dir if generation_config == "auto" else Path(generation_config)
        path = folder / "generation_config.json"
        if generation_config != "auto" and not path.is_file():
            raise InvalidInputError(f"generation_config={generation_config!r}: no {path}")
        raw = json.loads(path.read_text()) if path.is_file() else {}
    defaults = {k: raw[k] for k in GENERATION_CONFIG_FIELDS if raw.get(k) is not None}
    if raw.get("max_new_tokens") is not None:
        defaults["max_tokens"] = raw["max_new_tokens"]
    for key, value in (overrides or {}).items():  # vLLM's override_generation_config
        defaults["max_tokens" if key == "max_new_tokens" else key] = value
    try:
        SamplingParams(**defaults)
    except InvalidInputError as exc:
        raise ModelLoadError(f"generation config of {model_dir}: {exc}") from None
    return defaults


MODALITY_LIMIT_KEYS = ("image", "video", "audio")  # limit_mm_per_prompt's keys


def mm_limits(limits: dict[str, int] | None) -> dict[str, int]:
    """`LLM(limit_mm_per_prompt=...)` checked: known modalities, ints >= 0."""
    limits = dict(limits or {})
    for key, value in limits.items():
        if key not in MODALITY_LIMIT_KEYS:
            raise InvalidInputError(
                f"limit_mm_per_prompt[{key!r}]: unknown modality; use {list(MODALITY_LIMIT_KEYS)}"
            )
        if not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"limit_mm_per_prompt[{key!r}] must be an int >= 0")
    return limits


def check_mm_limits(mm_items: list, limits: dict[str, int]) -> None:
    """Refuse a processed prompt with more items of a modality than `limits` allows."""
    for modality, limit in limits.items():
        count = sum(item.modality == modality for item in mm_items)
        if count > limit:
            raise InvalidInputError(
                f"the prompt has {count} {modality} items but limit_mm_per_prompt allows {limit}"
            )
