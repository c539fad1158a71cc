"""A request's media items preprocessed side by side, on a small process-wide thread pool.

Decoding (PIL, decord, PyAV), resizing (torch) and hashing (BLAKE3) release the GIL, so the
items of one request (several images, a video next to them) overlap: eight 1080p JPEGs through
the Qwen-VL processor ran 1.57x faster on two lightly loaded cores, two 64-frame videos 1.66x
(docs/performance.md). A job running
in the pool never waits on the pool (a nested call runs its jobs inline), so a full pool cannot
deadlock; processors called from many request threads at once share its workers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
THREAD_PREFIX = "polymodal-media-item"
_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            workers = min(8, os.cpu_count() or 1)
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix=THREAD_PREFIX)
        return _POOL


def run_items(jobs: list[Callable[[], T]]) -> list[T]:
    """`[job() for job in jobs]`, the jobs side by side when there are several: results in
    order, and when jobs fail, the error of the first failing one in order (as running them one
    after another would raise), after every job has ended."""
    if len(jobs) < 2 or threading.current_thread().name.startswith(THREAD_PREFIX):
        return [job() for job in jobs]
    futures = [_pool().submit(job) for job in jobs]
    for future in futures:  # every job ends before the caller moves on (or sees an error)
        future.exception()
    return [future.result() for future in futures]
