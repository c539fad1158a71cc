"""`AsyncEngine`: one `LLM`'s engine driven by a background thread, streamed to asyncio.

    engine = AsyncEngine("path/to/model")
    request_id = engine.submit({"messages": [...]}, SamplingParams(max_tokens=32))
    async for out in engine.stream(request_id):      # RequestOutput after every step
        print(out.outputs[0].delta_text, end="")

Threads: prompts are processed (media loaded, tokenized, structured-output grammars compiled)
on a small worker pool, so a big image or schema never stalls decoding; one engine thread owns
the `Engine` (which is not thread-safe) and is the only one that touches it. Commands reach it
through a locked queue; outputs reach each request's `asyncio.Queue` through
`loop.call_soon_threadsafe`.

Failures stay local: a prompt that cannot be processed (bad media, too long) fails only its
own request; an exception inside one engine step fails the requests of that step (and frees
their KV blocks), and the loop goes on serving the others.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from polymodal.llm import LLM
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.outputs import RequestOutput
from polymodal.llm_core.request_checks import check_max_tokens
from polymodal.llm_core.sampling_params import SamplingParams

_END = None  # queue sentinel: the request was aborted, the stream ends without a final output


@dataclass
class EngineStats:
    """A snapshot of the engine, refreshed by the engine thread after every step."""

    num_running: int = 0
    num_waiting: int = 0  # queued in the scheduler or still being processed
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_steps: int = 0
    num_failed_steps: int = 0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: bool = False  # handed to the engine (so abort must reach the engine)
    done: bool = False  # its last item is queued; `stream` forgets it once read


class AsyncEngine:
    """Serve many concurrent requests of one model from asyncio code.

    `model` is an `LLM` or a model id / checkpoint dir (then `engine_kwargs` build the LLM).
    Call `submit` and `stream` from inside a running event loop; `close()` stops the thread.
    """

    def __init__(self, model: LLM | str, *, process_workers: int = 1, **engine_kwargs: Any):
        self.llm = model if isinstance(model, LLM) else LLM(model, **engine_kwargs)
        self.engine = self.llm.engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: deque[tuple] = deque()
        self._streams: dict[str, _Stream] = {}
        self._pending = 0  # submitted, not yet added to the engine
        self._stopped = False
        self.stats = EngineStats()
        self._refresh_stats()
        self._pool = ThreadPoolExecutor(process_workers, thread_name_prefix="polymodal-process")
        self._thread = threading.Thread(target=self._loop, name="polymodal-engine", daemon=True)
        self._thread.start()

    # ---- public API (event-loop side) ----------------------------------------------------
    def submit(
        self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue one prompt (any form `LLM.process` takes); returns its request id at once.

        Processing errors are not raised here: they end this request's `stream` instead, as
        does an explicit `max_tokens` that does not fit the context (vLLM's server rule).
        Read every submitted request with `stream` (or `abort` it).
        """
        if self._stopped:
            raise RuntimeError("the AsyncEngine is closed")
        loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        with self._lock:
            if request_id in self._streams:
                raise InvalidInputError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = _Stream(loop, asyncio.Queue())
            self._pending += 1
        self._pool.submit(self._process, request_id, prompt, params or SamplingParams())
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
                item = await stream.queue.get()
                if item is _END:
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
            if not done:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

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
        """`LLM.process(prompt)` on the worker pool (media loading never blocks the loop)."""
        return await asyncio.wrap_future(self._pool.submit(self.llm.process, prompt))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; a running `stream` of it ends. Thread-safe."""
        self._command(("abort", request_id))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (requests still running are aborted)."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- worker side ---------------------------------------------------------------------
    def _command(self, command: tuple) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def _process(self, request_id: str, prompt: Any, params: SamplingParams) -> None:
        """Worker pool: load media, tokenize, compile the grammar (structured output), check
        `max_tokens` against the context; hand the result (or the error) on."""
        try:
            processed = self.llm.process(prompt)
            check_max_tokens(len(processed.token_ids), params, self.engine.max_model_len)
            grammar = self.engine.compile_grammar(params)
        except Exception as exc:  # noqa: BLE001 - the error belongs to this request only
            with self._lock:
                self._pending -= 1
            self._finish(request_id, exc)
            return
        self._command(("add", request_id, processed, params, grammar))

    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _finish(self, request_id: str, last: Any) -> None:
        """Deliver the last item of a request; its `stream` (called before or after this)
        reads everything up to it, then forgets the request."""
        self._deliver(request_id, last)
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.done = True

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = list(self._commands), deque()
        for command in commands:
            if command[0] == "add":
                _, request_id, p, params, grammar = command
                with self._lock:
                    self._pending -= 1
                    stream = self._streams.get(request_id)
                if stream is None or stream.done:  # aborted while it was being processed
                    continue
                try:
                    self.engine.add_request(
                        p.token_ids,
                        params,
                        request_id,
                        p.positions,
                        p.mrope_delta,
                        p.mm_items,
                        grammar,
                    )
                    stream.added = True
                except Exception as exc:  # noqa: BLE001
                    self._finish(request_id, exc)
            else:  # abort
                _, request_id = command
                self.engine.abort(request_id)
                self._finish(request_id, _END)

    def _fail_step(self, exc: Exception) -> None:
        """An engine step raised: fail (and abort) the requests that were running in it."""
        self.stats.num_failed_steps += 1
        in_step = {seq.request_id.rsplit("#", 1)[0] for seq in self.engine.scheduler.running}
        with self._lock:
            added = [rid for rid, s in self._streams.items() if s.added and not s.done]
        victims = [rid for rid in added if rid in in_step] or added
        for request_id in victims:
            self.engine.abort(request_id)
            self._finish(request_id, exc)

    def _refresh_stats(self) -> None:
        scheduler = self.engine.scheduler
        self.stats.num_running = len(scheduler.running)
        self.stats.num_waiting = len(scheduler.waiting) + self._pending
        self.stats.num_free_blocks = self.engine.num_free_blocks
        self.stats.num_total_blocks = scheduler.kv.num_blocks

    def _loop(self) -> None:
        """The engine thread: run commands, step, fan outputs out; never dies of one request."""
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
            for out in outputs:
                if out.finished:
                    self._finish(out.request_id, out)
                else:
                    self._deliver(out.request_id, out)
            self._refresh_stats()
        with self._lock:
            leftover = [rid for rid, s in self._streams.items() if not s.done]
        for request_id in leftover:
            self.engine.abort(request_id)
            self._finish(request_id, _END)
