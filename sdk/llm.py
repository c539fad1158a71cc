"""`LLM`: the offline, vLLM-style API over one engine (text and multimodal prompts)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.interfaces import supports_multimodal
from polymodal.llm_core.outputs import RequestOutput
from polymodal.llm_core.registry import processor_class
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.text import TextProcessor
from polymodal.processors.types import ProcessedPrompt

# Per-request media options a prompt dict may carry.
MEDIA_OPTIONS = ("min_pixels", "max_pixels", "fps", "num_frames")


class LLM:
    """Load a model once; generate for many prompts with continuous batching.

    >>> llm = LLM("Qwen/Qwen2.5-VL-7B-Instruct")
    >>> llm.generate({"prompt": "Hi", "images": []}, SamplingParams(max_tokens=8))

    A prompt is a string, a list of token ids, OpenAI-style chat `messages` (a list of
    {"role", "content"} dicts), or a dict with one of `prompt` / `prompt_token_ids` /
    `messages` plus optional `images`, `videos` and media options (`max_pixels`, `fps`, ...).
    """

    def __init__(self, model: str, **engine_kwargs: Any):
        self.engine = Engine(model, EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        cls = processor_class(self.model_config.architecture)
        model_dir = self.model_config.model_dir
        self.processor = cls.from_pretrained(model_dir) if cls else TextProcessor(self.tokenizer)

    @property
    def is_multimodal(self) -> bool:
        return not isinstance(self.processor, TextProcessor)

    def process(self, prompt: Any) -> ProcessedPrompt:
        """Turn one prompt (any accepted form) into token ids, positions and media items.

        Media tensors are moved to the model's device here, so a caller that processes on a
        worker thread overlaps that copy with the engine's work.
        """
        processed = self._process(prompt)
        model = self.engine.runner.model
        if processed.mm_items and supports_multimodal(model):
            model.stage(processed.mm_items)
        return processed

    def _process(self, prompt: Any) -> ProcessedPrompt:
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        if isinstance(prompt, str):
            return self.processor.process(prompt=prompt)
        if _is_token_ids(prompt):
            if self.is_multimodal:
                return self.processor.process_tokens(list(prompt), [])
            return ProcessedPrompt(list(prompt), None, 0)
        if _is_messages(prompt):
            return self.processor.process(messages=list(prompt))
        if isinstance(prompt, dict):
            options = {k: prompt[k] for k in MEDIA_OPTIONS if prompt.get(k) is not None}
            media = {"images": prompt.get("images") or (), "videos": prompt.get("videos") or ()}
            if "messages" in prompt:
                return self.processor.process(messages=prompt["messages"], **options)
            if "prompt_token_ids" in prompt:
                return self._process(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.processor.process(prompt=prompt["prompt"], **media, **options)
        raise InvalidInputError(
            f"unsupported prompt of type {type(prompt).__name__}: pass a string, token ids, "
            "chat messages, or a dict with 'prompt', 'prompt_token_ids' or 'messages'"
        )

    def submit(
        self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Process one prompt and queue it in the engine; returns its request id."""
        p = self.process(prompt)
        return self.engine.add_request(
            p.token_ids, params, request_id, p.positions, p.mrope_delta, p.mm_items
        )

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; results in input order.

        Every prompt is checked before any runs: a bad one raises a PolymodalError naming its
        index, and nothing is queued.
        """
        batch = _as_batch(prompts)
        params = _params_list(sampling_params, len(batch))
        processed = []
        for i, prompt in enumerate(batch):
            try:
                processed.append(self.process(prompt))
            except PolymodalError as exc:
                raise type(exc)(f"prompt {i}: {exc}") from exc
        ids = [self.submit(p, sp) for p, sp in zip(processed, params)]
        return self.run(ids)

    def run(self, request_ids: list[str]) -> list[RequestOutput]:
        """Step the engine until `request_ids` finish; their final outputs, in order.

        If a step raises (out of memory, a broken kernel), every request of this call is
        aborted before the error propagates, so the engine is left clean for the next call.
        """
        try:
            final = self.engine.run_until_done()
        except BaseException:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        return [final[i] for i in request_ids]

    def chat(self, messages: Any, sampling_params: SamplingParams | None = None):
        """`generate` for one conversation (list of messages) or a list of conversations."""
        if _is_messages(messages):
            return self.generate([messages], sampling_params)
        return self.generate(list(messages), sampling_params)

    def stream(self, prompt: Any, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it (deltas included).

        Closing the iterator early aborts the request and frees its KV blocks.
        """
        request_id = self.submit(prompt, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(request_id)

    # ---- pooling models (vLLM's names; see llm_pooling.py) --------------------------------
    def encode(self, prompts: Any, pooling_params=None) -> list:
        """A pooling model's raw head output per prompt (`PoolingRequestOutput.outputs.data`)."""
        from polymodal.llm_pooling import pool

        return pool(self, prompts, pooling_params, "encode")

    def embed(self, prompts: Any, pooling_params=None) -> list:
        """An embedding model's vector per prompt (`EmbeddingRequestOutput.outputs.embedding`)."""
        from polymodal.llm_pooling import as_embedding, pool

        return [as_embedding(o) for o in pool(self, prompts, pooling_params, "embed")]

    def classify(self, prompts: Any, pooling_params=None) -> list:
        """A classifier's class probabilities per prompt (`...outputs.probs`)."""
        from polymodal.llm_pooling import as_classification, pool

        return [as_classification(o) for o in pool(self, prompts, pooling_params, "classify")]

    def reward(self, prompts: Any, pooling_params=None) -> list:
        """A reward model's reward per prompt (`PoolingRequestOutput.outputs.data`: `[1]` for an
        outcome reward, `[num_steps, 2]` step probabilities for a process reward model)."""
        from polymodal.llm_pooling import pool

        return pool(self, prompts, pooling_params, "reward")


def _is_token_ids(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, int) for t in x)


def _is_messages(x: Any) -> bool:
    return (
        isinstance(x, (list, tuple))
        and bool(x)
        and all(isinstance(m, dict) and "role" in m for m in x)
    )


def _as_batch(prompts: Any) -> list:
    if isinstance(prompts, (str, dict, ProcessedPrompt)) or _is_token_ids(prompts):
        return [prompts]
    if _is_messages(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise InvalidInputError(f"prompts must be a prompt or a list of prompts, got {prompts!r:.80}")


def _params_list(params, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise InvalidInputError(f"{len(params)} sampling params given for {n} prompts")
    return params
