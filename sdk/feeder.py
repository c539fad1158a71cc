"""The one loop that drives an engine over many prompts: `LLM.generate`, `Pipeline` batches,
`polymodal caption`, the Ray predictor and the bench all run through `run_prompts`.

Prompts are processed (media loaded, resized, hashed, staged on the device; the template
rendered and tokenized; a structured-output grammar compiled: `LLM.prepare`) on worker
threads, up to `PREFETCH` ahead of the engine, while the calling thread steps the engine: host
work overlaps the GPU, and a full batch stays in flight. A single prompt is processed inline
(no thread hand-off on the time to first token).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# Threads processing prompts ahead of the engine. A few keep ahead of it; more hold the GIL
# that the engine loop needs to launch its steps (H200, 512 448x448 images, the bench's
# captioning: 78.5 images/s with 2 threads, 74.2 with 4, 61-69 with 8).
PROCESS_WORKERS = 2
# Prompts processed ahead of the engine, at most (a step's token budget takes ~56 448x448
# images). Processing everything at once front-loads the workers' share of the GIL onto the
# first steps, whose launches then wait for it: 512 images at 76.6-78.3 images/s all at once,
# 79.5-79.9 with 64 ahead (H200, same process).
PREFETCH = 64


@dataclass
class Finished:
    """One prompt's end: its final output, or the error that stopped it (processing or
    queueing: bad media, a prompt that is too long)."""

    key: Any
    output: Any = None  # RequestOutput
    error: Exception | None = None


def run_prompts(
    llm: Any,
    items: Iterable[tuple[Any, Any, Any]],
    *,
    workers: int = PROCESS_WORKERS,
    prefetch: int | None = None,
    max_in_flight: int | None = None,
) -> Iterator[Finished]:
    """Run `(key, prompt, SamplingParams)` items (or `(key, prompt, params, lora_request)`)
    through `llm` (a `polymodal.LLM`); yield a `Finished` per item as it ends, in completion
    order.

    At most `max_in_flight` requests (default: the engine's `max_num_seqs`, a full batch) are
    in the engine, and at most `prefetch` more processed ahead on `workers` threads
    (`workers=0`: processed inline; `prefetch` defaults to `PREFETCH`). Closing the iterator
    early aborts what is in flight. `items` is read again after every step: an iterator that
    ran dry may yield more once outputs came back (`polymodal.speech` feeds follow-up requests
    that way).
    """
    engine = llm.engine
    max_in_flight = max_in_flight or engine.scheduler.max_num_seqs
    prefetch = PREFETCH if prefetch is None else prefetch
    upcoming = iter(items)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="polymodal-process") if workers else None
    ahead: deque[tuple[Any, Future | Any, Any]] = deque()
    in_flight: dict[str, Any] = {}  # request id -> key

    def refill() -> None:
        while len(ahead) < min(max_in_flight, prefetch):
            item = next(upcoming, None)
            if item is None:
                return
            key, prompt, params, *lora = item
            job = pool.submit(llm.prepare, prompt, params) if pool else prompt
            ahead.append((key, job, params, lora[0] if lora else None))

    try:
        refill()
        while ahead or in_flight:
            # feed: take processed prompts while there is room; wait only if the engine idles
            while ahead and len(in_flight) < max_in_flight:
                key, pending, params, lora_request = ahead[0]
                if pool and in_flight and not pending.done():
                    break
                ahead.popleft()
                try:
                    p, grammar = pending.result() if pool else llm.prepare(pending, params)
                    request_id = engine.add_processed(p, params, None, grammar, lora_request)
                    in_flight[request_id] = key
                except Exception as exc:  # noqa: BLE001 - this item's error, the rest go on
                    yield Finished(key, error=exc)
                refill()
            if not in_flight:
                continue
            for out in engine.step(finished_only=True):  # no per-token outputs to build
                if out.request_id in in_flight:
                    yield Finished(in_flight.pop(out.request_id), output=out)
            refill()  # `items` may grow as outputs arrive (the next window of a clip)
    finally:
        for request_id in in_flight:
            engine.abort(request_id)
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
