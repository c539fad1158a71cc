"""`LLM`: the offline, vLLM-style API over one engine (text and multimodal prompts).

Its pieces: llm_prompts.py (the prompt forms, one-or-a-list arguments), llm_options.py (the
keywords), llm_warmup.py (the load-time warm-up), llm_pooling.py (the pooling methods).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

import torch

from polymodal.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from polymodal.feeder import PROCESS_WORKERS, run_prompts
from polymodal.llm_controls import EngineControls
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.interfaces import supports_multimodal
from polymodal.llm_core.lora import LoRARequest
from polymodal.llm_core.outputs import RequestOutput
from polymodal.llm_core.registry import processor_class
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_options import (
    check_mm_limits,
    engine_config_kwargs,
    generation_defaults,
    mm_limits,
)
from polymodal.llm_prompts import (
    MEDIA_OPTIONS,
    as_batch,
    io_options,
    is_messages,
    loras_per_prompt,
    media_options,
    merged_options,
    params_per_prompt,
    process_prompt,
    with_priority,
)
from polymodal.llm_warmup import warm_up
from polymodal.metrics_reader import EngineMetrics
from polymodal.processors.text import TextProcessor
from polymodal.processors.types import ProcessedPrompt


class LLM(EngineControls):
    """Load a model once; generate for many prompts with continuous batching.

    >>> llm = LLM("Qwen/Qwen2.5-VL-7B-Instruct", max_model_len=8192)
    >>> llm.generate({"prompt": "<|vision_start|><|image_pad|><|vision_end|>What is this?",
    ...               "multi_modal_data": {"image": img}}, SamplingParams(max_tokens=64))
    >>> llm.chat([{"role": "user", "content": "Hi"}])

    Prompts: a string, token ids, chat messages, or a dict (vLLM's `prompt` /
    `prompt_token_ids` + `multi_modal_data` + `mm_processor_kwargs`, or `messages` with chat
    template options); see `polymodal.llm_prompts`.

    Keywords: the `EngineConfig` fields (dtype, device, max_model_len, gpu_memory_utilization,
    max_num_seqs, ...) and vLLM's names for them (`enforce_eager`, ...); `allow_http` lets
    media be fetched from http(s) URLs; `generation_config` ("auto": the model's
    generation_config.json supplies default sampling params when `sampling_params` is None,
    "vllm": it does not, or a folder); `override_generation_config`; `mm_processor_kwargs`
    (default media options: min_pixels, max_pixels, fps, num_frames; vLLM's `media_io_kwargs`
    `{"video": {"num_frames": N, "fps": F}}` sets the same two); `limit_mm_per_prompt`
    ({"image": 4, "video": 1}). An unknown keyword raises an error naming it.
    """

    def __init__(
        self,
        model: str,
        *,
        allow_http: bool = False,
        generation_config: str = "auto",
        override_generation_config: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        media_io_kwargs: dict[str, dict[str, Any]] | None = None,
        limit_mm_per_prompt: dict[str, int] | None = None,
        warmup: bool | None = None,
        **kwargs: Any,
    ):
        config = engine_config_kwargs(model, kwargs)
        self.limit_mm_per_prompt = mm_limits(limit_mm_per_prompt)
        if "seed" in kwargs:  # as vLLM: the global stream of requests without their own seed
            torch.manual_seed(kwargs["seed"])
        self.engine = Engine(model, EngineConfig(**config))
        self.metrics = EngineMetrics()  # `get_metrics` (every finished request)
        self.engine.on_finished = self.metrics.observe
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.model_name = f"{model!r} ({self.model_config.architecture})"
        cls = processor_class(self.model_config.architecture)
        model_dir = self.model_config.model_dir
        self.processor = cls.from_pretrained(model_dir) if cls else TextProcessor(self.tokenizer)
        allowed = tuple(getattr(self.processor, "MEDIA_OPTIONS", MEDIA_OPTIONS))
        self.media_defaults = merged_options(
            media_options(mm_processor_kwargs, "LLM(mm_processor_kwargs=...)", allowed),
            io_options(media_io_kwargs, "LLM(media_io_kwargs=...)", allowed),
            "LLM(mm_processor_kwargs=..., media_io_kwargs=...)",
        )
        if allow_http:
            if not hasattr(self.processor, "allow_http"):
                raise InvalidInputError("allow_http: this model takes no media")
            self.processor.allow_http = True
        self.default_sampling = generation_defaults(
            model_dir, generation_config, override_generation_config
        )
        self.warmup_seconds = 0.0
        if warmup if warmup is not None else self.engine.device.type == "cuda":
            self.warmup_seconds = self.warm_up()

    def warm_up(self) -> float:
        """Run one short request of each kind the model takes (`polymodal.llm_warmup`), so the
        first user request is as fast as the tenth; returns the seconds it took."""
        return warm_up(self)

    @property
    def is_multimodal(self) -> bool:
        return not isinstance(self.processor, TextProcessor)

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (transformers)."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's rule: used
        when `generate` / `chat` get no sampling params)."""
        return SamplingParams(**self.default_sampling)

    def process(self, prompt: Any, stage: bool = True) -> ProcessedPrompt:
        """Turn one prompt (any accepted form) into token ids, positions and media items.

        Media tensors are moved to the model's device here (`stage_ahead`; not those whose
        encoder output is cached), so a caller that processes on a worker thread overlaps that
        copy with the engine's work.
        """
        processed = process_prompt(self.processor, prompt, self.media_defaults, self.model_name)
        check_mm_limits(processed.mm_items, self.limit_mm_per_prompt)
        return self.stage(processed) if stage else processed

    def stage(self, processed: ProcessedPrompt) -> ProcessedPrompt:
        """Start moving `processed`'s media tensors to the model's device (`stage_ahead`: not
        those whose encoder output is cached); returns it."""
        model = self.engine.runner.model
        if processed.mm_items and supports_multimodal(model):
            model.stage_ahead(processed.mm_items)
        return processed

    def submit(
        self,
        prompt: Any,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        grammar: Any = None,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Process one prompt and queue it in the engine; returns its request id.

        `grammar` is `params.structured_outputs` compiled ahead (`engine.compile_grammar`);
        `lora_request` runs it with that adapter.
        """
        p = self.process(prompt)
        return self.engine.add_processed(p, params, request_id, grammar, lora_request)

    def prepare(self, prompt: Any, params: SamplingParams) -> tuple[ProcessedPrompt, Any]:
        """`process(prompt)` plus the request's compiled grammar (None without structured
        output): everything a worker thread does before `Engine.add_request`."""
        return self.process(prompt), self.engine.compile_grammar(params)

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; results in input order.

        `priority` (vLLM's): one per prompt, lower first, for an engine built with
        `scheduling_policy="priority"`.

        `lora_request` (vLLM's keyword; the engine needs `enable_lora=True`): one adapter for
        every prompt, or a list with one per prompt (None: the base model). Requests with
        different adapters run batched in the same steps.

        Prompts are processed on worker threads while the engine runs the ones already
        queued (`feeder.run_prompts`). A bad prompt raises a PolymodalError naming its index,
        and every request of this call still in the engine is aborted first. `use_tqdm` shows
        a progress bar of finished prompts.
        """
        batch = as_batch(prompts)
        if priority is not None:
            if len(priority) != len(batch):
                raise InvalidInputError(
                    f"priority has {len(priority)} values for {len(batch)} prompts"
                )
            batch = [with_priority(p, value) for p, value in zip(batch, priority)]
        params = params_per_prompt(
            sampling_params or self.get_default_sampling_params(), len(batch)
        )
        loras = loras_per_prompt(lora_request, len(batch))
        results: list[RequestOutput | None] = [None] * len(batch)
        items = (
            (i, prompt, sp, lora) for i, (prompt, sp, lora) in enumerate(zip(batch, params, loras))
        )
        workers = PROCESS_WORKERS if len(batch) > 1 else 0  # one prompt: no thread hand-off
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batch), desc="Processed prompts", unit="prompt")
        try:
            with closing(run_prompts(self, items, workers=workers)) as finished:
                for done in finished:
                    if isinstance(done.error, PolymodalError):
                        raise type(done.error)(f"prompt {done.key}: {done.error}") from done.error
                    if done.error is not None:
                        raise done.error
                    results[done.key] = done.output
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results

    def run(self, request_ids: list[str], use_tqdm: bool = False) -> list[RequestOutput]:
        """Step the engine until `request_ids` finish; their final outputs, in order.

        If a step raises (out of memory, a broken kernel), every request of this call is
        aborted before the error propagates, so the engine is left clean for the next call.
        """
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", unit="prompt")
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step(finished_only=True):
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[i] for i in request_ids]

    def chat(
        self,
        messages: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """`generate` for one conversation (a list of messages) or a list of conversations,
        with vLLM's chat keywords (template, tools, template variables, media options,
        `lora_request`)."""
        conversations = [messages] if is_messages(messages) else list(messages)
        options = {
            "chat_template": chat_template,
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "tools": tools,
            "chat_template_kwargs": chat_template_kwargs,
            "mm_processor_kwargs": mm_processor_kwargs,
        }
        prompts = [{"messages": list(conv), **options} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def beam_search(
        self, prompts: Any, params: BeamSearchParams, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`: the `params.beam_width` best beams of each prompt, found
        as transformers' `generate(num_beams=...)` finds them (see `polymodal.beam_search`).
        `use_tqdm` shows the steps (all prompts advance together)."""
        processed = [self.process(p) for p in as_batch(prompts)]
        return beam_search(self, processed, params, use_tqdm)

    def stream(
        self,
        prompt: Any,
        params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it (deltas included).

        Closing the iterator early aborts the request and frees its KV blocks.
        """
        params = params or self.get_default_sampling_params()
        request_id = self.submit(prompt, params, lora_request=lora_request)
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
    # `truncate_prompt_tokens` (vLLM's keyword): a longer prompt keeps k tokens (-1:
    # max_model_len), cut as the tokenizer truncates (`PoolingParams.truncate_prompt_tokens`)
    def encode(
        self, prompts: Any, pooling_params=None, *, truncate_prompt_tokens=None, pooling_task=None
    ) -> list:
        """A pooling model's raw head output per prompt (`PoolingRequestOutput.outputs.data`);
        `pooling_task` (vLLM's keyword, else `pooling_params.task`, else "encode") picks
        another output: "token_embed" / "token_classify" (bge-m3's ColBERT vectors / lexical
        weights, one row per token), or the model's own task."""
        from polymodal.llm_pooling import pool

        task = pooling_task or (pooling_params.task if pooling_params else None) or "encode"
        return pool(self, prompts, pooling_params, task, truncate_prompt_tokens)

    def embed(self, prompts: Any, pooling_params=None, *, truncate_prompt_tokens=None) -> list:
        """An embedding model's vector per prompt (`EmbeddingRequestOutput.outputs.embedding`).
        Prompts may be chat messages (the chat template renders them)."""
        from polymodal.llm_pooling import as_embedding, pool

        outs = pool(self, prompts, pooling_params, "embed", truncate_prompt_tokens)
        return [as_embedding(o) for o in outs]

    def classify(self, prompts: Any, pooling_params=None, *, truncate_prompt_tokens=None) -> list:
        """A classifier's class probabilities per prompt (`...outputs.probs`)."""
        from polymodal.llm_pooling import as_classification, pool

        outs = pool(self, prompts, pooling_params, "classify", truncate_prompt_tokens)
        return [as_classification(o) for o in outs]

    def reward(self, prompts: Any, pooling_params=None, *, truncate_prompt_tokens=None) -> list:
        """A reward model's reward per prompt (`PoolingRequestOutput.outputs.data`: `[1]` for an
        outcome reward, `[num_steps, 2]` step probabilities for a process reward model)."""
        from polymodal.llm_pooling import pool

        return pool(self, prompts, pooling_params, "reward", truncate_prompt_tokens)

    def score(
        self, text_1: Any, text_2: Any, /, *, pooling_params=None, truncate_prompt_tokens=None
    ) -> list:
        """vLLM's `LLM.score` for cross-encoders (a BERT sequence classifier with one label):
        the relevance of each pair, `ScoringRequestOutput.outputs.score`; for an embedding
        model, the cosine similarity of the two texts' embeddings. One `text_1` against
        one or a list of `text_2`, or two lists of the same length (pairwise). Each pair is
        tokenized as the tokenizer pairs texts (BERT: `[CLS] a [SEP] b [SEP]`, segment ids 0
        then 1). Another model raises, naming it."""
        from polymodal.llm_pooling import score

        return score(self, text_1, text_2, pooling_params, truncate_prompt_tokens)
