"""`LLM`: the offline, vLLM-style API over one engine (text and multimodal prompts)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

import torch
from PIL import Image

from polymodal.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from polymodal.feeder import PROCESS_WORKERS, run_prompts
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.interfaces import supports_multimodal
from polymodal.llm_core.lora import LoRARequest
from polymodal.llm_core.outputs import RequestOutput
from polymodal.llm_core.registry import processor_class
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_options import engine_config_kwargs, generation_defaults
from polymodal.llm_prompts import (
    MEDIA_OPTIONS,
    is_messages,
    is_token_ids,
    media_options,
    process_prompt,
)
from polymodal.processors.text import TextProcessor
from polymodal.processors.types import ProcessedPrompt

MODALITY_LIMIT_KEYS = ("image", "video", "audio")


class LLM:
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
    (default media options: min_pixels, max_pixels, fps, num_frames); `limit_mm_per_prompt`
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
        limit_mm_per_prompt: dict[str, int] | None = None,
        warmup: bool | None = None,
        **kwargs: Any,
    ):
        config = engine_config_kwargs(model, kwargs)
        self.limit_mm_per_prompt = _check_limits(limit_mm_per_prompt)
        if "seed" in kwargs:  # as vLLM: the global stream of requests without their own seed
            torch.manual_seed(kwargs["seed"])
        self.engine = Engine(model, EngineConfig(**config))
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.model_name = f"{model!r} ({self.model_config.architecture})"
        cls = processor_class(self.model_config.architecture)
        model_dir = self.model_config.model_dir
        self.processor = cls.from_pretrained(model_dir) if cls else TextProcessor(self.tokenizer)
        allowed = tuple(getattr(self.processor, "MEDIA_OPTIONS", MEDIA_OPTIONS))
        self.media_defaults = media_options(
            mm_processor_kwargs, "LLM(mm_processor_kwargs=...)", allowed
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
        """Run one short request of each kind the model takes (text, sampled and greedy; two
        448x448 JPEGs and a video for a multimodal model) through the whole path, so that what
        compiles, captures or allocates on first use (Triton kernels, the tower's CUDA graph of
        that layout, the sampler's kernels, cuBLAS plans, the pinned ring, the JPEG decoder,
        the chat template) does it now and the first user request is as fast as the tenth.
        Returns the seconds it took."""
        start = time.perf_counter()
        if self.engine.task != "generate":  # pooling models: no sampling path to warm
            return 0.0
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        first = max(0, min(100, self.model_config.vocab_size - 16))
        ids = list(range(first, first + 16))  # token ids: no tokenizer needed
        # the sampling path too (softmax, top-k/p, a seeded draw): greedy rows take the argmax
        # inside the decode graph, and the first sampled request paid ~60 ms of CUDA's lazy
        # kernel loading (H200, first Pipeline call at the default temperature)
        sampled = SamplingParams(
            temperature=1.0, top_p=0.9, top_k=50, seed=0, max_tokens=2, ignore_eos=True
        )
        self.generate(ids, sampled, use_tqdm=False)
        prompts: list[Any] = [ids]
        if self.is_multimodal and self.tokenizer is not None:
            # encoded files, as users send: the decoder plugins load on first use. Two of one
            # size, different content (the same bytes would hit the encoder cache): a tower
            # with CUDA graphs captures a layout on its second call
            for colour in ((120, 60, 200), (30, 160, 90)):
                buffer = io.BytesIO()
                Image.new("RGB", (448, 448), colour).save(buffer, format="JPEG")
                image = {"type": "image", "image": buffer.getvalue()}
                prompts.append(
                    [{"role": "user", "content": [image, {"type": "text", "text": "Warm up."}]}]
                )
            frames = [Image.new("RGB", (224, 224), (i * 40, 90, 30)) for i in range(4)]
            video = {"type": "video", "video": frames}
            prompts.append(
                [{"role": "user", "content": [video, {"type": "text", "text": "Warm up."}]}]
            )
        for prompt in prompts:  # one at a time: each kind runs as a first request would
            try:
                self.generate(prompt, params, use_tqdm=False)
            except InvalidInputError:  # this model has no chat template: text alone then
                continue
        return time.perf_counter() - start

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

        Media tensors are moved to the model's device here (`stage`), so a caller that
        processes on a worker thread overlaps that copy with the engine's work.
        """
        processed = process_prompt(self.processor, prompt, self.media_defaults, self.model_name)
        if self.limit_mm_per_prompt:
            for modality, limit in self.limit_mm_per_prompt.items():
                count = sum(item.modality == modality for item in processed.mm_items)
                if count > limit:
                    raise InvalidInputError(
                        f"the prompt has {count} {modality} items but limit_mm_per_prompt "
                        f"allows {limit}"
                    )
        model = self.engine.runner.model
        if stage and processed.mm_items and supports_multimodal(model):
            model.stage(processed.mm_items)
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
        return self.engine.add_request(
            p.token_ids, params, request_id, p.positions, p.mrope_delta, p.mm_items, grammar,
            lora_request=lora_request,
        )  # fmt: skip

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
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; results in input order.

        `lora_request` (vLLM's keyword; the engine needs `enable_lora=True`): one adapter for
        every prompt, or a list with one per prompt (None: the base model). Requests with
        different adapters run batched in the same steps.

        Prompts are processed on worker threads while the engine runs the ones already
        queued (`feeder.run_prompts`). A bad prompt raises a PolymodalError naming its index,
        and every request of this call still in the engine is aborted first. `use_tqdm` shows
        a progress bar of finished prompts.
        """
        batch = _as_batch(prompts)
        params = _params_list(sampling_params or self.get_default_sampling_params(), len(batch))
        loras = _lora_list(lora_request, len(batch))
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
        processed = [self.process(p) for p in _as_batch(prompts)]
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


def _check_limits(limits: dict[str, int] | None) -> dict[str, int]:
    limits = dict(limits or {})
    for key, value in limits.items():
        if key not in MODALITY_LIMIT_KEYS:
            raise InvalidInputError(
                f"limit_mm_per_prompt[{key!r}]: unknown modality; use {list(MODALITY_LIMIT_KEYS)}"
            )
        if not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"limit_mm_per_prompt[{key!r}] must be an int >= 0")
    return limits


def _as_batch(prompts: Any) -> list:
    if isinstance(prompts, (str, dict, ProcessedPrompt)) or is_token_ids(prompts):
        return [prompts]
    if is_messages(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise InvalidInputError(f"prompts must be a prompt or a list of prompts, got {prompts!r:.80}")


def _params_list(params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidInputError(f"{len(params)} sampling params given for {n} prompts")
    return params


def _lora_list(lora_request, n: int) -> list:
    """One adapter (or None) per prompt from `generate(lora_request=...)`."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    if not isinstance(lora_request, (list, tuple)):
        raise InvalidInputError(
            f"lora_request must be a LoRARequest or a list of them, got "
            f"{type(lora_request).__name__}"
        )
    if len(lora_request) != n:
        raise InvalidInputError(f"{len(lora_request)} lora requests given for {n} prompts")
    return list(lora_request)
