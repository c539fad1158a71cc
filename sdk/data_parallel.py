"""Data parallelism (vLLM's `--data-parallel-size N`): N engine processes of one model, each on
its own GPUs (rank r: GPUs `[r * tp, (r + 1) * tp)` of those visible, tp the tensor-parallel
size), behind one `AsyncEngine` and one server.

`DataParallelCores` has the interface of one `EngineProcess`. A request goes to the rank its
prompt's prefix hashes to (`prefix_key`: a conversation's first two messages, a text's first
characters, the first token ids), so a conversation's turns and prompts sharing a long prefix
meet that rank's prefix cache, unless that rank has `SLACK` more open requests (submitted and
not yet ended: a finished output, an error or an abort's END) than the least loaded one, which
then takes it. Its aborts follow it. Prompt processing calls (`/tokenize`, beam
search) go round the ranks; processor options and control calls (sleep mode, adapters
checked or removed) go to every rank, and a control call answers with rank 0's result once
every rank has answered (the first error, if any rank fails). Stats are summed over the ranks.
If any rank dies, every open request fails, as with one engine process.
"""

from __future__ import annotations

import itertools
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields
from functools import partial
from typing import Any

from polymodal.engine_loop import EngineStats
from polymodal.engine_process import EngineProcess
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.outputs import RequestOutput

# A prompt goes to its home rank unless that has SLACK more open requests than the least
# loaded; the prefix that picks the home: characters of a text, token ids
SLACK, PREFIX_CHARS, PREFIX_IDS = 8, 512, 128


class SummedStats:
    """`EngineStats` read as the sum over the ranks' (each refreshed by its reader thread)."""

    def __init__(self, parts: list[EngineStats]):
        self._parts = parts

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return sum(getattr(part, name) for part in self._parts)

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(EngineStats))


class DataParallelCores:
    """`size` engine processes serving one model (see the module doc)."""

    def __init__(
        self,
        size: int,
        model: str,
        engine_kwargs: dict[str, Any],
        emit: Callable[[list[tuple[str, Any]]], None],
        on_death: Callable[[Exception], None],
        **process_kwargs: Any,
    ):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidInputError(f"data_parallel_size must be an int >= 1, got {size!r}")
        self._emit = emit
        self._lock = threading.Lock()
        self._owner: dict[str, int] = {}  # open request id -> its rank
        self._open = [0] * size
        self._turn = itertools.count()
        envs = rank_environments(size, engine_kwargs)
        start = lambda rank: EngineProcess(  # noqa: E731
            model, engine_kwargs, partial(self._emit_from, rank), on_death, env=envs[rank],
            **process_kwargs,
        )  # fmt: skip
        with ThreadPoolExecutor(size) as pool:  # the ranks load their models at once
            futures = [pool.submit(start, rank) for rank in range(size)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            for f in futures:
                if f.exception() is None:
                    f.result().close()
            raise errors[0]
        self.cores = [f.result() for f in futures]
        self.info = self.cores[0].info
        self.stats = SummedStats([core.stats for core in self.cores])

    @property
    def alive(self) -> bool:
        return all(core.alive for core in self.cores)

    def submit(self, request_id: str, prompt: Any, params: Any, lora_request: Any = None) -> None:
        key = prefix_key(prompt)
        with self._lock:
            rank = min(range(len(self.cores)), key=self._open.__getitem__)
            if key is not None:
                home = zlib.crc32(key) % len(self.cores)
                rank = home if self._open[home] <= self._open[rank] + SLACK else rank
            self._open[rank] += 1
            self._owner[request_id] = rank
        self.cores[rank].submit(request_id, prompt, params, lora_request)

    def abort(self, request_id: str) -> None:
        with self._lock:
            rank = self._owner.get(request_id)
        if rank is not None:
            self.cores[rank].abort(request_id)

    def set_processor_option(self, name: str, value: Any) -> None:
        for core in self.cores:
            core.set_processor_option(name, value)

    def process_later(self, prompt: Any) -> Future:
        return self._next_core().process_later(prompt)

    def align_later(self, features: Any, token_ids: list[int], heads: list) -> Future:
        return self._next_core().align_later(features, token_ids, heads)

    def control_later(self, name: str, *args: Any) -> Future:
        """The call on every rank: rank 0's result once all answered (or the first error)."""
        parts = [core.control_later(name, *args) for core in self.cores]
        done, remaining, lock = Future(), [len(parts)], threading.Lock()

        def finished(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            error = next((p.exception() for p in parts if p.exception() is not None), None)
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(parts[0].result())

        for part in parts:
            part.add_done_callback(finished)
        return done

    def close(self, timeout: float = 10.0) -> None:
        for core in self.cores:
            core.close(timeout)

    def _next_core(self) -> EngineProcess:
        return self.cores[next(self._turn) % len(self.cores)]

    def _emit_from(self, rank: int, items: list[tuple[str, Any]]) -> None:
        """A rank's items, passed on; the requests they end no longer count as open there."""
        with self._lock:
            for request_id, item in items:
                ended = not isinstance(item, RequestOutput) or item.finished
                if ended and self._owner.pop(request_id, None) is not None:
                    self._open[rank] -= 1
        self._emit(items)


def prefix_key(prompt: Any) -> bytes | None:
    """What decides a prompt's home rank: the first two messages of a conversation (its
    system prompt and first turn: the same for every later turn), else the first
    `PREFIX_CHARS` characters of a text or `PREFIX_IDS` token ids; None for other prompts."""
    if isinstance(prompt, dict):
        if "messages" in prompt:
            prompt = prompt["messages"]
        else:
            prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
    if isinstance(prompt, str):
        return prompt[:PREFIX_CHARS].encode()
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return repr(prompt[:PREFIX_IDS]).encode()
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return "\x00".join(_message_text(m) for m in prompt[:2]).encode()
    return None


def _message_text(message: dict) -> str:
    """A message's role and text, media parts by the start of their URL or path (a PIL
    image or bytes: by their kind only)."""
    content = message.get("content")
    if not isinstance(content, list):
        return f"{message.get('role')}:{str(content)[:PREFIX_CHARS]}"
    parts = []
    for part in content:
        kind = part.get("type", "") if isinstance(part, dict) else ""
        value = part.get(kind) if isinstance(part, dict) else None
        value = value.get("url") if isinstance(value, dict) else value
        parts.append(f"{kind}={value[:256] if isinstance(value, str) else ''}")
    return f"{message.get('role')}:{'|'.join(parts)}"


def rank_environments(size: int, engine_kwargs: dict[str, Any]) -> list[dict[str, str]]:
    """Each rank's `CUDA_VISIBLE_DEVICES`: its `tensor_parallel_size` GPUs in order, of those
    this process sees; none for a CPU engine. Too few GPUs is an error naming the count."""
    device = str(engine_kwargs.get("device") or "")
    if device.startswith("cpu"):
        return [{} for _ in range(size)]
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible is not None else None
    if gpus is None:
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        if size > 1 and device.startswith("cuda"):
            raise InvalidInputError("data_parallel_size > 1 on CUDA, but no GPU is visible")
        return [{} for _ in range(size)]  # no GPU: every rank runs on the CPU
    tp = int(engine_kwargs.get("tensor_parallel_size") or 1)
    if size * tp > len(gpus):
        raise InvalidInputError(
            f"data_parallel_size={size} x tensor_parallel_size={tp} needs {size * tp} GPUs; "
            f"{len(gpus)} are visible"
        )
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[r * tp : (r + 1) * tp])} for r in range(size)]
