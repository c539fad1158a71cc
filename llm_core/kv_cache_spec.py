"""What each layer keeps in the KV cache (`KVCacheSpec`), and how layers share memory
(`KVCacheLayout`): layers group by how their blocks are held (kind and window); every group
holds the same number of layers (`slots`), and slot `s` of every group lives in the same tensor,
so a block id is one page of `slots` layers of whichever group owns it. All groups draw blocks
from one pool; each request holds one block table per group. A model whose layers all share a
spec has one group of all its layers: today's layout (one tensor per layer, one block table).

A "cross" group (cross-attention: Mllama's image layers, Whisper's decoder) holds the K/V of a
request's encoder rows instead of its tokens: its table is indexed by encoder row, allocated
whole when the request is first scheduled (`Request.num_encoder_rows` rows, written once in that
step) and never grown, and it takes no part in prefix caching. Cross groups come after the token
groups, so group 0 is always indexed by token position.

Each slot tensor has its own page shape, `[planes, num_blocks, block_size, kv_heads, head_dim]`:
2 planes (keys, values) for attention caches, 1 for an MLA latent cache (`[..., 1,
kv_lora_rank + rope_dim]`, one vector per token). Layers of one group may differ in page shape
(DeciLM's per-layer kv-head counts); the layers sharing a slot across groups may not.

Pure Python: the runner allocates the tensors the layout describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from polymodal.llm_core.attention.spec import AttentionSpec, Mask

FULL, SLIDING, CHUNKED, NONE, MLA, CROSS = "full", "sliding", "chunked", "none", "mla", "cross"


@dataclass(frozen=True)
class KVCacheSpec:
    """One layer's KV cache: `kind` (full, sliding, chunked, none, mla, cross), the window or
    chunk size, and the page shape (kv heads, head dim; MLA: 1 head of the latent + rope dims).
    `max_rows` (cross): the most encoder rows one request brings."""

    kind: str
    window: int | None = None
    num_kv_heads: int = 0
    head_dim: int = 0
    max_rows: int = 0

    @property
    def planes(self) -> int:
        """Tensors per token and head: keys and values, or MLA's one latent vector."""
        return 1 if self.kind == MLA else 2

    @property
    def page_shape(self) -> tuple[int, int, int]:
        """(planes, kv heads, head dim) of one token's cache."""
        return self.planes, self.num_kv_heads, self.head_dim

    @property
    def block_table_kind(self) -> tuple[str, int | None]:
        """What decides which blocks a request holds: layers equal in it share a block table."""
        return self.kind, self.window

    @property
    def is_windowed(self) -> bool:
        return self.kind in (SLIDING, CHUNKED)

    @property
    def is_cross(self) -> bool:
        """Its table holds a request's encoder rows, not its tokens."""
        return self.kind == CROSS

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
        tokens a step (a window needs its keys plus the step's; cross: its encoder rows)."""
        if self.is_cross:
            return -(-self.max_rows // block_size)
        whole = -(-num_tokens // block_size)
        if not self.is_windowed:
            return whole
        # a step's queries see `window + step_tokens - 1` keys, over at most one more block
        return min(whole, -(-(self.window + step_tokens - 1) // block_size) + 1)


def kv_spec_of(attn: AttentionSpec) -> KVCacheSpec:
    """The cache a layer with attention `attn` needs."""
    kinds = {Mask.CAUSAL: FULL, Mask.SLIDING: SLIDING, Mask.CHUNKED: CHUNKED, Mask.CROSS: CROSS}
    kind = kinds.get(attn.mask, NONE)
    window = attn.window if kind in (SLIDING, CHUNKED) else None
    return KVCacheSpec(kind, window, attn.num_kv_heads, attn.head_dim, attn.encoder_rows or 0)


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
    slots: int  # tensors, slot s `[planes, num_blocks, block_size, kv_heads, head_dim]`
    layer_slot: list[tuple[int, int] | None]
    slot_shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (planes, heads, dim)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def has_windows(self) -> bool:
        return any(g.spec.is_windowed for g in self.groups)

    @property
    def num_cross_groups(self) -> int:
        """Cross groups (the last ones)."""
        return sum(g.spec.is_cross for g in self.groups)

    def page_shape(self) -> tuple[int, int]:
        """(kv heads, head dim) of slot 0's tensor."""
        return self.slot_shapes[0][1:]

    def cache_shape(self, slot: int, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Slot `slot`'s tensor: `[planes, num_blocks, block_size, kv_heads, head_dim]`."""
        planes, heads, dim = self.slot_shapes[slot]
        return planes, num_blocks, block_size, heads, dim

    def block_elements(self, block_size: int) -> int:
        """Elements one block id holds across every slot tensor."""
        return block_size * sum(math.prod(shape) for shape in self.slot_shapes)

    def token_elements(self, group: int) -> int:
        """Elements one token takes in group `group`'s layers."""
        slots = range(len(self.groups[group].layers))
        return sum(math.prod(self.slot_shapes[s]) for s in slots)

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
    """Group layers by block-table kind (order of first appearance, cross kinds last) into
    groups of equal size; slot s of every group shares one tensor (its layers need one page
    shape)."""
    by_kind: dict[tuple, list[int]] = {}
    for i, spec in sorted(enumerate(specs), key=lambda pair: pair[1].is_cross):  # stable
        if spec.kind != NONE:
            by_kind.setdefault(spec.block_table_kind, []).append(i)
    layer_slot: list[tuple[int, int] | None] = [None] * len(specs)
    if not by_kind:
        return KVCacheLayout([], 0, layer_slot)
    counts = [len(layers) for layers in by_kind.values()]
    size = min(counts)
    padding = sum(-(-c // size) * size - c for c in counts)
    if padding > MAX_PADDING * (sum(counts) + padding):
        size = math.gcd(*counts)
    groups = []
    for layers in by_kind.values():
        for start in range(0, len(layers), size):
            chunk = layers[start : start + size]
            groups.append(KVCacheGroup(specs[chunk[0]], chunk))
    slot_shapes: list[set] = [set() for _ in range(size)]
    for g, group in enumerate(groups):
        for slot, layer in enumerate(group.layers):
            layer_slot[layer] = (g, slot)
            slot_shapes[slot].add(specs[layer].page_shape)
    mixed = [sorted(shapes) for shapes in slot_shapes if len(shapes) > 1]
    if mixed:
        raise NotImplementedError(
            f"layers of different kinds with different KV page shapes (planes, kv heads, head "
            f"dim) {mixed[0]} would share a cache tensor: not implemented yet"
        )
    return KVCacheLayout(groups, size, layer_slot, [shapes.pop() for shapes in slot_shapes])
