"""One step's flat batch: every scheduled token of every request, concatenated.

`host_batch` builds it as host lists from a `SchedulerOutput` (`HostBatch`: ids, positions,
each KV group's slots and block tables, the rows that sample, decode ids still on the device);
`device_batch` copies it to the device in two asynchronous uploads and builds the step's
`AttentionMetadata` (one per KV group; cross groups from `cross_inputs.py`). Nothing here
touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.cross_inputs import CrossBatch, cross_batch, cross_metas
from polymodal.llm_core.host_copy import upload
from polymodal.llm_core.request import Request
from polymodal.llm_core.scheduler import SchedulerOutput


@dataclass
class HostBatch:
    """One step's flat batch as host lists, before any device copy."""

    ids: list[int] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)  # positions: 1 row, or 3 for M-RoPE
    slots: list[list[int]] = field(default_factory=list)  # per KV group: each token's slot
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    tables: list[list[list[int]]] = field(default_factory=list)  # per group, per request
    max_blocks: int = 0
    pending_rows: list[int] = field(default_factory=list)  # ids still on the device ...
    pending_src: list[int] = field(default_factory=list)  # ... at these rows of prev.tokens
    # (request, flat row of its first token, first position, end position) of prompt chunks
    # whose prompt logprobs this step computes
    prompt_logprob_spans: list[tuple[Request, int, int, int]] = field(default_factory=list)
    # per flat token, extra visible key positions [lo, hi) (bidirectional media runs), or None
    key_ranges: tuple[list[int], list[int]] | None = None
    # the cross groups' tables, row counts, per-token ranges and writes (cross_inputs.py)
    cross: CrossBatch | None = None

    @property
    def is_decode(self) -> bool:
        return len(self.ids) == len(self.query_lens)


def host_batch(
    sched: SchedulerOutput,
    prev_rows: dict[str, int],
    block_size: int,
    num_kv_groups: int,
    num_cross_groups: int,
    uses_mrope: bool,
) -> HostBatch:
    """This step's flat batch as host lists (no device work yet). `prev_rows`: request id ->
    row of the previous step's sampled ids still on the device (`InFlight.row_of`)."""
    bs = block_size
    groups = range(num_kv_groups)
    hb = HostBatch(rows=[[], [], []] if uses_mrope else [[]], slots=[[] for _ in groups])
    rows, slots = hb.rows, hb.slots
    slots0, more = slots[0], slots[1:]  # group 0 (the only one of most models), the rest
    for req, n in zip(sched.requests, sched.num_new_tokens):
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        prompt_len = len(req.prompt_token_ids)
        if n == 1 and start >= prompt_len:  # decode fast path: one generated token
            if req.num_pending:  # sampled by `prev`, still on the device
                hb.pending_rows.append(len(hb.ids))
                hb.pending_src.append(prev_rows[req.request_id])
                hb.ids.append(0)
            else:
                hb.ids.append(req.output_token_ids[-1])
            pos = start + req.mrope_delta
            for row in rows:
                row.append(pos)
            tables = req.block_tables
            slots0.append(tables[0][start // bs] * bs + start % bs)
            if more:
                for group_slots, table in zip(more, tables[1:]):
                    group_slots.append(table[start // bs] * bs + start % bs)
            hb.query_lens.append(1)
            hb.seq_lens.append(end)
            hb.sample_rows.append(len(hb.ids) - 1)
            continue
        if req.prompt_logprobs is not None and start < prompt_len - 1:
            hb.prompt_logprob_spans.append((req, len(hb.ids), start, min(end, prompt_len - 1)))
        if end <= prompt_len:
            hb.ids.extend(req.prompt_token_ids[start:end])
        elif n == 1:  # decode: the last sampled token
            hb.ids.append(req.output_token_ids[start - prompt_len])
        elif start >= prompt_len:  # the last token and the drafts after it
            hb.ids.extend(
                (req.output_token_ids + req.spec_token_ids)[start - prompt_len : end - prompt_len]
            )
        else:  # the prompt's end and outputs (a preempted request recomputing)
            hb.ids.extend((req.all_token_ids + req.spec_token_ids)[start:end])
        _positions(req, start, end, hb.rows, uses_mrope)
        for group_slots, table in zip(slots, req.block_tables):
            group_slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        hb.query_lens.append(n)
        hb.seq_lens.append(end)
        if end == req.num_tokens:  # caught up: this step yields its next token
            # (and one row per draft, each sampled where its draft is checked)
            hb.sample_rows.extend(range(len(hb.ids) - 1 - len(req.spec_token_ids), len(hb.ids)))
    if not sched.requests[0].block_tables:  # no layer keeps a KV cache: nothing stored
        slots0.extend([-1] * len(hb.ids))
        hb.tables = [[[] for _ in sched.requests]]
    else:
        hb.tables = [[r.block_tables[g] for r in sched.requests] for g in groups]
    hb.max_blocks = max(map(len, hb.tables[0]))
    if num_cross_groups:
        groups = range(num_kv_groups, num_kv_groups + num_cross_groups)
        hb.cross = cross_batch(sched.requests, sched.num_new_tokens, groups, bs)
    return hb


def _positions(req: Request, start: int, end: int, rows: list[list[int]], uses_mrope: bool) -> None:
    """Append the positions of tokens [start, end) to `rows` (1 row, or 3 for M-RoPE)."""
    if not uses_mrope:
        rows[0].extend(range(start, end))
        return
    split = min(max(len(req.prompt_token_ids), start), end)
    for axis in range(3):
        if split > start:  # text-only prompts may come without positions: t = h = w
            prompt_rows = req.positions[axis] if req.positions else range(split)
            rows[axis].extend(prompt_rows[start:split])
        rows[axis].extend(range(split + req.mrope_delta, end + req.mrope_delta))


def device_batch(
    hb: HostBatch, uses_mrope: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Input ids, positions (`[num_tokens]`, or `[3, num_tokens]` for M-RoPE) and attention
    metadata, in two asynchronous copies (int32, int64) that never wait for the device (see
    host_copy)."""
    width, num_seqs = hb.max_blocks, len(hb.seq_lens)
    # per group, each request's table padded to the step's widest, groups one after another
    flat_tables = [b for group in hb.tables for t in group for b in t + [0] * (width - len(t))]
    query_start = [0]
    for q in hb.query_lens:
        query_start.append(query_start[-1] + q)
    starts, seq_lens, tables = upload([query_start, hb.seq_lens, flat_tables], torch.int32, device)
    tables = tables.view(len(hb.tables), num_seqs, width)  # [groups, num_seqs, max_blocks]
    flat_rows = list(chain.from_iterable(hb.rows))  # 1 row, or 3 for M-RoPE
    *slots, input_ids, pos = upload([*hb.slots, hb.ids, flat_rows], torch.int64, device)
    metas = [
        AttentionMetadata(
            query_start_loc=starts,
            seq_lens=seq_lens,
            block_tables=tables[g],
            slot_mapping=slots[g],
            max_query_len=max(hb.query_lens),
            max_seq_len=max(hb.seq_lens),
            is_decode=hb.is_decode,
            query_lens_cpu=hb.query_lens,
            seq_lens_cpu=hb.seq_lens,
        )
        for g in range(len(slots))
    ]
    meta = metas[0]
    meta.groups = metas if len(metas) > 1 else None
    if hb.key_ranges is not None:  # the same positions in every group
        lo, hi = upload(hb.key_ranges, torch.int32, device)
        for m in metas:
            m.media_key_ranges, m.media_key_ranges_cpu = (lo, hi), hb.key_ranges
    if hb.cross is not None:
        metas += cross_metas(hb.cross, starts, hb.query_lens, hb.is_decode, device)
        meta.groups = metas
    pos = pos.view(3, -1) if uses_mrope else pos
    return input_ids, pos, meta
