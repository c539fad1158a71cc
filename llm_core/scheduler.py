"""Continuous batching with chunked prefill under a per-step token budget.

Every step schedules, for each chosen request, a number of new tokens: 1 for a decoding
request, up to the remaining budget for a prefill (so one long prompt is split across steps,
and decodes are never starved behind it). Running requests go first, in arrival order; when
the block pool runs out, the most recently admitted running request is preempted (its blocks
freed, its tokens recomputed later), never the engine.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """This step's work: requests and how many new tokens each runs, in batch order."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    """Owns the waiting and running queues and the KV block bookkeeping."""

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
    ):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # a statistic: total preemptions so far

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.reaches_length:  # async scheduling: done once its last token lands
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()  # lowest priority: admitted last
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
        if out.preempted:  # the pool is full: admit nobody new this step
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            # prompt logprobs are computed from the prompt's own forward pass: no cache hits
            cacheable = req.num_computed_tokens == 0 and req.prompt_logprobs is None
            computed = self.kv.get_computed_blocks(req) if cacheable else []
            hit = len(computed[0]) * self.kv.block_size if computed else 0  # per group lists
            remaining = req.num_tokens - req.num_computed_tokens - hit
            n = min(remaining, budget)
            if n < remaining and not req.chunkable:  # runs whole, in a later step
                break
            if not self.kv.allocate_slots(req, n, computed):
                break
            self.waiting.popleft()
            req.first_scheduled_time = req.first_scheduled_time or time.time()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def _preempt(self, req: Request) -> None:
        """Free all of `req`'s blocks; it recomputes prompt + outputs so far when readmitted."""
        self.kv.free_request(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput) -> None:
        """After launching the forward pass: advance computed counts, register full blocks,
        and count the token each caught-up request samples as pending until it is read back."""
        for req, n in zip(out.requests, out.num_new_tokens):
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens and not req.pooling:
                req.num_pending += 1
            self.kv.cache_full_blocks(req)

    def finish(self, req: Request, reason: str) -> None:
        """Remove a request (finished or aborted) and free its blocks."""
        if req.is_finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free_request(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = req.finish_reason or reason
