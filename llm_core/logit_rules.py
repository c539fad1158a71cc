"""Per-request rules on the logits before sampling, vectorised over the batch on their device.

In vLLM's order: grammar bitmask (structured output) and `allowed_token_ids` (whitelists),
`bad_words`, `min_tokens` (stop tokens masked until enough were generated), `logit_bias`;
transformers' `suppress_tokens` (always) and `begin_suppress_tokens` (the first output token)
are masked with the bad words; Whisper's timestamp rules (`timestamp_rules`) come last, as
transformers runs its timestamp processor after the suppressions.
The host only gathers (row, token) index lists; each kind is one copy and one indexed write.
Rows without rules cost nothing; a batch without any rule never calls this (the sampler
checks each context's `has_rules`, read once per request from `SamplingParams`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from polymodal.llm_core.host_copy import copy_to, to_device, upload
from polymodal.llm_core.timestamp_rules import apply_timestamp_rules

_WORD_BITS = 32  # a grammar bitmask packs 32 tokens per int32


class TokenGrammar(Protocol):
    """What the sampler needs from a request's grammar state (see structured_output.py)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into int32 `bitmask[row]` (bit set = allowed)."""


def apply_logit_rules(logits: torch.Tensor, contexts: list[Any]) -> torch.Tensor:
    """Apply every row's rules to `logits` [n, vocab] float32, in place; returns it.

    `contexts` are `SamplingContext`s (params, output ids, stop ids, bad words, grammar).
    """
    n, vocab = logits.shape
    device = logits.device
    keep_rows: list[int] = []  # whitelisted rows ...
    keep_row_idx: list[int] = []  # ... and their allowed (local row, token) pairs
    keep_tok: list[int] = []
    grammar_rows: list[int] = []
    ban_rows: list[int] = []
    ban_tok: list[int] = []
    bias_rows: list[int] = []
    bias_tok: list[int] = []
    bias_val: list[float] = []
    timestamp_rows: list[int] = []
    for i, ctx in enumerate(contexts):
        p = ctx.params
        if not ctx.has_rules:
            continue
        if ctx.grammar is not None:
            grammar_rows.append(i)
        if p.allowed_token_ids is not None:
            local = len(keep_rows)
            keep_rows.append(i)
            keep_row_idx.extend([local] * len(p.allowed_token_ids))
            keep_tok.extend(p.allowed_token_ids)
        for word in ctx.bad_words_ids:
            prefix = word[:-1]
            if not prefix or ctx.output_token_ids[-len(prefix) :] == prefix:
                ban_rows.append(i)
                ban_tok.append(word[-1])
        if p.suppress_tokens:
            ban_rows.extend([i] * len(p.suppress_tokens))
            ban_tok.extend(p.suppress_tokens)
        if p.begin_suppress_tokens and not ctx.output_token_ids and not ctx.num_pending:
            ban_rows.extend([i] * len(p.begin_suppress_tokens))
            ban_tok.extend(p.begin_suppress_tokens)
        if p.min_tokens and len(ctx.output_token_ids) + ctx.num_pending < p.min_tokens:
            ban_rows.extend([i] * len(ctx.stop_token_ids))
            ban_tok.extend(ctx.stop_token_ids)
        if p.logit_bias:
            bias_rows.extend([i] * len(p.logit_bias))
            bias_tok.extend(p.logit_bias)
            bias_val.extend(p.logit_bias.values())
        if p.timestamp_rules is not None:
            timestamp_rows.append(i)
    neg_inf = float("-inf")
    if grammar_rows:
        _apply_grammars(logits, [contexts[i].grammar for i in grammar_rows], grammar_rows)
    if keep_rows:
        rows, local, tok = upload([keep_rows, keep_row_idx, keep_tok], torch.int64, device)
        keep = torch.zeros(len(keep_rows), vocab, dtype=torch.bool, device=device)
        keep[local, tok] = True
        logits[rows] = logits[rows].masked_fill(~keep, neg_inf)
    if ban_rows:
        rows, tok = upload([ban_rows, ban_tok], torch.int64, device)
        logits[rows, tok] = neg_inf
    if bias_rows:
        rows, tok = upload([bias_rows, bias_tok], torch.int64, device)
        values = to_device(bias_val, torch.float32, device)
        logits.index_put_((rows, tok), values, accumulate=True)
    if timestamp_rows:
        apply_timestamp_rules(logits, contexts, timestamp_rows)
    return logits


def _apply_grammars(logits: torch.Tensor, grammars: list, rows: list[int]) -> None:
    """Fill one packed bitmask per grammar row on the host, copy it over, mask on the device."""
    vocab = logits.shape[1]
    words = -(-vocab // _WORD_BITS)
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)  # all allowed
    for j, grammar in enumerate(grammars):
        grammar.fill_bitmask(bitmask, j)
    device = logits.device
    bitmask = copy_to(bitmask, device)
    allowed = unpack_bitmask(bitmask, vocab)  # [r, vocab] bool
    index = to_device(rows, torch.int64, device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 `[r, words]` (bit b of word w = token 32*w + b) -> bool `[r, vocab]`."""
    shifts = torch.arange(_WORD_BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [r, words, 32]; arithmetic shift is fine
    return bits.flatten(1)[:, :vocab].bool()
