"""`AsyncEngine`: one model's engine streamed to asyncio code (the server, the demo app).

    engine = AsyncEngine("path/to/model")              # the engine in its own process
    request_id = engine.submit({"messages": [...]}, SamplingParams(max_tokens=32))
    async for out in engine.stream(request_id):      # RequestOutput after every step
        print(out.outputs[0].delta_text, end="")

The engine side is an `EngineLoop` (worker threads process media, one thread steps the
engine: `engine_loop.py`). Given a model path, it runs in a child process
(`engine_process.py`), so that the event loop's Python work (HTTP, one SSE event per request
per step) never takes the GIL from the engine thread; given an `LLM`, it runs in this process.
Either way a step's outputs reach the event loop in one `loop.call_soon_threadsafe` (not one
per request: each call wakes the loop through its self-pipe), and a stream that fell behind
gets the outputs waiting for it merged into one (deltas joined), so a loaded server sends
fewer, larger chunks instead of falling further behind.

Failures stay local: a prompt that cannot be processed (bad media, too long) fails only its
own request; an exception inside one engine step fails the requests of that step; if the
engine process dies, every open request fails with `EngineDiedError` and `alive` turns False.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from polymodal.engine_loop import END, EngineLoop, EngineStats
from polymodal.feeder import PROCESS_WORKERS
from polymodal.llm import LLM
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.outputs import RequestOutput
from polymodal.llm_core.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineStats", "merge_outputs"]


@dataclass
class _Stream:
    """A request's items on their way to its consumer (touched only on `loop`'s thread)."""

    loop: asyncio.AbstractEventLoop
    items: deque = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.ready.set()

    async def get(self) -> Any:
        """The next item; consecutive outputs waiting together come merged into one."""
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        item = self.items.popleft()
        while self.items and isinstance(item, RequestOutput) and not item.finished:
            if not isinstance(self.items[0], RequestOutput):
                break
            item = merge_outputs(item, self.items.popleft())
        return item


class AsyncEngine:
    """Serve many concurrent requests of one model from asyncio code.

    `model` is an `LLM` (served from this process) or a model id / checkpoint dir, loaded with
    `engine_kwargs` (`LLM` keywords) in its own engine process, or in this one with
    `separate_process=False`. `engine_setup(llm)` runs once the `LLM` is built, in the process
    that holds it (a picklable callable; `scripts/bench_frontend.py` fakes the model step
    there). `process_workers` threads process prompts next to the engine; `media_processes`
    worker processes (0: none) load and tokenize the prompts that carry media first
    (`polymodal.media_processes`). `data_parallel_size` > 1 runs that many engine processes,
    each on its own GPUs, and spreads the requests over them (`polymodal.data_parallel`).
    Call `submit` and `stream` from inside a running event loop; `close()` stops the engine.
    """

    def __init__(
        self,
        model: LLM | str,
        *,
        process_workers: int = PROCESS_WORKERS,
        media_processes: int = 0,
        separate_process: bool = True,
        engine_setup: Any = None,
        data_parallel_size: int = 1,
        **engine_kwargs: Any,
    ):
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        if data_parallel_size != 1 and not (isinstance(model, str) and separate_process):
            raise InvalidInputError("data_parallel_size > 1 needs engine processes: pass a path")
        if isinstance(model, str) and separate_process:
            from polymodal.data_parallel import DataParallelCores
            from polymodal.engine_process import EngineProcess
            from polymodal.llm_core.loader import load_tokenizer

            self.llm = None  # it lives in the engine process(es)
            cores = {"process_workers": process_workers, "setup": engine_setup,
                     "media_processes": media_processes}  # fmt: skip
            if data_parallel_size == 1:
                self._core = EngineProcess(
                    model, engine_kwargs, self._deliver, self._fail_all, **cores
                )
            else:  # data_parallel.py
                self._core = DataParallelCores(
                    data_parallel_size, model, engine_kwargs, self._deliver, self._fail_all,
                    **cores,
                )  # fmt: skip
            self.model_info = self._core.info
            self.tokenizer = load_tokenizer(self.model_info["model_dir"])
        else:
            self.llm = model if isinstance(model, LLM) else LLM(model, **engine_kwargs)
            if engine_setup is not None:
                engine_setup(self.llm)
            self._core = EngineLoop(
                self.llm,
                self._deliver,
                process_workers=process_workers,
                media_processes=media_processes,
            )
            self.model_info = self._core.model_info()
            self.tokenizer = self.llm.tokenizer
        # model_dir, architecture, vocab_size, eos_token_ids, max_model_len, default_sampling
        self.max_model_len: int = self.model_info["max_model_len"]
        self.stats: EngineStats = self._core.stats

    @property
    def engine(self):
        """The `Engine` when it runs in this process (tests, inspection); else None."""
        return self.llm.engine if self.llm is not None else None

    @property
    def alive(self) -> bool:
        """False once the engine process died (every request then fails)."""
        return getattr(self._core, "alive", True) and not self._stopped

    # ---- public API (event-loop side) ----------------------------------------------------
    def submit(
        self,
        prompt: Any,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        lora_request: Any = None,
    ) -> str:
        """Queue one prompt (any form `LLM.process` takes); returns its request id at once.
        `lora_request` (a `LoRARequest`) runs it with that adapter (`enable_lora`).
        A pooling model takes `PoolingParams` (a prompt dict may add BERT's `token_type_ids`);
        its stream yields one final `PoolingRequestOutput`.

        Processing errors are not raised here: they end this request's `stream` instead.
        Every submitted request is to be read with `stream` (or `generate`) or aborted.
        """
        if not self.alive:
            raise RuntimeError("the AsyncEngine is closed or its engine process died")
        loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        with self._lock:
            if request_id in self._streams:
                raise InvalidInputError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = _Stream(loop)
        self._core.submit(request_id, prompt, params or SamplingParams(), lora_request)
        return request_id

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's `RequestOutput` after each step that advanced it.

        The last one has `finished=True`. A processing or engine error is raised here. If the
        consumer stops early (break, cancellation, client disconnect) the request is aborted
        and its KV blocks freed.
        """
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            raise InvalidInputError(f"unknown request id {request_id!r}")
        done = False
        try:
            while True:
                item = await stream.get()
                if item is END:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.finished:
                    done = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not done:
                self.abort(request_id)

    async def generate(self, prompt: Any, params: SamplingParams | None = None) -> RequestOutput:
        """Submit one prompt and return its final output."""
        request_id = self.submit(prompt, params)
        final = None
        async for out in self.stream(request_id):
            final = out
        if final is None:
            raise RuntimeError(f"request {request_id} was aborted")
        return final

    async def process(self, prompt: Any) -> Any:
        """`LLM.process(prompt)` on the engine's worker pool (media loading never blocks the
        loop): its token ids and media items (on the host), e.g. for /tokenize or beam search."""
        return await asyncio.wrap_future(self._core.process_later(prompt))

    def align_later(self, features: Any, token_ids: list[int], heads: list) -> Any:
        """Whisper's alignment-head cross-attention of one window on the engine's model
        (word timestamps), as a `concurrent.futures.Future`."""
        return self._core.align_later(features, token_ids, heads)

    async def control(self, name: str, *args: Any) -> Any:
        """Sleep mode on the engine thread, wherever it runs: `control("sleep", level)`,
        `control("wake_up", tags)`, `control("is_sleeping")` (llm_core/sleep.py)."""
        return await asyncio.wrap_future(self._core.control_later(name, *args))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; a running `stream` of it ends. Thread-safe."""
        if self.alive:
            self._core.abort(request_id)

    def set_processor_option(self, name: str, value: Any) -> None:
        """Set an attribute of the model's processor, wherever it runs (e.g. `allow_http`)."""
        self._core.set_processor_option(name, value)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine (requests still running are aborted)."""
        self._stopped = True
        self._core.close(timeout)

    # ---- engine side (its threads) -------------------------------------------------------
    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        """Hand `(request id, item)` pairs to their streams: one call into each event loop.
        (A stream is forgotten when its consumer is done with it, in `stream`.)"""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _fail_all(self, exc: Exception) -> None:
        """The engine process died: every open request ends with `exc`."""
        with self._lock:
            open_ids = list(self._streams)
        self._deliver([(request_id, exc) for request_id in open_ids])


def _put_all(batch: list[tuple[_Stream, Any]]) -> None:
    for stream, item in batch:
        stream.put(item)


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output for two consecutive steps of a request: `later`'s state with `earlier`'s
    deltas in front of its own (texts, token ids and so the delta logprobs stay whole)."""
    for a, b in zip(earlier.outputs, later.outputs):
        b.delta_text = a.delta_text + b.delta_text
        b.delta_token_ids = a.delta_token_ids + b.delta_token_ids
    return later
