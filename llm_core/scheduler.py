"""Continuous batching with chunked prefill under a per-step token budget.

Every step schedules, for each chosen request, a number of new tokens: 1 for a decoding
request, up to the remaining budget for a prefill (so one long prompt is split across steps,
and decodes are never starved behind it). Running requests go first, in arrival order; when
the block pool runs out, the most recently admitted running request is preempted (its blocks
freed, its tokens recomputed later), never the engine.

`policy="priority"` (vLLM's `scheduling_policy`): both queues are kept in the order of
(`Request.priority`, arrival), a lower value first: a waiting request is admitted before every
waiting request of a higher value, and a full pool preempts the running request of the highest
value (the latest to arrive among equals). Under the default `"fcfs"` every priority is 0.

Media add two limits to a prefill chunk (`_fit`):
- a request's `atomic_spans` (an image whose tokens a model attends to bidirectionally) are
  never cut: a chunk ends before such a span when the whole span does not fit, and a prefix
  hit never ends inside one;
- encoder work is budgeted per step like tokens: the embedding rows of items the step must
  encode (not in the encoder cache, not already encoded for another request of this step)
  count against `max_num_encoder_tokens`; a chunk ends before an item that would overflow it.
  The first item of a step always fits, however large, so nothing waits forever.
  Cross-attention items (encoder rows the decoder attends to, not slots) are encoded in the
  request's first step, whatever its chunk: all of them are booked then.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.request import CROSS_ATTENTION, Request, RequestStatus


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
        max_num_encoder_tokens: int | None = None,
        encoder_cache=None,
        lora=None,
        policy: str = "fcfs",
    ):
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy {policy!r}: one of {POLICIES}")
        self.policy = policy
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        # embedding rows the encoders may produce in one step (default: the token budget)
        self.max_num_encoder_tokens = max_num_encoder_tokens or max_num_batched_tokens
        # content hashes already encoded (anything with `in`; the runner's EncoderCache)
        self.encoder_cache = encoder_cache if encoder_cache is not None else {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # a statistic: total preemptions so far
        # LoRAManager when adapters are on: a request is admitted only with a slot for its
        # adapter; one that finds none waits while others behind it go ahead
        self.lora = lora

    def add(self, req: Request) -> None:
        self._wait(req)

    def _wait(self, req: Request, front: bool = False) -> None:
        """Queue `req`: at the back (fcfs; `front`: a preempted request, first again), or at
        its (priority, arrival) place."""
        if self.policy == "priority":
            self.waiting.insert(bisect.bisect(self.waiting, _rank(req), key=_rank), req)
        elif front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def _run(self, req: Request) -> None:
        """Add an admitted request to the running queue (priority: at its place, so the last
        is always the one to preempt)."""
        if self.policy == "priority":
            self.running.insert(bisect.bisect(self.running, _rank(req), key=_rank), req)
        else:
            self.running.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        encoding = _EncoderWork(self.max_num_encoder_tokens, self.encoder_cache)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.reaches_length:  # async scheduling: done once its last token lands
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.spec_token_ids:  # drafts are verified all in one step: keep those that fit
                n = _fit_drafts(req, n)
            if req.mm_items and req.num_computed_tokens < len(req.prompt_token_ids):
                n = self._fit(req, req.num_computed_tokens, n, encoding)
                if n == 0:  # its next image does not fit this step: wait for the next one
                    i += 1
                    continue
            while not self.kv.allocate_slots(req, n):
                if req.spec_token_ids:  # drafts never cost another request its place
                    n -= len(req.spec_token_ids)
                    req.spec_token_ids.clear()
                    continue
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
        no_slot: list[Request] = []  # waiting requests whose adapter has no slot this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if self.lora is not None and not self.lora.can_acquire(req):
                no_slot.append(self.waiting.popleft())
                continue
            # prompt logprobs are computed from the prompt's own forward pass: no cache hits
            cacheable = req.num_computed_tokens == 0 and req.prompt_logprobs is None
            computed = self.kv.get_computed_blocks(req) if cacheable else []
            hit = len(computed[0]) * self.kv.block_size if computed else 0  # per group lists
            inside = _span_around(req.atomic_spans, hit)
            if inside is not None:  # a hit never ends inside an atomic span
                computed = self.kv.get_computed_blocks(req, limit=inside[0])
                hit = len(computed[0]) * self.kv.block_size if computed else 0
            remaining = req.num_tokens - req.num_computed_tokens - hit
            n = min(remaining, budget)
            if n < remaining and not req.chunkable:  # runs whole, in a later step
                break
            if req.mm_items:
                mark = encoding.mark()
                n = self._fit(req, req.num_computed_tokens + hit, n, encoding)
                if n == 0:
                    break
            if not self.kv.allocate_slots(req, n, computed):
                if req.mm_items:
                    encoding.undo(mark)
                break
            self.waiting.popleft()
            if self.lora is not None:
                self.lora.acquire(req)  # can_acquire said yes: this takes the slot
            req.first_scheduled_time = req.first_scheduled_time or time.time()
            if req.num_cached_tokens is None:
                req.num_cached_tokens = hit
            req.status = RequestStatus.RUNNING
            self._run(req)
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        if self.policy == "priority":
            for req in no_slot:
                self._wait(req)
        else:
            self.waiting.extendleft(reversed(no_slot))  # back at the front, in their order
        return out

    def _fit(self, req: Request, start: int, n: int, encoding: _EncoderWork) -> int:
        """The largest chunk `[start, start + m)`, m <= n, that cuts no atomic span and whose
        new encoder work fits the step's encoder budget (booked in `encoding`)."""
        if req.num_encoder_rows and not req.block_tables:  # its first step: encode them all
            cross = [item for item in req.mm_items if item.target == CROSS_ATTENTION]
            if not encoding.take_all(cross):
                return 0
        end = start + n
        inside = _span_around(req.atomic_spans, end)
        if inside is not None:  # ends inside an image: stop before it, or take it whole
            end = inside[0] if inside[0] >= start else end
        for item in req.mm_items:
            if item.target == CROSS_ATTENTION:
                continue
            if item.slot_start >= end:
                break
            if item.slot_end <= start:
                continue
            if not encoding.take(item):  # over the encoder budget: stop before the item
                end = max(start, item.slot_start)
                break
        return end - start

    def _preempt(self, req: Request) -> None:
        """Free all of `req`'s blocks; it recomputes prompt + outputs so far when readmitted."""
        self.kv.free_request(req)
        if self.lora is not None:
            self.lora.release(req)
        req.spec_token_ids.clear()
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self._wait(req, front=True)

    def update(self, out: SchedulerOutput) -> None:
        """After launching the forward pass: advance computed counts, register full blocks,
        and count the token each caught-up request samples as pending until it is read back."""
        for req, n in zip(out.requests, out.num_new_tokens):
            req.cross_pending = False  # the launched step wrote its encoder rows' K/V
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
        if self.lora is not None:
            self.lora.release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = req.finish_reason or reason

    def finish_all(self, reqs: list[Request], reason: str) -> None:
        """`finish` of each of `reqs` (a pooling step's prompts), with one pass over the running
        queue instead of a search per request."""
        done = {id(req) for req in reqs if not req.is_finished}
        if not done:
            return
        kept = [req for req in self.running if id(req) not in done]
        removed = {id(req) for req in self.running} - {id(req) for req in kept}
        self.running[:] = kept
        for req in reqs:
            if id(req) not in removed:  # not running (or listed twice): the plain way
                self.finish(req, reason)
                continue
            removed.discard(id(req))
            self.kv.free_request(req)
            if self.lora is not None:
                self.lora.release(req)
            req.status = RequestStatus.FINISHED
            req.finish_reason = req.finish_reason or reason


POLICIES = ("fcfs", "priority")


def _fit_drafts(req: Request, n: int) -> int:
    """`n` (a budget-capped step of `req`) with `req`'s drafts cut to those that fit in it."""
    base = req.num_tokens - req.num_computed_tokens - len(req.spec_token_ids)
    del req.spec_token_ids[max(0, n - base) :]
    return min(n, base + len(req.spec_token_ids))


def _rank(req: Request) -> tuple[int, float]:
    """A request's place under the priority policy: lower priority values, then arrivals."""
    return req.priority, req.arrival_time


def _span_around(spans: list[tuple[int, int]], position: int) -> tuple[int, int] | None:
    """The span `(a, b)` with `a < position < b` (a cut at `position` would split it)."""
    for span in spans:
        if span[0] < position < span[1]:
            return span
    return None


class _EncoderWork:
    """The encoder rows one step books: items not in the encoder cache, each hash once."""

    def __init__(self, budget: int, cache):
        self.budget = budget
        self.cache = cache
        self.used = 0
        self.hashes: list[str] = []

    def take(self, item) -> bool:
        """Book `item`'s encoding if it needs one and fits (the step's first always fits)."""
        key = item.content_hash
        if key in self.cache or key in self.hashes or "embeds" in item.data:
            return True  # cached, booked, or given as embeddings: no encoder work
        cost = item.num_embeds
        if self.hashes and self.used + cost > self.budget:
            return False
        self.used += cost
        self.hashes.append(key)
        return True

    def take_all(self, items: list) -> bool:
        """Book `items` together (a request's cross-attention items, all encoded in its first
        step): they fit when the step has booked nothing yet, else within the budget."""
        todo = {}
        for item in items:
            key = item.content_hash
            if key not in self.cache and key not in self.hashes:
                todo[key] = item.num_embeds
        cost = sum(todo.values())
        if self.hashes and self.used + cost > self.budget:
            return False
        self.used += cost
        self.hashes.extend(todo)
        return True

    def mark(self) -> tuple[int, int]:
        return self.used, len(self.hashes)

    def undo(self, mark: tuple[int, int]) -> None:
        """Forget what was booked since `mark` (a request that was not admitted after all)."""
        self.used, count = mark
        del self.hashes[count:]
