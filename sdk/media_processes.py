"""`MediaProcesses`: prompts with media processed in worker processes, off the engine's GIL.

Why: processing an image prompt (base64, JPEG decode, hashing, the chat template, the
tokenizer, placeholder expansion) is ~5 ms of CPU, about half of it holding the GIL. On worker
threads of the engine's process that half competes with the engine thread, which launches
the steps: under a burst of image requests the first steps wait for it (H200, 256 streamed
448 px requests: the server at 86-95% of the offline rate, ~0.4 s from handler to queue at the
median). Here each worker process builds the model's processor once (from the checkpoint's
folder: tokenizer and processor configs, no weights) and returns the `ProcessedPrompt` with
its media tensors on the host; the engine's process only unpickles it and stages it on the
device (`LLM.stage`).

Results cross as plain pickle bytes (no shared memory: a container's /dev/shm may be smaller
than one video's frames). A worker that dies (a decoder crash on hostile media) breaks the
pool: the prompts it held are retried once on a fresh pool, and a prompt that breaks a pool
twice fails with a `MediaError` naming what happened; the engine and other requests go on.
Text-only prompts stay on threads (tokenizing one is cheaper than the round trip).

Measured (H200, `polymodal bench --workload serve`, 256 streamed 448 px image requests): 4
processes against none, alternating, two runs each: 89.8 / 81.7% of the offline rate against
91.5 / 86.1%, TTFT p50 1408 / 990 ms against 1360 / 1075: no gain there (the burst waits for
the GPU, not for processing), so it is off unless asked for (`polymodal serve
--media-processes N`). What it gives: a decoder crash on hostile media kills a worker, not the
engine, and CPU-heavy media (many videos at once) scales past one process's GIL.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from polymodal.llm_core.errors import MediaError
from polymodal.llm_prompts import prompt_modalities


@dataclass
class ProcessorSpec:
    """What a worker process needs to build the model's processor and process like `LLM`."""

    architecture: str
    model_dir: str
    model_name: str
    media_defaults: dict[str, Any]
    limit_mm_per_prompt: dict[str, int]
    cache_mb: float  # the processed-input cache of each worker (the LLM's share, split)
    options: dict[str, Any] = field(default_factory=dict)  # processor attributes (allow_http)

    @classmethod
    def of(cls, llm: Any, workers: int) -> ProcessorSpec:
        cache = getattr(llm.processor, "input_cache", None)
        return cls(
            architecture=llm.model_config.architecture,
            model_dir=str(llm.model_config.model_dir),
            model_name=llm.model_name,
            media_defaults=dict(llm.media_defaults),
            limit_mm_per_prompt=dict(llm.limit_mm_per_prompt),
            cache_mb=cache.max_bytes / (1 << 20) / workers if cache is not None else 0.0,
        )


class MediaProcesses:
    """`workers` processes running `process_prompt` for one model (see the module doc)."""

    def __init__(self, spec: ProcessorSpec, workers: int):
        if workers < 1:
            raise ValueError(f"media processes: need at least 1 worker, got {workers}")
        self.spec, self.workers = spec, workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None  # started on first use
        self._closed = False

    @staticmethod
    def takes(prompt: Any) -> bool:
        """Whether `prompt` carries media (those are worth a process's round trip)."""
        try:
            return bool(prompt_modalities(prompt))
        except Exception:  # noqa: BLE001 - a malformed prompt: the thread path reports it
            return False

    def start(self) -> None:
        """Start every worker and wait until each has built its processor (they import torch
        and load the tokenizer: seconds, paid at load time, not by the first requests)."""
        pool = self._current_pool()
        for ready in [pool.submit(_ready) for _ in range(self.workers)]:
            ready.result()

    def submit(self, prompt: Any) -> Future:
        """Process `prompt` in a worker: a Future of its `ProcessedPrompt` (host tensors,
        not staged), or of the error that stopped it."""
        result: Future = Future()
        self._run(prompt, result, retries=1)
        return result

    def set_option(self, name: str, value: Any) -> None:
        """Set a processor attribute in every worker (the pool restarts with it)."""
        with self._lock:
            self.spec.options[name] = value
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def close(self) -> None:
        """Stop taking prompts; the workers exit once their current one is done (or, when this
        process ends first, within a second of it: `_exit_with`)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _current_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("media processes are closed")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self.spec, os.getpid()),
                )
            return self._pool

    def _run(self, prompt: Any, result: Future, retries: int) -> None:
        pool = None
        try:
            pool = self._current_pool()
            job = pool.submit(_process, prompt)
        except (BrokenProcessPool, RuntimeError) as exc:  # broken, or shut down meanwhile
            self._broken(pool, prompt, result, retries, exc)
            return
        job.add_done_callback(lambda done: self._done(pool, prompt, result, retries, done))

    def _done(
        self, pool: ProcessPoolExecutor, prompt: Any, result: Future, retries: int, job: Future
    ) -> None:
        if job.cancelled():  # closed before a worker took it
            result.set_exception(RuntimeError("media processes are closed"))
            return
        error = job.exception()
        if isinstance(error, BrokenProcessPool):
            self._broken(pool, prompt, result, retries, error)
        elif error is not None:
            result.set_exception(error)
        else:
            kind, payload = job.result()
            try:
                value = pickle.loads(payload) if kind == "ok" else payload
            except Exception as exc:  # noqa: BLE001 - reported to this request only
                value, kind = exc, "error"
            result.set_result(value) if kind == "ok" else result.set_exception(value)

    def _broken(self, pool, prompt: Any, result: Future, retries: int, error: Exception) -> None:
        """A worker died: drop the broken pool (once) and retry on a fresh one, or fail."""
        with self._lock:
            if pool is not None and self._pool is pool:
                self._pool = None
            closed = self._closed
        if closed:
            result.set_exception(RuntimeError("media processes are closed"))
            return
        if retries > 0:
            self._run(prompt, result, retries - 1)
            return
        result.set_exception(
            MediaError(f"processing this prompt's media killed a worker process ({error})")
        )


# ---- the worker process ---------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _start_worker(spec: ProcessorSpec, parent_pid: int) -> None:
    """Build the processor as `LLM` does, with this worker's share of the input cache; exit
    when the process that started the pool is gone (killed: its pipes would keep us waiting)."""
    import torch

    threading.Thread(target=_exit_with, args=(parent_pid,), daemon=True).start()

    from polymodal.llm_core.registry import processor_class
    from polymodal.processors.input_cache import ProcessedInputCache
    from polymodal.processors.text import TextProcessor

    torch.set_num_threads(1)  # one prompt at a time per worker; the workers are the parallelism
    cls = processor_class(spec.architecture)
    if cls is None:
        from polymodal.llm_core.loader import load_tokenizer

        processor = TextProcessor(load_tokenizer(spec.model_dir))
    else:
        processor = cls.from_pretrained(spec.model_dir)
    if getattr(processor, "input_cache", None) is not None:
        processor.input_cache = ProcessedInputCache(spec.cache_mb) if spec.cache_mb else None
    for name, value in spec.options.items():
        setattr(processor, name, value)
    _worker.update(processor=processor, spec=spec)


def _exit_with(parent_pid: int, period: float = 1.0) -> None:
    """Exit this worker once its parent is not `parent_pid` any more (reparented)."""
    while os.getppid() == parent_pid:
        time.sleep(period)
    os._exit(0)


def _ready() -> bool:
    return "processor" in _worker


def _process(prompt: Any) -> tuple[str, Any]:
    """One prompt -> ("ok", pickled ProcessedPrompt) or ("error", a picklable exception)."""
    from polymodal.engine_process import picklable
    from polymodal.llm_options import check_mm_limits
    from polymodal.llm_prompts import process_prompt

    spec: ProcessorSpec = _worker["spec"]
    try:
        processed = process_prompt(
            _worker["processor"], prompt, spec.media_defaults, spec.model_name
        )
        check_mm_limits(processed.mm_items, spec.limit_mm_per_prompt)
        return "ok", pickle.dumps(processed, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - the error belongs to this prompt
        return "error", picklable(exc)
