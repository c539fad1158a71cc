"""New weights for a running engine, in place (an RL trainer pushing its policy, as vLLM users
call the model's `load_weights`), and dropping what the old weights computed: the prefix
cache's KV blocks and the encoder cache's media embeddings (`reset_prefix_cache`).

The tensors are copied into the existing parameters (the same memory), so captured CUDA graphs
replay with the new weights; derived copies are rebuilt in place by the modules' `post_load`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from polymodal.llm_core.errors import InvalidInputError


def reset_prefix_cache(engine) -> bool:
    """vLLM's `reset_prefix_cache`: forget every cached KV block and encoder output. False, and
    nothing forgotten, while requests run (their blocks are in use)."""
    if engine.has_unfinished():
        return False
    engine.scheduler.kv.reset_prefix_cache()
    engine.runner.encoder_cache.clear()
    return True


def load_weights(engine, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy `(name, tensor)` pairs, named as in the checkpoint (HF names), into the model: a
    complete set (missing or unexpected names raise `ModelLoadError` naming them, after the
    others were copied: load a whole set again; an iterator loads one tensor at a time), then
    `reset_prefix_cache`. Not while requests run, not for a quantized model nor a
    tensor-parallel one (`InvalidInputError`)."""
    if engine.has_unfinished():
        raise InvalidInputError("load_weights while requests run: let them finish or abort them")
    if engine.sleeping is not None and "weights" in engine.sleeping.asleep:
        raise InvalidInputError("load_weights while the weights sleep: wake_up(['weights']) first")
    if engine.executor is not None:
        raise InvalidInputError("load_weights is not supported with tensor_parallel_size > 1")
    if engine.config.quantization is not None or engine.model_config.quantization_config:
        raise InvalidInputError("load_weights is not supported for a quantized model")
    try:
        with torch.no_grad():
            engine.runner.model.load_weights(weights, source="load_weights")
    finally:  # a failed load may have replaced some weights already: nothing cached stays
        reset_prefix_cache(engine)
