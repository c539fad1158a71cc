"""The engine: add_request / step / abort, over scheduler + runner.

One `step()` = schedule -> run encoders and decoder on the flat batch -> sample ->
detokenize and check stops -> one RequestOutput per request that made progress. A request
with `n > 1` runs as n sequences (seeds `seed + i`) reported together under one id: a
`RequestGroup` (request_group.py: the sequences, token booking, outputs). What a request must
pass before it is queued lives in request_checks.py.
"""

from __future__ import annotations

import gc
import time
from itertools import count
from typing import Any

from polymodal.llm_core.engine_config import EngineConfig, build_engine_parts
from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.interfaces import supports_multimodal
from polymodal.llm_core.outputs import RequestOutput
from polymodal.llm_core.pooling import check_pooling_request
from polymodal.llm_core.pooling_requests import (
    PoolingQueue,
    check_pooling_batch,
    paused_gc,
    queue_pooling_prompt,
)
from polymodal.llm_core.pooling_step import PoolingFlight, pooling_engine_step
from polymodal.llm_core.prompt_embeds import check_given_embeds, truncate_embeds
from polymodal.llm_core.request_checks import (
    atomic_spans,
    bad_words_token_ids,
    check_priority,
    check_request,
    media_cross_ranges,
    truncate_prompt,
)
from polymodal.llm_core.request_group import RequestGroup
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_core.speculative import Speculation
from polymodal.llm_core.structured_output import Grammars


class Engine:
    """Continuous-batching engine over one model. Not thread-safe: drive it from one thread."""

    def __init__(self, model: str, config: EngineConfig | None = None, **kwargs):
        config = config or EngineConfig(**kwargs)
        # tensor_parallel_size > 1: worker processes for ranks 1..N-1 (llm_core/executor.py);
        # one rank has none and runs in this process as it always did
        self.executor = None
        if config.tensor_parallel_size != 1:
            from polymodal.llm_core.executor import TPExecutor

            self.executor = TPExecutor.start(model, config)
        try:
            parts = build_engine_parts(model, config, self.executor)
        except BaseException:
            self.close()
            raise
        self.config = parts.config
        self.model_config = parts.model_config
        self.tokenizer = parts.tokenizer
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.max_model_len = parts.max_model_len
        self.device = parts.device
        self.capture_graphs = parts.capture_graphs
        self.sleeping = None  # sleep.Sleep while asleep (sleep mode)
        self.task = self.model_config.task  # generate, or a pooling task
        self._groups: dict[str, RequestGroup] = {}
        self._seq_to_group: dict[str, tuple[RequestGroup, int]] = {}
        self._ids = count()
        self._in_flight = None  # the launched step whose tokens are not read back yet
        self._pool_flight: PoolingFlight | None = None  # same, of a pooling step
        self.on_finished = None  # called with each finished request's output (get_metrics)
        self.grammars = Grammars(self.tokenizer, self.model_config, self.config.reasoning_parser)
        # pooling prompts queued but not yet requests: each step builds what it may admit
        self._pooling = PoolingQueue(self.max_model_len)
        overlap = self.config.async_scheduling
        self.async_scheduling = self.device.type == "cuda" if overlap is None else overlap
        # workers get each step's ids from the host batch: no device-resident ids to chain on
        self.async_scheduling = self.async_scheduling and self.executor is None
        # drafts follow each sequence's newest token: a step that drafts runs synchronously
        self.speculation = Speculation.start(
            self.config.speculative_config, self.task, self.model_config.vocab_size,
            self.runner.draft,
        )  # fmt: skip
        # What exists now lives as long as the engine: out of the cyclic GC's scans (they
        # would stall steps longer as the heap grows)
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is collected
        or the process exits). The engine cannot step afterwards."""
        if self.executor is not None:
            self.executor.shutdown()

    # ---- requests -----------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        positions: list[list[int]] | None = None,
        mrope_delta: int = 0,
        mm_items: list | None = None,
        grammar: Any = None,
        token_type_ids: list[int] | None = None,
        lora_request: Any = None,
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a tokenized prompt (with optional media slots); returns the request id.

        `lora_request` (a `LoRARequest`, `enable_lora`) runs it with that adapter, read and
        checked here (a bad one fails this request). `cache_salt` (vLLM's): prefix-cache blocks
        shared only within the salt. `priority`: lower first (`scheduling_policy="priority"`).
        `grammar` is `params.structured_outputs` already compiled (`compile_grammar`, e.g. on
        a worker thread); without it the engine compiles it here. A pooling model takes
        `PoolingParams` (and, for BERT, optional `token_type_ids`).
        """
        if self.sleeping is not None:
            raise InvalidInputError("the engine is asleep (sleep mode): call wake_up() first")
        mc = self.model_config
        pooling = check_pooling_request(params, self.task, mc.architecture, mc.model_dir)
        params = pooling or params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._groups or request_id in self._pooling:
            raise InvalidInputError(f"request id {request_id!r} is already in use")
        embeds = check_given_embeds(self, mm_items, params)  # a prompt given as embeddings
        if pooling is not None:
            media = (positions, mrope_delta, mm_items)
            queue_pooling_prompt(self, request_id, prompt_token_ids, pooling, token_type_ids,
                                 media)  # fmt: skip
            return request_id
        if embeds is not None and params.truncate_prompt_tokens is not None:
            prompt_token_ids, mm_items = truncate_embeds(
                prompt_token_ids, embeds, params.truncate_prompt_tokens, self.max_model_len
            )
        elif params.truncate_prompt_tokens is not None:
            prompt_token_ids, positions, mrope_delta, mm_items = truncate_prompt(
                prompt_token_ids, positions, mrope_delta, mm_items or [],
                params.truncate_prompt_tokens, self.max_model_len,
            )  # fmt: skip
        if mm_items and supports_multimodal(self.runner.model) and embeds is None:
            # a long video as pieces, each within one step's encoder budget
            mm_items = self.runner.model.split_media(
                mm_items, self.scheduler.max_num_encoder_tokens
            )
        vocab = self.model_config.vocab_size
        embeddable = vocab + self.runner.model.extra_input_ids
        check_request(prompt_token_ids, params, self.max_model_len, vocab, embeddable,
                      self.config.max_logprobs)  # fmt: skip
        model, budget = self.runner.model, self.scheduler.max_num_batched_tokens
        atomic = atomic_spans(model, mm_items or [], budget)
        cross_specs = [s for s in self.scheduler.kv.specs if s.is_cross]
        cross_ranges = media_cross_ranges(
            model, cross_specs, self.model_config.architecture, mm_items or [],
            len(prompt_token_ids),
        )  # fmt: skip
        check_priority(priority, self.scheduler.policy)
        needs_text = params.stop or params.bad_words or params.structured_outputs
        if self.tokenizer is None and needs_text:
            raise InvalidInputError(
                "stop strings, bad_words and structured_outputs need a tokenizer "
                "(skip_tokenizer_init is set)"
            )
        if lora_request is None and hasattr(self.runner.model, "modality_adapter"):
            # the model's own adapter for the prompt's media (Phi-4-MM: vision / speech)
            adapter = self.runner.model.modality_adapter(mm_items or [])
            lora_request = getattr(self.runner.model, "adapter_requests", {}).get(adapter)
        if lora_request is not None:
            self.check_lora(lora_request)
        if params.structured_outputs is not None and grammar is None:
            grammar = self.compile_grammar(params)
        grammar = self.grammars.after_reasoning(grammar, prompt_token_ids)
        group = RequestGroup.sample(
            request_id, prompt_token_ids, params, self.tokenizer, self.device, grammar,
            mm_items or [],
            eos_token_ids=() if params.ignore_eos else tuple(self.model_config.eos_token_ids),
            positions=positions,
            mrope_delta=mrope_delta,
            atomic_spans=atomic,
            cross_ranges=cross_ranges,
            max_model_len=self.max_model_len,
            bad_words_ids=bad_words_token_ids(self.tokenizer, params.bad_words),
            lora_request=lora_request,
            cache_salt=cache_salt,
            priority=priority,
            prompt_embeds=embeds is not None,
        )  # fmt: skip
        return self._queue(group)

    def add_processed(
        self,
        prompt: Any,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        grammar: Any = None,
        lora_request: Any = None,
        token_type_ids: list[int] | None = None,
    ) -> str:
        """`add_request` of a `ProcessedPrompt` (ids, M-RoPE positions, media) passed whole."""
        return self.add_request(
            prompt.token_ids, params, request_id, prompt.positions, prompt.mrope_delta,
            prompt.mm_items, grammar, token_type_ids, lora_request, prompt.cache_salt,
            prompt.priority,
        )  # fmt: skip

    def add_requests(
        self,
        prompts: list[list[int]],
        params: Any = None,
        token_type_ids: list[list[int] | None] | None = None,
    ) -> list[str]:
        """Queue many tokenized prompts with the same params; returns their ids, in order.
        Every prompt is checked before any is queued: the first bad one raises, naming its
        index (`prompt 3: ...`), and none is queued.

        A pooling model takes the whole batch at once (`PoolingParams`; `token_type_ids`: per
        prompt its segment ids or None): one copy of the params, one conversion of all token
        ids, and the requests built step by step as they are admitted (`pooling_requests.py`).
        This is how to queue thousands of short prompts (`LLM.encode` / `classify` / `embed`
        do). A generation model queues each prompt through `add_request`."""
        mc = self.model_config
        pooling = check_pooling_request(params, self.task, mc.architecture, mc.model_dir)
        if pooling is None:
            return self.add_each(prompts, params, token_type_ids)
        side = getattr(self.tokenizer, "truncation_side", "right")
        with paused_gc():
            checks = self._pooling_checks()
            types, tensors = check_pooling_batch(prompts, pooling, token_type_ids, checks, side)
            request_ids = [f"req-{next(self._ids)}" for _ in tensors]
            self._pooling.add(request_ids, None, pooling, types, tensors)
        return request_ids

    def add_each(self, prompts: list, params: Any, token_type_ids: list | None = None,
                 processed: bool = False) -> list[str]:  # fmt: skip
        """`add_request` of each prompt (token ids; `processed`: `ProcessedPrompt`s, as
        `add_processed` takes them), in order; a bad prompt raises naming its index and
        aborts those queued before it."""
        types = token_type_ids if token_type_ids is not None else [None] * len(prompts)
        add = self.add_processed if processed else self.add_request
        request_ids: list[str] = []
        try:
            for i, (prompt, segments) in enumerate(zip(prompts, types)):
                try:
                    request_ids.append(add(prompt, params, token_type_ids=segments))
                except PolymodalError as exc:
                    raise type(exc)(f"prompt {i}: {exc}") from exc
        except BaseException:
            for request_id in request_ids:
                self.abort(request_id)
            raise
        return request_ids

    def _pooling_checks(self) -> dict[str, Any]:
        """`check_pooling_prompt`'s model-side arguments."""
        return {"model": self.runner.model, "model_config": self.model_config,
                "max_model_len": self.max_model_len,
                "budget": self.scheduler.max_num_batched_tokens}  # fmt: skip

    def _queue(self, group: RequestGroup) -> str:
        """Hand a new request's sequences to the scheduler; returns its id."""
        self._groups[group.request_id] = group
        for i, seq in enumerate(group.seqs):
            self._seq_to_group[seq.request_id] = (group, i)
            self.scheduler.add(seq)
        return group.request_id

    def check_lora(self, lora_request: Any) -> None:
        """Load (once) and check a request's adapter; raises InvalidInputError naming it
        (thread-safe: callers may check on a worker thread ahead of `add_request`)."""
        if self.runner.lora is None:
            name = getattr(lora_request, "lora_name", lora_request)
            raise InvalidInputError(
                f"lora_request {name!r}: this engine was built without LoRA; pass "
                "enable_lora=True (and max_loras / max_lora_rank) to use adapters"
            )
        self.runner.lora.load(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop adapter `lora_int_id` (vLLM's; LoRAManager.remove); False if not loaded."""
        return self.runner.lora is not None and self.runner.lora.remove(lora_int_id)

    def compile_grammar(self, params: SamplingParams) -> Any:
        """`params.structured_outputs` compiled for this model's tokenizer (thread-safe; None
        without structured output). Raises `InvalidInputError` for a bad schema or regex."""
        return self.grammars.compile(params.structured_outputs)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (unknown or finished ids are ignored)."""
        if self._pooling.discard(request_id):  # queued, not a request yet
            return
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for seq, out in zip(group.seqs, group.outputs):
            self.scheduler.finish(seq, "abort")
            out.finish_reason = out.finish_reason or "abort"
            self._seq_to_group.pop(seq.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._groups or self._pooling)

    @property
    def num_waiting(self) -> int:
        """Requests queued and not running yet (pooling prompts not built yet included)."""
        return len(self.scheduler.waiting) + len(self._pooling)

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.kv.num_free_blocks

    # ---- stepping -----------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one batch; returns outputs of the requests that advanced
        (only of those that finished, with `finished_only`: no per-token objects).

        With `async_scheduling`, the next batch is launched before the previous one's tokens
        are read back, so the GPU never waits for the host in between; outputs then lag one
        step, and a request that stops computes one extra token that is thrown away. A batch
        with rules that follow the previous tokens launches its forward pass the same way and
        samples once they are read back (`ModelRunner.finish_sampling`).
        """
        if self.task != "generate":
            return pooling_engine_step(self)
        touched: dict[str, RequestGroup] = {}
        flight = self._in_flight
        drafting = self.speculation is not None and self.speculation.active(self.scheduler)
        overlap = self.async_scheduling and not drafting
        if flight is not None and not overlap:
            self._resolve(flight, touched)
            flight = self._in_flight = None
        if drafting:
            self.speculation.propose(self.scheduler)
        sched = self.scheduler.schedule()
        # rules that follow the previous tokens (grammars, penalties, bad words, logprobs)
        # sample after that step is read back, while the GPU runs this step's forward pass
        defer = overlap and any(req.needs_host_tokens for req in self.scheduler.running)
        launched = self.runner.launch(sched, flight, overlap, defer) if sched else None
        if launched is not None:
            self.scheduler.update(sched)
        if flight is not None:
            self._resolve(flight, touched)
        self._in_flight = None
        if launched is not None:
            launched = self.runner.finish_sampling(launched)
            if overlap:
                self._in_flight = launched
            else:
                self._resolve(launched, touched)
        now = time.monotonic()
        groups = touched.values()
        if finished_only:
            groups = [g for g in groups if g.finished]
        return [self._output(g, now) for g in groups]

    def _resolve(self, flight, touched: dict[str, RequestGroup]) -> None:
        """Read a launched step's tokens back and book them (stops, text, outputs)."""
        sampled = self.runner.resolve(flight)
        now = time.monotonic()
        for seq in flight.reqs:
            seq.num_pending -= 1
            tok = sampled.get(seq.request_id)
            if type(tok) is list:  # drafts checked: the accepted ones and the token after them
                tok = self.speculation.book(seq, tok)
            if tok is None or seq.is_finished:  # aborted or stopped meanwhile: discard
                continue
            group, i = self._seq_to_group[seq.request_id]
            if type(tok) is list:
                reason = group.append_all(i, tok, now, self.max_model_len)
            else:
                reason = group.append(i, tok, now, self.max_model_len)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            touched[group.request_id] = group

    def _output(self, group: RequestGroup, now: float) -> RequestOutput:
        """The group's output now; a finished group is forgotten (`on_finished` sees it)."""
        out = group.output(now)
        if group.finished:
            self._groups.pop(group.request_id, None)
            for seq in group.seqs:
                self._seq_to_group.pop(seq.request_id, None)
            if self.on_finished is not None:
                self.on_finished(out)
        return out

    def run_until_done(self) -> dict[str, RequestOutput]:
        """Step until every queued request finishes; the final output of each."""
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step(finished_only=True):
                if out.finished:
                    final[out.request_id] = out
        return final
