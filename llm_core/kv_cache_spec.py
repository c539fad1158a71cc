"""What each layer keeps in the KV cache (`KVCacheSpec`), and how layers share memory
(`KVCacheLayout`): layers group by spec; every group holds the same number of layers (`slots`),
and slot `s` of every group lives in the same tensor, so a block id is one page of `slots`
layers of whichever group owns it. All groups draw blocks from one pool; each request holds one
block table per group. A model whose layers all share a spec has one group of all its layers:
today's layout (one tensor per layer, one block table).

Pure Python: the runner allocates the tensors the layout describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from polymodal.llm_core.attention.spec import AttentionSpec, Mask

FULL, SLIDING, CHUNKED, NONE = "full", "sliding", "chunked", "none"
# Room for more kinds: "mla" (one latent vector per token), "cross" (encoder states computed
# once per request): each is a spec kind with its own `first_needed` rule and page shape.


@dataclass(frozen=True)
class KVCacheSpec:
    """One layer's KV cache: `kind` (full, sliding, chunked, none), the window or chunk size,
    and the page shape (kv heads, head dim)."""

    kind: str
    window: int | None = None
    num_kv_heads: int = 0
    head_dim: int = 0

    @property
    def is_windowed(self) -> bool:
        return self.kind in (SLIDING, CHUNKED)

    def first_needed(self, position: int) -> int:
        """The earliest key position a query at `position` (or later) can read: blocks wholly
        before it can be freed."""
        if self.kind == SLIDING:
            return max(0, position - self.window + 1)
        if self.kind == CHUNKED:
            return position // self.window * self.window
        return 0

    def max_blocks(self, num_tokens: int, block_size: int, step_tokens: int) -> int:
        """Blocks one request of `num_tokens` holds at most, running up to `step_tokens` new
        tokens a step (a window needs its keys plus the step's)."""
        whole = -(-num_tokens // block_size)
        if not self.is_windowed:
            return whole
        # a step's queries see `window + step_tokens - 1` keys, over at most one more block
        return min(whole, -(-(self.window + step_tokens - 1) // block_size) + 1)


def kv_spec_of(attn: AttentionSpec) -> KVCacheSpec:
    """The cache a layer with attention `attn` needs."""
    kind = {Mask.CAUSAL: FULL, Mask.SLIDING: SLIDING, Mask.CHUNKED: CHUNKED}.get(attn.mask, NONE)
    window = attn.window if kind in (SLIDING, CHUNKED) else None
    return KVCacheSpec(kind, window, attn.num_kv_heads, attn.head_dim)


@dataclass
class KVCacheGroup:
    """Layers that share a spec and one block table per request (`layers[s]` uses slot s)."""

    spec: KVCacheSpec
    layers: list[int] = field(default_factory=list)


@dataclass
class KVCacheLayout:
    """Groups of layers and where each layer's cache lives: `layer_slot[i]` = (group, slot), or
    None for a layer without a KV cache."""

    groups: list[KVCacheGroup]
    slots: int  # tensors, each `[2, num_blocks, block_size, kv_heads, head_dim]`
    layer_slot: list[tuple[int, int] | None]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def has_windows(self) -> bool:
        return any(g.spec.is_windowed for g in self.groups)

    def page_shape(self) -> tuple[int, int]:
        spec = self.groups[0].spec
        return spec.num_kv_heads, spec.head_dim

    def layer_groups(self) -> list[int | None]:
        """Per layer: its group index (None without a KV cache)."""
        return [None if s is None else s[0] for s in self.layer_slot]

    def blocks_per_request(self, num_tokens: int, block_size: int, step_tokens: int) -> int:
        """Blocks one request of `num_tokens` may hold across all groups."""
        return sum(g.spec.max_blocks(num_tokens, block_size, step_tokens) for g in self.groups)


# Padding layers (slots a group leaves empty) cost memory; above this share of all slots, the
# layout uses the gcd of the per-spec layer counts as the group size instead.
MAX_PADDING = 0.15


def plan_layout(specs: list[KVCacheSpec]) -> KVCacheLayout:
    """Group layers by spec (order of first appearance) into groups of equal size."""
    by_spec: dict[KVCacheSpec, list[int]] = {}
    for i, spec in enumerate(specs):
        if spec.kind != NONE:
            by_spec.setdefault(spec, []).append(i)
    layer_slot: list[tuple[int, int] | None] = [None] * len(specs)
    if not by_spec:
        return KVCacheLayout([], 0, layer_slot)
    shapes = {(s.num_kv_heads, s.head_dim) for s in by_spec}
    if len(shapes) > 1:
        raise NotImplementedError(
            f"layers with different KV page shapes (kv heads, head dim) {sorted(shapes)} need "
            "per-group tensors, not implemented yet"
        )
    counts = [len(layers) for layers in by_spec.values()]
    size = min(counts)
    padding = sum(-(-c // size) * size - c for c in counts)
    if padding > MAX_PADDING * (sum(counts) + padding):
        size = math.gcd(*counts)
    groups = []
    for spec, layers in by_spec.items():
        for start in range(0, len(layers), size):
            groups.append(KVCacheGroup(spec, layers[start : start + size]))
    for g, group in enumerate(groups):
        for slot, layer in enumerate(group.layers):
            layer_slot[layer] = (g, slot)
    return KVCacheLayout(groups, size, layer_slot)
