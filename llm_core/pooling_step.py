"""The engine's pooling step: run the scheduled prompt chunks, pool every prompt whose last chunk
ran, and copy the pooled tensors to the host (`PoolingFlight`).

A step of whole prompts through a model without a KV cache (BERT, RoBERTa: every step of an
encoder-only model) takes the fast path, `whole_prompt_batch`: its token ids go to the device in
one copy (concatenated from each request's host tensor, `Request.prompt_tensor`, when it has
one), positions are made on the device, no slot or block table is built, and the model's
pooler gathers its rows from the step's hidden states in one op (`PromptRows`). Other steps
(causal pooling models with a KV cache, chunked prompts) build the general flat batch
(step_batch.py) and keep each prompt's hidden chunks until it is whole.

The pooled tensors go to the host in one copy per step. With async scheduling the copy is
queued behind an event (`PoolingFlight.resolve` waits for it), so the engine can launch the
next step before this one's results are read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, chain

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.host_copy import host_tensor, to_device, upload_tensors
from polymodal.llm_core.layers.embedding import merge_multimodal_embeddings
from polymodal.llm_core.media_inputs import media_key_ranges, slot_embeddings, step_has_media
from polymodal.llm_core.pooling import (
    PoolingInput,
    PoolingOutput,
    PoolingRequestOutput,
    PromptRows,
)
from polymodal.llm_core.request import Request
from polymodal.llm_core.scheduler import SchedulerOutput


@dataclass
class PoolingFlight:
    """A launched pooling step: the requests it finished and their pooled outputs, which are
    on the host once `event` completes (None: already there)."""

    requests: list[Request]
    host: torch.Tensor | list[torch.Tensor]  # [prompts, ...], or flat (see `shapes`)
    shapes: list[torch.Size] | None = None  # per prompt, when `host` is their flat concat
    event: torch.cuda.Event | None = None

    @classmethod
    def start(cls, requests: list[Request], pooled, overlap: bool) -> PoolingFlight:
        """Queue the copy of `pooled` (one tensor per request, or one `[requests, ...]`) to
        the host: one copy where they share a dtype; behind an event with `overlap`."""
        shapes = None
        if not isinstance(pooled, torch.Tensor):
            if not pooled or pooled[0].device.type == "cpu" or len({t.dtype for t in pooled}) > 1:
                return cls(requests, [t.cpu() for t in pooled])
            shapes = [t.shape for t in pooled]
            pooled = torch.cat([t.reshape(-1) for t in pooled])
        if pooled.device.type == "cpu":
            return cls(requests, pooled, shapes)
        if not overlap:
            return cls(requests, pooled.cpu(), shapes)
        host = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
        host.copy_(pooled, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(requests, host, shapes, event)

    def outputs(self, seq_to_group: dict, groups: dict) -> list[PoolingRequestOutput]:
        """The step's outputs, one a request, each forgotten from the engine's maps
        (`seq_to_group`: sequence id -> (group, index); `groups`: request id -> group); a
        request aborted after the launch is skipped."""
        outputs = []
        for seq, data in zip(self.requests, self.resolve()):
            entry = seq_to_group.pop(seq.request_id, None)
            if entry is None:  # aborted after its step was launched
                continue
            group = entry[0]
            groups.pop(group.request_id, None)
            out = PoolingOutput(data)
            outputs.append(PoolingRequestOutput(group.request_id, group.prompt_token_ids, out))
        return outputs

    def resolve(self) -> list[torch.Tensor]:
        """Each request's pooled tensor on the host (waits for this step's copy only)."""
        if self.event is not None:
            self.event.synchronize()
        if isinstance(self.host, list):
            return self.host
        if self.shapes is None:
            return list(self.host.unbind(0))
        sizes = [s.numel() for s in self.shapes]
        return [part.view(s) for part, s in zip(self.host.split(sizes), self.shapes)]


def runs_whole_prompts(runner, sched: SchedulerOutput) -> bool:
    """Whether every request of the step runs its whole prompt in it and no layer keeps a KV
    cache (an encoder-only model's steps): the fast path's conditions."""
    if runner.executor is not None:
        return False
    for req, n in zip(sched.requests, sched.num_new_tokens):
        if req.num_computed_tokens or n != len(req.prompt_token_ids) or req.block_tables:
            return False
    return True


def whole_prompt_batch(sched: SchedulerOutput, device: torch.device, with_types: bool):
    """(input_ids int64 `[num_tokens]`, positions int64 `[num_tokens]`, segment ids or None,
    attention metadata) of a step of whole prompts without KV cache, in one host-to-device
    copy. Segment ids (`with_types`) are None when no request gave any (the model's zeros)."""
    reqs, lens = sched.requests, sched.num_new_tokens
    num_seqs, total = len(reqs), sum(lens)
    tensors = [r.prompt_tensor for r in reqs]
    if all(t is not None for t in tensors):
        ids = torch.cat(tensors)  # [num_tokens] int64, views of the add-time tensors
    else:
        ids = host_tensor(list(chain.from_iterable(r.prompt_token_ids for r in reqs)), torch.int64)
    # query starts, then lengths from a 16-byte boundary (as int32, the kernels' type)
    pad = -(-(num_seqs + 1) // 4) * 4
    starts_lens = [0, *accumulate(lens), *[0] * (pad - num_seqs - 1), *lens]
    counts = host_tensor(starts_lens, torch.int64)
    parts = [counts, ids]
    typed = with_types and any(r.token_type_ids is not None for r in reqs)
    if typed:
        types = chain.from_iterable(r.token_type_ids or [0] * n for r, n in zip(reqs, lens))
        parts.append(host_tensor(list(types), torch.int64))
    counts, input_ids, *types = upload_tensors(parts, device)
    small = counts.to(torch.int32)
    starts, seq_lens = small[: num_seqs + 1], small[pad:]
    # position of each token inside its prompt: its index minus its prompt's first index
    first = torch.repeat_interleave(counts[:num_seqs], counts[pad:], output_size=total)
    positions = torch.arange(total, device=device) - first
    meta = AttentionMetadata(
        query_start_loc=starts,
        seq_lens=seq_lens,
        block_tables=torch.zeros((num_seqs, 0), dtype=torch.int32, device=device),
        slot_mapping=torch.full((total,), -1, dtype=torch.int64, device=device),  # none stored
        max_query_len=max(lens),
        max_seq_len=max(lens),
        is_decode=total == num_seqs,
        query_lens_cpu=lens,
        seq_lens_cpu=lens,
    )
    return input_ids, positions, types[0] if typed else None, meta


@torch.inference_mode()
def launch_pooling_step(runner, sched: SchedulerOutput, overlap: bool = False) -> PoolingFlight:
    """Run this step's prompt chunks through `runner.model`; every prompt whose last chunk ran
    is pooled and its output's copy to the host queued (`PoolingFlight.resolve` reads it)."""
    model = runner.model
    whole = runs_whole_prompts(runner, sched)
    if whole:
        input_ids, positions, token_types, meta = whole_prompt_batch(
            sched, runner.device, model.embeds_positions
        )
    else:
        hb = runner.host_batch(sched)
        media = step_has_media(sched)
        if media and runner.bidirectional_media:
            hb.key_ranges = media_key_ranges(sched)
        input_ids, positions, meta = runner.prepare(sched, hb)
        token_types = segment_ids(sched, input_ids.device) if model.embeds_positions else None
    if model.embeds_positions:  # absolute position (and segment) embeddings: BERT
        embeds = model.embed(input_ids, positions, token_types)
    else:
        embeds = model.embed(input_ids)
    if not whole and media:  # a multimodal embedding model's prompts: media fill their slots
        slot_idx, mm = slot_embeddings(sched, model, runner.encoder_cache, runner.device)
        embeds = merge_multimodal_embeddings(embeds, slot_idx, mm)
    hidden = model(positions, embeds, runner.kv_caches, meta)  # [num_tokens, hidden]
    if whole:
        done = sched.requests
        rows = PromptRows(hidden, meta.query_start_loc, sched.num_new_tokens)
    else:
        done, rows = _gather_chunks(sched, hidden)
    if not done:
        return PoolingFlight([], [])
    prompts = [PoolingInput(req.prompt_token_ids, req.params) for req in done]
    return PoolingFlight.start(done, model.pool(rows, prompts), overlap)


def segment_ids(sched: SchedulerOutput, device: torch.device) -> torch.Tensor:
    """Each scheduled token's segment id (0 where the request gave none) on `device`."""
    types: list[int] = []
    for req, n in zip(sched.requests, sched.num_new_tokens):
        start = req.num_computed_tokens
        types += (req.token_type_ids or [0] * (start + n))[start : start + n]
    return to_device(types, torch.int64, device)


def _gather_chunks(sched: SchedulerOutput, hidden: torch.Tensor):
    """Keep each request's rows of `hidden`; returns the requests whose prompt is now whole
    and their rows `[len, hidden]` (chunks concatenated)."""
    done, rows, offset = [], [], 0
    for req, n in zip(sched.requests, sched.num_new_tokens):
        start = req.num_computed_tokens
        if start == 0:  # a first chunk (or a recompute after preemption)
            req.hidden_chunks = []
        req.hidden_chunks.append(hidden[offset : offset + n])
        offset += n
        if start + n == len(req.prompt_token_ids):
            chunks, req.hidden_chunks = req.hidden_chunks, []
            rows.append(chunks[0] if len(chunks) == 1 else torch.cat(chunks))  # [len, hidden]
            done.append(req)
    return done, rows


def pooling_engine_step(engine) -> list[PoolingRequestOutput]:
    """`Engine.step` of a pooling model: the queued prompts it may admit are built and handed
    to the scheduler, the scheduled prompt chunks run, whole prompts are pooled, finished and
    returned. With async scheduling the step's outputs are read back in the next call, after
    it launched its own step (outputs lag one step)."""
    flight, engine._pool_flight = engine._pool_flight, None
    admit_pooling(engine)
    sched = engine.scheduler.schedule()
    launched = None
    if sched:
        launched = launch_pooling_step(engine.runner, sched, engine.async_scheduling)
        engine.scheduler.update(sched)
        engine.scheduler.finish_all(launched.requests, "stop")  # pooled: nothing more to run
    groups = engine._seq_to_group, engine._groups
    outputs = flight.outputs(*groups) if flight is not None else []
    if launched is not None and engine.async_scheduling:
        engine._pool_flight = launched
    elif launched is not None:
        outputs += launched.outputs(*groups)
    return outputs


def admit_pooling(engine) -> None:
    """Build the queued pooling prompts the next schedule may admit and hand them over."""
    if engine._pooling:
        for group in engine._pooling.admit(engine.scheduler, engine.runner.model.is_causal):
            engine._queue(group)
