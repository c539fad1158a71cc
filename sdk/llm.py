"""`LLM`: the offline, vLLM-style API over one engine (text and multimodal prompts)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

from PIL import Image

from polymodal.feeder import PROCESS_WORKERS, run_prompts
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.errors import InvalidInputError, PolymodalError
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

    def __init__(self, model: str, *, warmup: bool | None = None, **engine_kwargs: Any):
        """`engine_kwargs` are `EngineConfig` fields. `warmup` (default: on CUDA) runs one
        request of each kind the model takes while it loads (`warm_up`)."""
        self.engine = Engine(model, EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        cls = processor_class(self.model_config.architecture)
        model_dir = self.model_config.model_dir
        self.processor = cls.from_pretrained(model_dir) if cls else TextProcessor(self.tokenizer)
        self.warmup_seconds = 0.0
        if warmup if warmup is not None else self.engine.device.type == "cuda":
            self.warmup_seconds = self.warm_up()

    def warm_up(self) -> float:
        """Run one short request of each kind the model takes (text; a 448x448 JPEG, twice, and
        a video for a multimodal model) through the whole path, so that what compiles,
        captures or allocates on first use (Triton kernels, the tower's CUDA graph of that
        layout, cuBLAS plans, the pinned ring, the JPEG decoder, the chat template) does it
        now and the first user request is as fast as the tenth. Returns the seconds it took."""
        start = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        first = max(0, min(100, self.model_config.vocab_size - 16))
        prompts: list[Any] = [list(range(first, first + 16))]  # token ids: no tokenizer needed
        if self.is_multimodal and self.tokenizer is not None:
            # an encoded file, as users send: the decoder plugins load on first use (~70 ms)
            buffer = io.BytesIO()
            Image.new("RGB", (448, 448), (120, 60, 200)).save(buffer, format="JPEG")
            picture = buffer.getvalue()
            frames = [Image.new("RGB", (224, 224), (i * 40, 90, 30)) for i in range(4)]
            # the image twice: a tower with CUDA graphs captures a layout on its second call
            image = {"type": "image", "image": picture}
            for part in (image, image, {"type": "video", "video": frames}):
                content = [part, {"type": "text", "text": "Warm up."}]
                prompts.append([{"role": "user", "content": content}])
        for prompt in prompts:  # one at a time: each kind runs as a first request would
            try:
                self.generate(prompt, params)
            except InvalidInputError:  # this model has no chat template: text alone then
                continue
        return time.perf_counter() - start

    @property
    def is_multimodal(self) -> bool:
        return not isinstance(self.processor, TextProcessor)

    def process(self, prompt: Any) -> ProcessedPrompt:
        """Turn one prompt (any accepted form) into token ids, positions and media items.

        Media tensors are moved to the model's device here, so a caller that processes on a
        worker thread overlaps that copy with the engine's work.
        """
        processed = self._process(prompt)
        stage = getattr(self.engine.runner.model, "stage", None)
        if stage is not None and processed.mm_items:
            stage(processed.mm_items)
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

        Prompts are processed on worker threads while the engine runs the ones already
        queued (`feeder.run_prompts`). A bad prompt raises a PolymodalError naming its index,
        and every request of this call still in the engine is aborted first.
        """
        batch = _as_batch(prompts)
        params = _params_list(sampling_params, len(batch))
        results: list[RequestOutput | None] = [None] * len(batch)
        items = ((i, prompt, sp) for i, (prompt, sp) in enumerate(zip(batch, params)))
        workers = PROCESS_WORKERS if len(batch) > 1 else 0  # one prompt: no thread hand-off
        with closing(run_prompts(self, items, workers=workers)) as finished:
            for done in finished:
                if isinstance(done.error, PolymodalError):
                    raise type(done.error)(f"prompt {done.key}: {done.error}") from done.error
                if done.error is not None:
                    raise done.error
                results[done.key] = done.output
        return results

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
