"""Whisper transcription through an `LLM`: language detection, timestamp segments and audio
longer than one window (`processors/whisper_transcription.Transcription`), many clips batched.

    for done in run_transcriptions(llm, [(key, "talk.mp3", params, {"timestamps": True})]):
        done.output.segments      # a `Transcript` (or done.error)

Each clip's requests (language detection, then window after window) go through
`feeder.run_prompts`, so the windows of many clips share the engine's batches; clips are
decoded and their log-mel features computed on `workers` threads, a few ahead of the engine.
`Pipeline(audio=...)` and `polymodal transcribe` run on this; the server's audio routes drive
the same `Transcription` from asyncio.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from typing import Any

from polymodal.feeder import PROCESS_WORKERS, Finished, run_prompts
from polymodal.llm_core.errors import InvalidInputError
from polymodal.processors.whisper_transcription import Transcription

# Clips loaded (decoded, features made) ahead of the engine. A step admits only clips that
# are loaded, and every step that admits some runs eagerly (it writes their encoder rows), so
# few clips ahead meant many small admissions: with 4, 128 clips entered over 32+ eager steps,
# where one H200 step's encoder budget (16384 rows) takes 10 windows of 1500 rows.
LOAD_AHEAD = 16


def model_aligner(llm: Any) -> Any:
    """The cross-attention of `llm`'s Whisper model for word timestamps (a teacher-forced pass
    on the engine's model, between engine steps); InvalidInputError under tensor parallelism
    (the model's weights are sharded)."""
    from functools import partial

    from polymodal.llm_core.models.whisper_alignment import cross_attention_weights

    if llm.engine.executor is not None:
        raise InvalidInputError("word timestamps do not run with tensor_parallel_size > 1")
    return partial(cross_attention_weights, llm.engine.runner.model)


def feature_device(llm: Any) -> Any:
    """Where a clip's log-mel features are made: the model's device when it is a GPU (the
    engine runs in this process), else None (the host)."""
    device = llm.engine.runner.model.media_device_dtype()[0]
    return device if device.type == "cuda" else None


def takes_transcription(processor: Any) -> bool:
    """Whether the processor builds Whisper's task prompts (language / task / timestamps)."""
    return "timestamps" in getattr(processor, "MEDIA_OPTIONS", ())


class _Requests:
    """The engine requests of many transcriptions, as `run_prompts` reads them: follow-ups of
    running clips first, then the next clip's first ones. It runs dry (StopIteration) while
    requests are in the engine, and waits for a clip to load only when none are."""

    def __init__(self, llm: Any, jobs: Iterable, workers: int):
        self.llm = llm
        self.jobs = iter(jobs)
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="polymodal-audio")
        self.device = feature_device(llm)
        self.loading: deque[tuple[Any, Future]] = deque()
        self.queue: deque[tuple[Any, Any, Any]] = deque()
        self.running: dict[Any, Transcription] = {}
        self.errors: list[Finished] = []
        self.in_engine = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Any, Any, Any]:
        while not self.queue and self._start_next():
            pass
        if not self.queue:
            raise StopIteration
        self.in_engine += 1
        return self.queue.popleft()

    def _start_next(self) -> bool:
        """Queue the first requests of the next loaded clip; False when there is nothing to
        start now (none loaded yet while requests run, or no clip left)."""
        while len(self.loading) < LOAD_AHEAD:
            job = next(self.jobs, None)
            if job is None:
                break
            key, audio, params, options = job
            if options.get("word_timestamps"):
                try:
                    options = {**options, "aligner": model_aligner(self.llm)}
                except InvalidInputError as exc:
                    self.errors.append(Finished(key, error=exc))
                    continue
            load = self.pool.submit(
                Transcription.load, self.llm.processor, audio, params, self.device, **options
            )
            self.loading.append((key, load))
        if not self.loading or (self.in_engine and not self.loading[0][1].done()):
            return False
        key, load = self.loading.popleft()
        try:
            transcription = load.result()
        except Exception as exc:  # noqa: BLE001 - this clip's error; the others go on
            self.errors.append(Finished(key, error=exc))
            return True
        self.running[key] = transcription
        self.queue.extend(((key, tag), prompt, p) for tag, prompt, p in transcription.requests())
        return True

    def finish(self, done: Finished) -> Finished | None:
        """Feed one request's end to its clip; the clip's `Finished` when it ended."""
        self.in_engine -= 1
        key, tag = done.key
        transcription = self.running.get(key)
        if transcription is None:  # the clip already failed
            return None
        if done.error is not None:
            del self.running[key]
            return Finished(key, error=done.error)
        transcription.add_output(tag, done.output)
        if transcription.done:
            del self.running[key]
            return Finished(key, output=transcription.result())
        batch = transcription.requests()
        self.queue.extend(((key, t), prompt, p) for t, prompt, p in batch)
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def run_transcriptions(
    llm: Any,
    jobs: Iterable[tuple[Any, Any, Any, dict[str, Any]]],
    *,
    workers: int = PROCESS_WORKERS,
    max_in_flight: int | None = None,
) -> Iterator[Finished]:
    """Transcribe `(key, audio, SamplingParams, options)` jobs with `llm` (a Whisper `LLM`);
    yield a `Finished` per clip as it ends: `output` a `Transcript`, or `error`.

    `options`: `Transcription`'s (`language` (None: detected), `task`, `timestamps`,
    `previous_text`, `details`, the fallback `temperatures` and thresholds,
    `condition_on_prev_tokens`, `word_timestamps`). At most `max_in_flight` requests run at
    once (default: the engine's `max_num_seqs`). Closing the iterator early aborts what is in
    flight.
    """
    requests = _Requests(llm, jobs, workers)
    engine_side = run_prompts(llm, requests, workers=workers, max_in_flight=max_in_flight)
    try:
        with closing(engine_side):
            for done in engine_side:
                yield from _drain(requests.errors)
                finished = requests.finish(done)
                if finished is not None:
                    yield finished
            yield from _drain(requests.errors)
    finally:
        requests.close()


async def transcribe_async(
    engine: Any, processor: Any, audio: Any, params: Any, **options: Any
) -> Any:
    """One clip through an `AsyncEngine` (the server): its `Transcript`. The audio is decoded
    on a thread; each batch of the clip's requests runs concurrently with other requests."""
    transcription = await load_async(engine, processor, audio, params, **options)
    async for _ in run_windows(engine, transcription):  # (the text so far: streams use it)
        pass
    return transcription.result()


async def load_async(engine: Any, processor: Any, audio: Any, params: Any, **options: Any):
    """A clip's `Transcription` for `run_windows`, its audio decoded on a thread (a bad clip
    raises here, before any engine work)."""
    if options.get("word_timestamps"):  # the alignment pass runs where the model is
        options = {**options, "aligner": lambda *args: engine.align_later(*args).result()}
    return await asyncio.to_thread(Transcription.load, processor, audio, params, **options)


async def run_windows(engine: Any, transcription: Transcription) -> AsyncIterator[str]:
    """Run `transcription`'s requests on `engine` batch after batch (each batch concurrently
    with other requests), yielding the text decided so far after each batch: the segments'
    text, which grows as windows are accepted (a retried window adds nothing until kept)."""
    words = transcription.words is not None
    while not transcription.done:
        batch = transcription.requests()
        outputs = await asyncio.gather(*(engine.generate(prompt, p) for _, prompt, p in batch))
        for (tag, _, _), output in zip(batch, outputs):
            if words:  # the alignment pass waits on the engine: off the event loop
                await asyncio.to_thread(transcription.add_output, tag, output)
            else:
                transcription.add_output(tag, output)
        yield transcription.text_so_far()


def _drain(errors: list[Finished]) -> Iterator[Finished]:
    while errors:
        yield errors.pop(0)
