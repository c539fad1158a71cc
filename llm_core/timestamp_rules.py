"""Whisper's timestamp rules on the logits: transformers' `WhisperTimeStampLogitsProcessor`
(OpenAI whisper's `ApplyTimestampRules`), applied after the other logit rules.

Every id from `timestamp_begin` on is a timestamp (`<|0.00|>`, `<|0.02|>`, ...). Over a request's
output tokens:
- `<|notimestamps|>` is never generated;
- timestamps come in pairs: after a pair (or a first timestamp), text; after one timestamp that
  followed text, a timestamp or end-of-text (nothing below `eos_token_id`);
- timestamps never decrease (after text, a new one is strictly later than the last);
- the first token is a timestamp, at most `max_initial_timestamp_index` steps past `<|0.00|>`;
- when the timestamps' total probability beats every single text token, a timestamp is forced.

The host computes each row's masked id ranges from its output tokens; the device builds the
masks and the probability test for all rows at once, with no read back.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from polymodal.llm_core.host_copy import upload


@dataclass(config=ConfigDict(extra="forbid"))
class TimestampRules:
    """The token ids Whisper's timestamp rules need (the model's generation_config.json:
    `no_timestamps_token_id`, `eos_token_id`, `max_initial_timestamp_index`)."""

    no_timestamps_token_id: int
    """`<|notimestamps|>`; the timestamps are the ids after it."""
    eos_token_id: int
    """`<|endoftext|>`: after a closing timestamp only ids from it on may follow."""
    max_initial_timestamp_index: int | None = None
    """The first timestamp is at most this many steps past `<|0.00|>` (None: any)."""

    @property
    def timestamp_begin(self) -> int:
        """`<|0.00|>`: every id from it on is a timestamp."""
        return self.no_timestamps_token_id + 1


def masked_ranges(rules: TimestampRules, output: list[int], vocab: int) -> list[tuple[int, int]]:
    """The `[lo, hi)` id ranges the rules mask for the next token after `output`."""
    begin = rules.timestamp_begin
    no_ts = rules.no_timestamps_token_id
    ranges = [(no_ts, no_ts + 1)]
    last_was_timestamp = len(output) >= 1 and output[-1] >= begin
    penultimate_was_timestamp = len(output) < 2 or output[-2] >= begin
    if last_was_timestamp:
        if penultimate_was_timestamp:  # a pair (or the first timestamp): text next
            ranges.append((begin, vocab))
        else:  # a closing timestamp: another timestamp or end-of-text
            ranges.append((0, rules.eos_token_id))
    timestamps = [t for t in output if t >= begin]
    if timestamps:
        # never earlier than the last; after text, strictly later (no second `<|0.00|>`)
        last = timestamps[-1]
        ranges.append((begin, last if last_was_timestamp and not penultimate_was_timestamp
                       else last + 1))  # fmt: skip
    if not output:  # the first token is an early timestamp
        ranges.append((0, begin))
        if rules.max_initial_timestamp_index is not None:
            ranges.append((begin + rules.max_initial_timestamp_index + 1, vocab))
    return [(lo, hi) for lo, hi in ranges if hi > lo]


def apply_timestamp_rules(logits: torch.Tensor, contexts: list[Any], rows: list[int]) -> None:
    """Apply the rules of `contexts[i].params.timestamp_rules` to `logits[i]` for each i of
    `rows`, in place. logits: [n, vocab] float32."""
    vocab = logits.shape[1]
    device = logits.device
    range_row, range_lo, range_hi, begins = [], [], [], []
    for local, i in enumerate(rows):
        rules = contexts[i].params.timestamp_rules
        begins.append(rules.timestamp_begin)
        for lo, hi in masked_ranges(rules, contexts[i].output_token_ids, vocab):
            range_row.append(local)
            range_lo.append(lo)
            range_hi.append(hi)
    index, row, lo, hi, begin = upload(
        [rows, range_row, range_lo, range_hi, begins], torch.int64, device
    )
    ids = torch.arange(vocab, device=device)
    in_range = (ids >= lo[:, None]) & (ids < hi[:, None])  # [ranges, vocab]
    hits = torch.zeros(len(rows), vocab, device=device).index_add_(0, row, in_range.float())
    x = logits[index].masked_fill(hits > 0, float("-inf"))  # [r, vocab]
    # a timestamp is forced when their total probability beats the likeliest text token
    is_timestamp = ids[None, :] >= begin[:, None]  # [r, vocab]
    logprobs = torch.log_softmax(x, dim=-1)
    timestamp_mass = logprobs.masked_fill(~is_timestamp, float("-inf")).logsumexp(dim=-1)
    best_text = logprobs.masked_fill(is_timestamp, float("-inf")).amax(dim=-1)
    force = (timestamp_mass > best_text)[:, None] & ~is_timestamp
    logits[index] = x.masked_fill(force, float("-inf"))
