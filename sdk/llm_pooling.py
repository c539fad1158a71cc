"""`LLM.encode` / `embed` / `classify` / `reward` (vLLM's names): pooling requests through
the engine of a pooling model (registry task classify, reward or embed)."""

from __future__ import annotations

from typing import Any

from polymodal.llm_core.errors import PolymodalError
from polymodal.llm_core.pooling import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingParams,
    PoolingRequestOutput,
)


def pool(llm, prompts: Any, params: PoolingParams | None, task: str) -> list[PoolingRequestOutput]:
    """Run `prompts` (one or a list: strings, token ids, or dicts with `prompt` /
    `prompt_token_ids` and optional `token_type_ids`) as pooling requests of `task`; outputs
    in input order. Every prompt is checked before any runs (errors name its index)."""
    from polymodal.llm import _as_batch

    params = params or PoolingParams()
    params = PoolingParams(task, params.normalize, params.activation, params.step_tag_id)
    batch = _as_batch(prompts)
    queued = []
    for i, prompt in enumerate(batch):
        try:
            token_types = prompt.get("token_type_ids") if isinstance(prompt, dict) else None
            processed = llm.process(prompt)
            queued.append((processed.token_ids, token_types))
        except PolymodalError as exc:
            raise type(exc)(f"prompt {i}: {exc}") from exc
    ids = []
    try:
        for token_ids, token_types in queued:
            ids.append(llm.engine.add_request(token_ids, params, token_type_ids=token_types))
    except BaseException:
        for request_id in ids:
            llm.engine.abort(request_id)
        raise
    return llm.run(ids)


def as_classification(out: PoolingRequestOutput) -> ClassificationRequestOutput:
    probs = ClassificationOutput(out.outputs.data.flatten().tolist())
    return ClassificationRequestOutput(out.request_id, out.prompt_token_ids, probs)


def as_embedding(out: PoolingRequestOutput) -> EmbeddingRequestOutput:
    vector = EmbeddingOutput(out.outputs.data.flatten().tolist())
    return EmbeddingRequestOutput(out.request_id, out.prompt_token_ids, vector)
