"""A step's cross-attention inputs (models with cross KV groups: Mllama, Whisper), built by the
runner next to the token groups' batch.

Per cross group, each request's encoder-row table; per request its row count (0: no encoder
rows, or none allocated yet); per token the rows `[lo, hi)` it attends to and a gate, from the
request's `cross_ranges` pieces; and the requests whose cross tables were just allocated
(`Request.cross_pending`), with their rows' slots: their encoder states are written this step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.host_copy import upload
from polymodal.llm_core.request import CROSS_ATTENTION, Request


@dataclass
class CrossBatch:
    """The cross groups' part of a step's host batch."""

    tables: list[list[list[int]]] = field(default_factory=list)  # per group, per request
    lens: list[int] = field(default_factory=list)  # per request: encoder rows
    ranges: list[list[int]] = field(default_factory=lambda: [[], [], []])  # lo, hi, gate
    writes: list[Request] = field(default_factory=list)  # requests writing their rows
    slots: list[list[int]] = field(default_factory=list)  # per group: those rows' slots


def cross_range(pieces, position: int) -> tuple[int, int, int]:
    """(lo, hi, gate) of the token at `position` from a request's `cross_ranges` pieces (the
    last piece whose first position is at or before it); none: (0, 0, 0)."""
    for first, lo, hi, gate in reversed(pieces):
        if position >= first:
            return lo, hi, gate
    return 0, 0, 0


def cross_batch(requests, num_new_tokens, groups: range, block_size: int) -> CrossBatch:
    """The cross part of a step scheduling `num_new_tokens` of each of `requests`; `groups`:
    the cross groups' indices."""
    cb = CrossBatch(tables=[[r.block_tables[g] for r in requests] for g in groups])
    cb.slots = [[] for _ in groups]
    lows, highs, gates = cb.ranges
    bs = block_size
    for req, n in zip(requests, num_new_tokens):
        rows = req.num_encoder_rows if req.block_tables[groups.start] else 0
        cb.lens.append(rows)
        pieces = req.cross_ranges if rows else ()
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + n):
            lo, hi, gate = cross_range(pieces, pos)
            lows.append(lo)
            highs.append(hi)
            gates.append(gate)
        if req.cross_pending:
            cb.writes.append(req)
            for group_slots, g in zip(cb.slots, groups):
                table = req.block_tables[g]
                group_slots.extend(table[r // bs] * bs + r % bs for r in range(rows))
    return cb


def cross_metas(
    cb: CrossBatch, starts: torch.Tensor, query_lens: list[int], is_decode: bool, device
) -> list[AttentionMetadata]:
    """One metadata per cross group, in two copies (its states, if any, are set by the runner);
    `starts`: the step's query start offsets (on the device)."""
    width = max(1, max(len(t) for group in cb.tables for t in group))
    flat = [b for group in cb.tables for t in group for b in t + [0] * (width - len(t))]
    ranges = list(chain.from_iterable(cb.ranges))
    lens, tables, ranges = upload([cb.lens, flat, ranges], torch.int32, device)
    tables = tables.view(len(cb.tables), len(cb.lens), width)  # [groups, seqs, width]
    slots = upload(cb.slots, torch.int64, device)
    return [
        AttentionMetadata(
            query_start_loc=starts,
            seq_lens=lens,
            block_tables=tables[c],
            slot_mapping=slots[c],
            max_query_len=max(query_lens),
            max_seq_len=max(cb.lens),
            is_decode=is_decode,
            query_lens_cpu=query_lens,
            seq_lens_cpu=cb.lens,
            cross_ranges=ranges.view(3, -1),
            cross_ranges_cpu=cb.ranges,
            any_cross=any(cb.lens),
        )
        for c in range(len(cb.tables))
    ]


def cross_states(
    model, reqs: list[Request], encoder_outputs: Callable[[list], list[torch.Tensor]]
) -> torch.Tensor:
    """`[rows, hidden]`: the encoder states of `reqs` (requests in their first step), each
    request's rows as its model lays them out (`cross_states`), in request order;
    `encoder_outputs(items)` gives the items' encoder outputs (cached or encoded)."""
    per_req = [[i for i in r.mm_items if i.target == CROSS_ATTENTION] for r in reqs]
    outputs = iter(encoder_outputs([i for items in per_req for i in items]))
    states = []
    for req, items in zip(reqs, per_req):
        rows = model.cross_states(items, [next(outputs) for _ in items])
        if rows.shape[0] != req.num_encoder_rows:
            raise InvalidInputError(
                f"the model laid out {rows.shape[0]} encoder rows for a request with "
                f"{req.num_encoder_rows}"
            )
        states.append(rows)
    return torch.cat(states)
