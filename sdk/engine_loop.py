"""`EngineLoop`: the engine side of an `AsyncEngine`, one `LLM` driven by a background thread.

Threads: prompts are processed (media loaded, resized, hashed, staged on the device;
tokenized; structured-output grammars compiled) on a small worker pool, so a big image never
stalls decoding; with `media_processes`, prompts carrying media are loaded and tokenized in
worker processes first (`media_processes.py`: their GIL is not the engine thread's) and only
staged here. One engine thread owns the `Engine` (which is not thread-safe) and is the
only one that touches it. Commands reach it
through a locked queue. Everything a request produces leaves through one callback,
`emit([(request_id, item), ...])`, called once per step with that step's items: a
`RequestOutput` (the last one has `finished=True`), an exception that ended the request, or
`END` (aborted: the stream ends without a final output).

Failures stay local: a prompt that cannot be processed (bad media, too long) fails only its
own request; an exception inside one engine step fails the requests of that step (and frees
their KV blocks), and the loop goes on serving the others.

The loop runs in the server's own process (`AsyncEngine(llm)`) or alone in an engine process
(`engine_process.py`), where the HTTP server's Python work cannot take its GIL.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

from polymodal.feeder import PROCESS_WORKERS
from polymodal.llm_core.embedding_head import matryoshka_dimensions
from polymodal.llm_core.interfaces import is_pooling_model
from polymodal.llm_core.pooling import PoolingParams
from polymodal.llm_core.request_checks import check_max_tokens
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_pooling import pooling_prompt
from polymodal.llm_prompts import MEDIA_OPTIONS
from polymodal.media_processes import MediaProcesses, ProcessorSpec

END = None  # the item that ends an aborted request's stream (no final output)


@dataclass
class EngineStats:
    """A snapshot of the engine, refreshed by the engine thread after every step."""

    num_running: int = 0
    num_waiting: int = 0  # queued in the scheduler or still being processed
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_steps: int = 0
    num_failed_steps: int = 0
    # speculative decoding (vLLM's spec_decode counters): sequence steps that checked drafts,
    # drafts checked, drafts accepted
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


class EngineLoop:
    """Serve `submit`ted prompts of one `LLM` from a background thread (see the module doc).

    `emit` receives the items of one step; `on_stats` (optional) the stats after each change;
    `media_processes` > 0 starts that many worker processes for prompts with media (and waits
    until they are ready).
    """

    def __init__(
        self,
        llm: Any,
        emit: Callable[[list[tuple[str, Any]]], None],
        *,
        process_workers: int = PROCESS_WORKERS,
        media_processes: int = 0,
        on_stats: Callable[[EngineStats], None] | None = None,
    ):
        self.llm = llm
        self.engine = llm.engine
        self.emit = emit
        self.on_stats = on_stats
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: deque[tuple] = deque()
        self._live: set[str] = set()  # submitted, not ended
        self._added: set[str] = set()  # handed to the engine (an abort must reach it)
        self._pending = 0  # submitted, not yet added to the engine
        self._stopped = False
        self.stats = EngineStats()
        self._last_stats: tuple = ()
        self._refresh_stats()
        self._pool = ThreadPoolExecutor(process_workers, thread_name_prefix="polymodal-process")
        self._media = None
        if media_processes and llm.is_multimodal:
            self._media = MediaProcesses(ProcessorSpec.of(llm, media_processes), media_processes)
            self._media.start()
        self._thread = threading.Thread(target=self._loop, name="polymodal-engine", daemon=True)
        self._thread.start()

    # ---- commands (any thread) -----------------------------------------------------------
    def submit(
        self, request_id: str, prompt: Any, params: SamplingParams, lora_request: Any = None
    ) -> None:
        """Process `prompt` on the pool, then queue it in the engine under `request_id` (with
        the adapter `lora_request`, when given)."""
        with self._lock:
            self._live.add(request_id)
            self._pending += 1
        media = self._media
        if media is not None and not isinstance(params, PoolingParams) and media.takes(prompt):
            # loaded and tokenized in a media process, then staged and queued by a thread
            media.submit(prompt).add_done_callback(
                lambda done: self._pool.submit(
                    self._process, request_id, done, params, lora_request
                )
            )
            return
        self._pool.submit(self._process, request_id, prompt, params, lora_request)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; its stream ends with `END`."""
        self._command(("abort", request_id))

    def set_processor_option(self, name: str, value: Any) -> None:
        """Set an attribute of the model's processor (e.g. `allow_http`)."""
        setattr(self.llm.processor, name, value)
        if self._media is not None:
            self._media.set_option(name, value)

    def model_info(self) -> dict[str, Any]:
        """What a front end needs to know of the model (plain values: it may cross a pipe)."""
        mc = self.llm.model_config
        return {
            "model_dir": str(mc.model_dir),
            "architecture": mc.architecture,
            "vocab_size": mc.vocab_size,
            "eos_token_ids": list(mc.eos_token_ids),
            "max_model_len": self.engine.max_model_len,
            "default_sampling": dict(self.llm.default_sampling),
            "modalities": list(self.llm.processor.MODALITIES),  # media kinds the model takes
            # options its prompts take (Whisper: language, task, timestamps)
            "media_options": list(getattr(self.llm.processor, "MEDIA_OPTIONS", MEDIA_OPTIONS)),
            "task": self.engine.task,  # generate, or a pooling task (classify, reward, embed)
            # a classifier's labels, by class index (config.json's id2label)
            "labels": _labels(mc.text_config) if self.engine.task == "classify" else None,
            # an embedding model's vector size and the Matryoshka sizes it may be cut to
            "embedding_dimension": embedding_dimension(self.engine.runner.model),
            "matryoshka": list(matryoshka_dimensions(mc.text_config)),
            "do_lower_case": mc.do_lower_case,  # sentence_bert_config.json: text lower-cased
            "sleep_mode": self.engine.config.enable_sleep_mode,  # the sleep routes are served
            "prompt_embeds": self.engine.config.enable_prompt_embeds,  # completions take them
            # grammars wait for the reasoning's end tag (the engine's reasoning_parser)
            "grammar_waits": self.engine.grammars.tags is not None,
        }

    def process_later(self, prompt: Any) -> Any:
        """`LLM.process(prompt)` on the worker pool, not staged on the device (a
        `concurrent.futures.Future`): token ids and media items a front end may keep."""
        return self._pool.submit(self.llm.process, prompt, False)

    def align_later(self, features: Any, token_ids: list[int], heads: list) -> Any:
        """Whisper's alignment-head cross-attention of one window (word timestamps,
        `polymodal.speech.model_aligner`) on the worker pool, as a Future."""
        from polymodal.speech import model_aligner

        return self._pool.submit(lambda: model_aligner(self.llm)(features, token_ids, heads))

    def control_later(self, name: str, *args: Any) -> Future:
        """Sleep mode's `sleep` / `wake_up` / `is_sleeping` (llm_core/sleep.py) on the engine
        thread, between steps, as a `concurrent.futures.Future` of its result."""
        future: Future = Future()
        self._command(("control", name, args, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (requests still running are aborted)."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._media is not None:
            self._media.close()

    # ---- worker side ---------------------------------------------------------------------
    def _command(self, command: tuple) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def _process(self, request_id: str, prompt: Any, params: SamplingParams, lora=None) -> None:
        """Worker pool: load media, tokenize, compile the grammar (structured output), check
        an explicit `max_tokens` against the context (vLLM's server rule); hand the result
        (or the error) on. `prompt` may be a Future of a media process's `ProcessedPrompt`
        (then it is only staged here)."""
        token_types = None
        try:
            if isinstance(prompt, Future):
                prompt = prompt.result()
            if isinstance(params, PoolingParams):  # no grammar, no output tokens
                (processed, token_types), grammar = pooling_prompt(self.llm, prompt, params), None
            else:
                processed, grammar = self.llm.prepare(prompt, params)
                check_max_tokens(len(processed.token_ids), params, self.engine.max_model_len)
            if lora is not None:  # read and check the adapter here, off the engine thread
                self.engine.check_lora(lora)
        except Exception as exc:  # noqa: BLE001 - the error belongs to this request only
            with self._lock:
                self._pending -= 1
            self._end([(request_id, exc)])
            return
        self._command(("add", request_id, processed, params, grammar, lora, token_types))

    def _end(self, items: list[tuple[str, Any]]) -> None:
        """Emit items, forgetting the requests they end (finished outputs, errors, END)."""
        with self._lock:
            for request_id, item in items:
                if not hasattr(item, "finished") or item.finished:
                    self._live.discard(request_id)
                    self._added.discard(request_id)
        if items:
            self.emit(items)

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = list(self._commands), deque()
        for command in commands:
            if command[0] == "add":
                _, request_id, p, params, grammar, lora, token_types = command
                with self._lock:
                    self._pending -= 1
                    live = request_id in self._live
                if not live:  # aborted while it was being processed
                    continue
                try:
                    self.engine.add_processed(
                        p,
                        params,
                        request_id,
                        grammar,
                        lora_request=lora,
                        token_type_ids=token_types,
                    )
                    with self._lock:
                        self._added.add(request_id)
                except Exception as exc:  # noqa: BLE001
                    self._end([(request_id, exc)])
            elif command[0] == "control":
                _, name, args, future = command
                try:
                    future.set_result(_control(self.engine, name, args))
                except Exception as exc:  # noqa: BLE001 - the caller's error, not the engine's
                    future.set_exception(exc)
            else:  # abort
                _, request_id = command
                with self._lock:
                    live = request_id in self._live
                self.engine.abort(request_id)
                if live:
                    self._end([(request_id, END)])

    def _fail_step(self, exc: Exception) -> None:
        """An engine step raised: fail (and abort) the requests that were running in it."""
        self.stats.num_failed_steps += 1
        in_step = {seq.request_id.rsplit("#", 1)[0] for seq in self.engine.scheduler.running}
        with self._lock:
            added = list(self._added)
        victims = [rid for rid in added if rid in in_step] or added
        for request_id in victims:
            self.engine.abort(request_id)
        self._end([(request_id, exc) for request_id in victims])

    def _refresh_stats(self) -> None:
        scheduler = self.engine.scheduler
        self.stats.num_running = len(scheduler.running)
        self.stats.num_waiting = self.engine.num_waiting + self._pending
        self.stats.num_free_blocks = self.engine.num_free_blocks
        self.stats.num_total_blocks = scheduler.kv.num_blocks
        spec = self.engine.speculation
        if spec is not None:
            self.stats.spec_num_drafts = spec.num_drafts
            self.stats.spec_num_draft_tokens = spec.num_draft_tokens
            self.stats.spec_num_accepted_tokens = spec.num_accepted_tokens
        now = self.stats.as_tuple()
        if self.on_stats is not None and now != self._last_stats:
            self.on_stats(self.stats)
        self._last_stats = now

    def _loop(self) -> None:
        """The engine thread: run commands, step, emit outputs; never dies of one request."""
        while not self._stopped:
            self._run_commands()
            if not self.engine.has_unfinished():
                self._refresh_stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001
                self._fail_step(exc)
                self._refresh_stats()
                continue
            self.stats.num_steps += 1
            self._end([(out.request_id, out) for out in outputs])
            self._refresh_stats()
        with self._lock:
            leftover = list(self._live)
        for request_id in leftover:
            self.engine.abort(request_id)
        self._end([(request_id, END) for request_id in leftover])


def _control(engine, name: str, args: tuple) -> Any:
    """One control call on `engine` (the engine thread's): sleep mode, a served adapter
    checked / removed (the server's runtime LoRA routes), a profiler trace started / stopped."""
    from polymodal.llm_core import sleep

    if name == "is_sleeping":
        return engine.sleeping is not None
    if name in ("check_lora", "remove_lora"):
        return getattr(engine, name)(*args)
    if name in ("start_profile", "stop_profile"):
        from polymodal.llm_core import profiler

        return getattr(profiler, name)(engine)
    if name not in ("sleep", "wake_up"):
        raise ValueError(f"unknown engine control {name!r}")
    return getattr(sleep, name)(engine, *args)


def embedding_dimension(model) -> int | None:
    """A pooling model's embedding size (None: not an embedding model, or not pooling)."""
    return model.embedding_dimension() if is_pooling_model(model) else None


def _labels(text_config: Any) -> list[str]:
    """Class names by index: `id2label` (keys may be strings in config.json), else LABEL_i."""
    num = int(getattr(text_config, "num_labels", 0) or 0)
    names = {int(k): str(v) for k, v in (getattr(text_config, "id2label", None) or {}).items()}
    return [names.get(i, f"LABEL_{i}") for i in range(num)]
