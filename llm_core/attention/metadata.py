"""Per-step attention metadata, built by the runner and passed explicitly down the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where this step's flat token batch sits in the paged KV cache.

    The new tokens of sequence `s` are its last `query_len[s]` positions: token `t` of it is
    at absolute position `seq_lens[s] - query_len[s] + t`. `block_tables` and `slot_mapping`
    are of one KV group; `group(g)` gives group g's view.
    """

    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], cumulative query lens
    seq_lens: torch.Tensor  # int32 [num_seqs], context length after this step
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks], padded with 0
    slot_mapping: torch.Tensor  # int64 [num_tokens], -1 = do not store
    max_query_len: int
    max_seq_len: int
    is_decode: bool = False  # every query len is 1 (the CUDA-graph path)
    # Host copies, so the reference backend never syncs on device tensors.
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # Several KV groups (layers grouped by cache spec, `kv_cache_spec.py`): one metadata per
    # group, differing in `block_tables` and `slot_mapping`; this object is group 0's.
    groups: list[AttentionMetadata] | None = None
    # Media a model attends to bidirectionally (Gemma 3's images): per flat token, key
    # positions [lo, hi) it sees besides those its mask allows (lo == hi: none). A windowed
    # mask still bounds them from below (transformers: AND(window, OR(causal, block))).
    # int32 [num_tokens] each on the device, and the host lists. None: no such step.
    media_key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None
    media_key_ranges_cpu: tuple[list[int], list[int]] | None = None
    # A cross group's metadata (`kv_cache_spec.CROSS`): `seq_lens` / `block_tables` are each
    # sequence's encoder rows and their blocks; `cross_ranges` int32 [3, num_tokens] holds per
    # token the rows [lo, hi) it attends to (lo == hi: none, e.g. a text-only request, whose
    # tokens the model passes through its cross layers unchanged) and a gate (1, or 0 where the
    # model's reference masks the token's row out); `cross_states` [rows, hidden] are the
    # encoder states whose K/V this step writes at `slot_mapping` (requests in their first
    # step; None when none). `any_cross`: some sequence of the step has encoder rows (host
    # knowledge: True in captured graphs).
    cross_ranges: torch.Tensor | None = None
    cross_ranges_cpu: list[list[int]] | None = None
    cross_states: torch.Tensor | None = None
    any_cross: bool = True
    # The causal-SDPA route of this step per layer shape (`causal_sdpa.step_plan`): decided by
    # the first layer of a shape, reused by the others (not copied by `dataclasses.replace`).
    sdpa_plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # `decode_split`'s result, made once a step (False: not made yet)
    _split: object = field(default=False, init=False, repr=False, compare=False)

    def group(self, index: int) -> AttentionMetadata:
        """The metadata of KV group `index` (a layer's `kv_group`)."""
        return self if index == 0 else self.groups[index]

    def decode_split(self) -> tuple[AttentionMetadata, AttentionMetadata] | None:
        """(head, tail) of a mixed eager step whose first sequences decode one token each (the
        scheduler puts running requests first): the head's metadata (`is_decode`, its rows
        0..d-1 one a sequence) and the tail's (the other sequences, whose rows keep their place
        in the step: `query_start_loc[d:]`). None for a step without both parts, or without
        host lists (a captured graph: its layout changes between replays), or with media key
        ranges or cross rows. Made once a step, on first use, and kept."""
        if self._split is False:
            self._split = self._make_split()
        return self._split

    def _make_split(self) -> tuple[AttentionMetadata, AttentionMetadata] | None:
        lens = self.query_lens_cpu
        if self.is_decode or lens is None or self.seq_lens_cpu is None:
            return None
        if self.media_key_ranges is not None or self.cross_ranges is not None:
            return None
        d = 0
        while d < len(lens) and lens[d] == 1:
            d += 1
        if d == 0 or d == len(lens):
            return None
        head = AttentionMetadata(
            query_start_loc=self.query_start_loc[: d + 1],
            seq_lens=self.seq_lens[:d],
            block_tables=self.block_tables[:d],
            slot_mapping=self.slot_mapping[:d],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            is_decode=True,
            query_lens_cpu=lens[:d],
            seq_lens_cpu=self.seq_lens_cpu[:d],
        )
        # the tail's tensors copied (a few hundred bytes): views at offset d would change the
        # pointers' 16-byte alignment with d, and Triton compiles a kernel variant per alignment
        tail = AttentionMetadata(
            query_start_loc=self.query_start_loc[d:].clone(),
            seq_lens=self.seq_lens[d:].clone(),
            block_tables=self.block_tables[d:].clone(),
            slot_mapping=self.slot_mapping[d:],
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            query_lens_cpu=lens[d:],
            seq_lens_cpu=self.seq_lens_cpu[d:],
        )
        return head, tail

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
