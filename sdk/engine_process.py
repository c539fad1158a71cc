"""`EngineProcess`: an `EngineLoop` alone in a child process, driven over a pipe.

Why: a loaded server spends as much Python time on HTTP and streaming (parsing bodies, one SSE
event per request per step) as the engine spends launching steps and processing media. In one
process they share one GIL, and the engine thread and the media workers wait for it while the
GPU idles (H200, 256 streamed image requests: 35 requests/s in one process against 75 offline).
Here the child holds the model, the media workers and the engine thread (the offline path's
situation); the parent keeps the event loop, and only prompts (raw: strings, bytes, images)
and outputs cross, pickled.

Protocol: parent -> child, a list of commands per message, each a tuple: `("add", id, prompt,
params, lora)`, `("abort", id)`, `("option", name, value)`, `("process", token, prompt)`,
`("control", token, name, args)` (sleep mode),
`("align", token, args)`, `("close",)`; child -> parent (each message a tuple) `("ready",
info)` or `("failed", exc)` once at start, then `("items", [(id, item), ...])`, `("stats",
tuple)` and `("processed", token, result, error)`.
Each side sends from its own thread, and everything queued by then goes in one message: the
event loop never waits on the pipe (a burst of 256 image requests is megabytes, and the child
reads between its engine steps), the child unpickles a burst in one go instead of taking its
GIL back once per request, and a slow parent gets fewer, larger messages instead of stalling
the engine thread. Outputs cross as
what each step added, in plain tuples (`output_wire.py`): pickling whole `RequestOutput`s took
more of both processes' GIL than the engine thread did. Pooling outputs cross as their
tensor's bytes (`output_wire.encode_pooled`).
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import pickle
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from polymodal.engine_loop import EngineLoop, EngineStats
from polymodal.feeder import PROCESS_WORKERS
from polymodal.llm_core.errors import ModelLoadError
from polymodal.output_wire import Assembler, Encoder

_START_LOCK = threading.Lock()


class EngineDiedError(RuntimeError):
    """The engine process ended while requests were in it."""


class EngineProcess:
    """The parent's handle on a child process running one model's `EngineLoop`.

    Starting waits until the model is loaded (and warmed up); a load error is raised here.
    `setup(llm)` (picklable: a module-level function or a partial of one) runs in the child
    once the `LLM` is built (the frontend bench installs its fake model step there). `emit`
    gets each message's items on a reader thread; `on_death(exc)` runs once if the child dies.
    `env`: environment variables the child starts with (a data-parallel rank's
    `CUDA_VISIBLE_DEVICES`).
    """

    def __init__(
        self,
        model: str,
        engine_kwargs: dict[str, Any],
        emit: Callable[[list[tuple[str, Any]]], None],
        on_death: Callable[[Exception], None],
        process_workers: int = PROCESS_WORKERS,
        setup: Callable[[Any], None] | None = None,
        media_processes: int = 0,
        env: dict[str, str] | None = None,
    ):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=run_engine_process,
            args=(child_conn, model, engine_kwargs, process_workers, setup, media_processes),
            name="polymodal-engine-core",
            # a daemonic process may not start processes: tensor-parallel workers and media
            # processes need it not (without the parent's pipe it exits all the same)
            daemon=engine_kwargs.get("tensor_parallel_size", 1) == 1 and not media_processes,
        )
        with _START_LOCK:  # `env` (a data-parallel rank's GPUs) is what the child inherits
            saved = {name: os.environ.get(name) for name in env or {}}
            os.environ.update(env or {})
            try:
                self._process.start()
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        child_conn.close()
        self._send_lock = threading.Lock()
        self._outgoing: list[tuple] = []  # commands for the sender thread
        self._send_wake = threading.Event()
        self.emit, self.on_death = emit, on_death
        self.stats = EngineStats()
        self.alive = True
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise ModelLoadError(
                f"{model}: the engine process exited while loading "
                f"(exit code {self._process.exitcode})"
            ) from None
        if kind == "failed":
            self._process.join(5)
            raise payload
        self.info: dict[str, Any] = payload  # EngineLoop.model_info()
        self._calls: dict[int, Future] = {}
        self._tokens = itertools.count()
        self._assemble = Assembler()  # only the reader thread uses it
        self._reader = threading.Thread(target=self._read, name="polymodal-engine-reader")
        self._reader.daemon = True
        self._reader.start()
        self._sender = threading.Thread(
            target=self._send_queued, name="polymodal-engine-sender", daemon=True
        )
        self._sender.start()

    def submit(self, request_id: str, prompt: Any, params: Any, lora_request: Any = None) -> None:
        self._send(("add", request_id, prompt, params, lora_request))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def set_processor_option(self, name: str, value: Any) -> None:
        self._send(("option", name, value))

    def process_later(self, prompt: Any) -> Future:
        """`LLM.process(prompt)` in the child (not staged on its device), as a Future."""
        token, future = next(self._tokens), Future()
        self._calls[token] = future
        self._send(("process", token, prompt))
        return future

    def align_later(self, features: Any, token_ids: list[int], heads: list) -> Future:
        """`EngineLoop.align_later` in the child (Whisper's word timestamps), as a Future."""
        token, future = next(self._tokens), Future()
        self._calls[token] = future
        self._send(("align", token, (features, token_ids, heads)))
        return future

    def control_later(self, name: str, *args: Any) -> Future:
        """`EngineLoop.control_later` in the child (sleep mode), as a Future."""
        token, future = next(self._tokens), Future()
        self._calls[token] = future
        self._send(("control", token, name, args))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to stop (aborting what runs), then wait; kill it if it hangs."""
        try:
            self._send(("close",))
        except EngineDiedError:
            pass
        else:
            self._sender.join(timeout)  # the close (and what was queued before it) went out
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    def _send(self, message: tuple) -> None:
        """Queue a command for the sender thread (never blocks on the pipe)."""
        if not self.alive:
            raise EngineDiedError("the engine process is not running")
        with self._send_lock:
            self._outgoing.append(message)
        self._send_wake.set()

    def _send_queued(self) -> None:
        """The sender thread: everything queued since its last write goes in one message."""
        while True:
            self._send_wake.wait()
            self._send_wake.clear()
            with self._send_lock:
                batch, self._outgoing = self._outgoing, []
            if not batch:
                continue
            try:
                self._conn.send(batch)
            except (OSError, EOFError) as exc:  # the child is gone: every request fails
                self._died(exc)
                return
            if batch[-1][0] == "close":
                return

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._died(exc)
                return
            if kind == "items":
                self.emit([(rid, self._assemble(rid, item)) for rid, item in payload])
            elif kind == "stats":
                for name, value in zip(EngineStats.__dataclass_fields__, payload):
                    setattr(self.stats, name, value)
            elif kind == "processed":
                token, result, error = payload
                future = self._calls.pop(token)
                future.set_exception(error) if error is not None else future.set_result(result)
            elif kind == "closed":
                self.alive = False
                return

    def _died(self, exc: BaseException) -> None:
        if not self.alive:
            return
        self.alive = False
        self._process.join(2)
        for future in self._calls.values():
            future.set_exception(EngineDiedError("the engine process died"))
        self.on_death(
            EngineDiedError(
                f"the engine process died (exit code {self._process.exitcode}): {exc or 'EOF'}"
            )
        )


def run_engine_process(
    conn, model: str, engine_kwargs: dict, process_workers: int, setup=None, media_processes=0
) -> None:
    """The child: load the model (then `setup(llm)`, if given; then start `media_processes`
    worker processes), serve commands until `close` or the parent goes away."""
    from polymodal.llm import LLM

    try:
        llm = LLM(model, **engine_kwargs)
        if setup is not None:
            setup(llm)
        outbox = Outbox(conn)
        loop = EngineLoop(
            llm,
            outbox.put_items,
            process_workers=process_workers,
            media_processes=media_processes,
            on_stats=lambda stats: outbox.put_stats(stats.as_tuple()),
        )
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", picklable(exc)))
        return
    freeze_heap()  # the loaded model's objects: out of the collector's full collections
    conn.send(("ready", loop.model_info()))
    outbox.start()  # from here on only its thread writes to the pipe
    try:
        while True:
            try:
                commands = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if not run_commands(loop, outbox, commands):
                break
    finally:
        loop.close()
        outbox.close()


def run_commands(loop: EngineLoop, outbox: Outbox, commands: list[tuple]) -> bool:
    """Carry out one message's commands; False once told to close."""
    for command in commands:
        if command[0] == "add":
            loop.submit(*command[1:])
        elif command[0] == "abort":
            loop.abort(command[1])
        elif command[0] == "option":
            loop.set_processor_option(*command[1:])
        elif command[0] == "process":
            _, token, prompt = command
            future = loop.process_later(prompt)
            future.add_done_callback(lambda f, t=token: outbox.put_processed(t, f))
        elif command[0] == "align":
            _, token, args = command
            future = loop.align_later(*args)
            future.add_done_callback(lambda f, t=token: outbox.put_processed(t, f))
        elif command[0] == "control":
            _, token, name, args = command
            future = loop.control_later(name, *args)
            future.add_done_callback(lambda f, t=token: outbox.put_processed(t, f))
        elif command[0] == "close":
            return False
    return True


class Outbox:
    """The child's sender thread: items and stats queued by the engine thread go out in one
    message per wake-up (pickling and the pipe write stay off the engine thread)."""

    def __init__(self, conn):
        self.conn = conn
        self._items: deque = deque()
        self._stats: tuple | None = None
        self._replies: list[tuple] = []
        self._encode = Encoder()  # only the engine thread calls put_items
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="polymodal-outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put_items(self, items: list[tuple[str, Any]]) -> None:
        encoded = [(rid, self._encode(rid, picklable(item))) for rid, item in items]
        with self._lock:
            self._items.extend(encoded)
        self._wake.set()

    def put_processed(self, token: int, future: Future) -> None:
        error = future.exception()
        result = None if error is not None else future.result()
        with self._lock:
            self._replies.append((token, result, None if error is None else picklable(error)))
        self._wake.set()

    def put_stats(self, stats: tuple) -> None:
        with self._lock:
            self._stats = stats
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                items, self._items = list(self._items), deque()
                stats, self._stats = self._stats, None
                replies, self._replies = self._replies, []
            try:
                for reply in replies:
                    self.conn.send(("processed", reply))
                if items:
                    self.conn.send(("items", items))
                if stats is not None:
                    self.conn.send(("stats", stats))
                if self._closed and not self._items:
                    self.conn.send(("closed", None))
                    return
            except (OSError, EOFError):  # the parent is gone
                return


def freeze_heap() -> None:
    """Leave every object alive now (modules, torch, a loaded model, the tokenizer: ~500k
    objects) out of the garbage collector's full collections, each of which walked all of
    them: 0.4 s of a stalled event loop or engine thread on a CPU box, several times a burst."""
    gc.collect()
    gc.freeze()


def picklable(item: Any) -> Any:
    """`item`, or for an exception that cannot cross a pipe, a RuntimeError saying what it was."""
    if not isinstance(item, BaseException):
        return item
    try:
        pickle.loads(pickle.dumps(item))
        return item
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(item).__name__}: {item}")
