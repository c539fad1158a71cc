"""What one attention layer computes, handed to the backends: `AttentionSpec`.

Models build one spec per layer (head dims, scale, mask, rotary, soft-cap); backends and
kernels read the mask and the soft-cap from it (Triton: as constexprs, so a causal layer runs
the same code as before there were masks), and the KV-cache planner derives each layer's
cache spec from it (`kv_cache_spec`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mask(enum.IntEnum):
    """Which keys a query at position p sees (values are the kernels' constexpr codes)."""

    CAUSAL = 0  # keys at positions <= p
    SLIDING = 1  # keys in (p - window, p]: `window` keys, p's own included
    CHUNKED = 2  # keys in [p // window * window, p]: causal inside fixed chunks (Llama 4 local)
    BIDIRECTIONAL = 3  # every key of the sequence (encoders; the prompt runs in one step)
    # the request's encoder rows (cross-attention): keys [lo, hi) of the query's range in
    # `AttentionMetadata.cross_ranges`, no position order
    CROSS = 4


@dataclass(frozen=True)
class RotarySpec:
    """The rotary embedding a layer applies to q and k (informational: the model owns the
    `RotaryEmbedding` module; equal specs share one). `kind`: "neox" or "mrope"."""

    base: float
    rotary_dim: int
    kind: str = "neox"


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention.

    `head_dim` is the q/k head size, `v_head_dim` the value's (None: the same). `window`: the
    sliding window (SLIDING) or the chunk size (CHUNKED). `rotary` None means no position
    rotation (NoPE). `softcap`: attention logits pass through `softcap * tanh(x / softcap)`.
    `encoder_rows` (CROSS only): the most encoder rows one request brings (sizes its cache).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    mask: Mask = Mask.CAUSAL
    window: int | None = None
    v_head_dim: int | None = None
    rotary: RotarySpec | None = None
    softcap: float | None = None
    encoder_rows: int | None = None

    def __post_init__(self) -> None:
        windowed = self.mask in (Mask.SLIDING, Mask.CHUNKED)
        if windowed != (self.window is not None) or (windowed and self.window < 1):
            raise ValueError(f"{self.mask.name} attention takes a window >= 1, got {self.window}")
        cross = self.mask == Mask.CROSS
        if cross != (self.encoder_rows is not None) or (cross and self.encoder_rows < 1):
            raise ValueError(f"{self.mask.name} attention takes encoder_rows >= 1")
        if cross and self.rotary is not None:
            raise ValueError("cross-attention keys have no positions: rotary must be None")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads do not group over {self.num_kv_heads}")

    @property
    def is_causal(self) -> bool:
        return self.mask not in (Mask.BIDIRECTIONAL, Mask.CROSS)

    @property
    def is_cross(self) -> bool:
        return self.mask == Mask.CROSS

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @classmethod
    def from_window(cls, num_heads, num_kv_heads, head_dim, scale, window=None, **kw):
        """Causal attention, or sliding when `window` is set (HF's `sliding_window` semantics:
        a query sees `window` keys, its own included)."""
        mask = Mask.CAUSAL if window is None else Mask.SLIDING
        return cls(num_heads, num_kv_heads, head_dim, scale, mask, window, **kw)


# The int32 step metadata the attention kernels read (query starts, context lengths, block
# tables, cross rows, slots), never specialized on 16-byte alignment: an eager step's are views
# at any int32 offset of one upload (`cross_inputs.cross_metas`), a captured graph's whole
# buffers, so each alignment compiled a kernel variant of its own inside a step (1-1.4 s on an
# H100: Mllama's first eager mixed steps); the loads are scalar or at offsets the compiler does
# not know, so the hint gains nothing.
PREFILL_METADATA = [
    "q_start_ptr",
    "seq_lens_ptr",
    "block_table_ptr",
    "range_lo_ptr",
    "range_hi_ptr",
]
DECODE_METADATA = ["seq_lens_ptr", "block_table_ptr", "range_lo_ptr", "range_hi_ptr", "slot_ptr"]
