"""A step's media inputs for the runner: the embeddings of the media slots it schedules, the
encoder outputs of cross-attention items, and the key ranges of bidirectional media runs.

Encoder outputs come from the encoder cache by content hash; the items it lacks run through
`model.encode` together (one call per step), and their outputs are held for the step even if
the cache evicts them right away.
"""

from __future__ import annotations

import torch

from polymodal.llm_core.encoder_cache import EncoderCache
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.host_copy import to_device
from polymodal.llm_core.scheduler import SchedulerOutput


def encoded(model, cache: EncoderCache, items: list) -> dict[str, torch.Tensor]:
    """Content hash -> encoder output for `items` (each hash once): cached, or encoded now."""
    found, missing = {}, {}
    for item in items:
        key = item.content_hash
        if "embeds" in item.data:  # rows as given: no encoder, no cache entry
            found[key] = item.data["embeds"]
        elif key not in found:
            found[key] = cache.get(key)
            if found[key] is None:
                missing[key] = item
    if missing:
        todo = list(missing.values())
        for item, emb in zip(todo, model.encode(todo)):
            if emb.shape[0] != item.num_embeds:
                raise InvalidInputError(
                    f"the encoder gave {emb.shape[0]} rows for a {item.modality} with "
                    f"{item.num_embeds} slots"
                )
            found[item.content_hash] = emb
            cache.put(item.content_hash, emb)
    return found


def embeddings_cached(model, cache: EncoderCache, max_rows: int, item) -> bool:
    """Whether `cache` holds `item`'s encoder output (each piece's, for an item the model's
    `split_media` cuts at `max_rows`: a long video), so no step will encode it unless the
    entry is evicted first. Runs on preprocessing threads (`model.stage`): it only reads."""
    if item.content_hash in cache:
        return True
    if "embeds" in item.data:  # given rows: never cached, staged like pixels
        return False
    pieces = model.split_media([item], max_rows)
    return len(pieces) > 1 and all(piece.content_hash in cache for piece in pieces)


def encoder_outputs(model, cache: EncoderCache, items: list) -> list[torch.Tensor]:
    """Encoder outputs of `items` in order (cross-attention rows)."""
    found = encoded(model, cache, items)
    return [found[item.content_hash] for item in items]


def slot_embeddings(sched: SchedulerOutput, model, cache: EncoderCache, device):
    """(flat slot indices on `device`, embeddings) for every media slot scheduled in this
    step, or (None, None) when it schedules none."""
    pieces, indices, items = [], [], {}
    offset = 0
    for req, n in zip(sched.requests, sched.num_new_tokens):
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        for item in req.mm_items:
            lo, hi = max(start, item.slot_start), min(end, item.slot_end)
            if lo >= hi or item.target != "slots":
                continue
            key = item.content_hash
            items.setdefault(key, item)
            base = offset + item.slot_start - start  # flat row of the span's offset 0
            if item.embed_mask is None:  # every span position takes a row
                pieces.append((key, lo - item.slot_start, hi - item.slot_start))
                indices.extend(range(offset + lo - start, offset + hi - start))
                continue
            offsets, first, last = item.embed_rows(lo - item.slot_start, hi - item.slot_start)
            if first < last:
                pieces.append((key, first, last))
                indices.extend(base + o for o in offsets)
        offset += n
    found = encoded(model, cache, list(items.values())) if items else {}
    if not pieces:
        return None, None
    # given prompt embeddings may still be on the host (a text model stages nothing)
    embeds = [found[key][a:b].to(device, non_blocking=True) for key, a, b in pieces]
    # one piece (a lone image) as is: the merge only reads it
    rows = embeds[0] if len(embeds) == 1 else torch.cat(embeds)
    return to_device(indices, torch.int64, device), rows


def media_key_ranges(sched: SchedulerOutput) -> tuple[list[int], list[int]] | None:
    """Per flat token of this step, the key positions `[lo, hi)` it sees beyond its mask: the
    embedded run (crop, tile) it belongs to, for a `bidirectional_media` model; (0, 0) for
    other tokens. None when no run falls in this step."""
    lows, highs, any_run = [], [], False
    for req, n in zip(sched.requests, sched.num_new_tokens):
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        lo_row, hi_row = [0] * n, [0] * n
        for item in req.mm_items:
            if item.slot_start >= end or item.slot_end <= start:
                continue
            for a, b in item.embed_runs():
                for pos in range(max(a, start), min(b, end)):
                    lo_row[pos - start], hi_row[pos - start] = a, b
                    any_run = True
        lows.extend(lo_row)
        highs.extend(hi_row)
    return (lows, highs) if any_run else None


def step_has_media(sched) -> bool:
    """Whether any media slot falls in this step's tokens (decodes of media requests don't)."""
    for req, n in zip(sched.requests, sched.num_new_tokens):
        start, end = req.num_computed_tokens, req.num_computed_tokens + n
        for item in req.mm_items:
            if item.slot_start < end and item.slot_end > start and item.target == "slots":
                return True
    return False
