"""One generation request as the scheduler and runner see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# `MultimodalItem.target` of items whose encoder rows cross-attention layers read
# (processors.types.CROSS_ATTENTION; the core does not import the processors)
CROSS_ATTENTION = "cross_attention"
# `MultimodalItem.modality` of a prompt given as embeddings (processors.types.PROMPT_EMBEDS)
PROMPT_EMBEDS = "prompt_embeds"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Token state, KV blocks and sampling state of one sequence.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the tokens still to run
    are `all_token_ids[num_computed_tokens:]` (the whole prompt at first, then one per step).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    positions: list[list[int]] | None = None  # [3][prompt_len] M-RoPE positions, else None
    mrope_delta: int = 0
    mm_items: list = field(default_factory=list)  # processors.types.MultimodalItem
    # token ranges [start, end) no step may cut: the spans of media a model attends to
    # bidirectionally (Gemma 3's images), set by the engine from the model's interface
    atomic_spans: list[tuple[int, int]] = field(default_factory=list)
    # Cross-attention (a model with cross KV groups): per-token encoder rows [lo, hi) and gate,
    # as pieces `(first position, lo, hi, gate)`, the last one extending over the generated
    # tokens (`SupportsMultiModal.cross_ranges`; set by the engine); and whether the cross
    # tables were just allocated and await the encoder rows' K/V (set by the KV manager,
    # cleared once the step that writes them is launched).
    cross_ranges: list[tuple[int, int, int, int]] = field(default_factory=list)
    cross_pending: bool = False
    # the prompt was given as embeddings (prompt_embeds.py): its token ids are placeholders
    prompt_embeds: bool = False
    max_model_len: int = 1 << 30
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_tables: list[list[int]] = field(default_factory=list)  # one per KV group, by position
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks whose hashes are registered in the pool
    num_skipped_blocks: list[int] = field(default_factory=list)  # per group: freed window blocks
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served then
    first_token_time: float | None = None
    num_preemptions: int = 0
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    first_scheduled_time: float | None = None  # time.time() of its first step
    # [prompt_len] logprob tables (index 0 None) when params.prompt_logprobs is set
    prompt_logprobs: list | None = None
    bad_words_ids: list[list[int]] = field(default_factory=list)  # params.bad_words tokenized
    grammar: Any = None  # structured output state (structured_output.GrammarState)
    lora_request: Any = None  # lora.LoRARequest: the adapter this sequence runs with
    cache_salt: str | None = None  # prefix-cache salt: only requests with the same one share
    priority: int = 0  # scheduling_policy="priority": lower first (scheduler.py)
    lora_slot: int = -1  # its adapter's slot while admitted (LoRAManager.acquire)

    num_pending: int = 0  # sampled on the device, not yet read back (async scheduling)
    # draft tokens this step verifies after the last one (speculative.py): counted in
    # `num_tokens` until the step's tokens are booked
    spec_token_ids: list[int] = field(default_factory=list)
    draft_context: Any = field(default=None, repr=False)  # (token array, length) drafts search
    draft_state: Any = field(default=None, repr=False)  # draft_model.DraftState: its draft cache
    # Pooling requests (`params` is a PoolingParams): no tokens are sampled; the hidden states
    # of the prompt's chunks gather until it is whole. A non-causal model's prompt is never
    # split across steps (`chunkable`).
    pooling: bool = False
    chunkable: bool = True
    token_type_ids: list[int] | None = None
    hidden_chunks: list = field(default_factory=list)
    # the prompt as an int64 CPU tensor (`Engine.add_requests` converts a batch at once; the
    # pooling step concatenates them instead of converting lists), or None
    prompt_tensor: torch.Tensor | None = field(default=None, compare=False)

    @property
    def block_ids(self) -> list[int]:
        """The block table of the first KV group (the only one of a single-group model)."""
        return self.block_tables[0] if self.block_tables else []

    def __post_init__(self) -> None:
        # Checked for every row of every step: read once from the params (a PoolingParams
        # samples nothing).
        sampling = not self.pooling
        self.plain_argmax: bool = sampling and self.params.is_plain_argmax
        self.needs_host_tokens: bool = sampling and self.params.needs_host_tokens
        self.has_logit_rules: bool = sampling and self.params.has_logit_rules
        stop_ids = self.params.stop_token_ids if sampling else ()
        self.stop_ids = tuple(self.eos_token_ids) + tuple(stop_ids)  # masked before min_tokens
        # encoder rows its cross-attention layers read (0: none, those layers skip it)
        self.num_encoder_rows: int = sum(
            item.num_embeds for item in self.mm_items if item.target == CROSS_ATTENTION
        )

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, counting one still in flight and the drafts."""
        return (
            len(self.prompt_token_ids)
            + len(self.output_token_ids)
            + self.num_pending
            + len(self.spec_token_ids)
        )

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has (prefix hashes and input ids need the values)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def reaches_length(self) -> bool:
        """Its tokens in flight already reach max_tokens or max_model_len: it finishes when
        they are read back, so scheduling it again would compute a token to throw away."""
        if not self.num_pending:
            return False
        max_tokens = self.params.max_tokens
        out = len(self.output_token_ids) + self.num_pending
        return (
            max_tokens is not None and out >= max_tokens
        ) or self.num_tokens >= self.max_model_len

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_id(self, index: int) -> int:
        prompt_len = len(self.prompt_token_ids)
        if index < prompt_len:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - prompt_len]
