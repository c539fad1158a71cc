"""Paged KV cache bookkeeping: block pool, block tables, ref counts, prefix caching.

Pure Python (no tensors): the runner owns the KV tensors, this module owns which block holds
what. A full block is identified by a chained hash of (parent hash, its token ids, the
content hashes of media whose slots fall inside it), so two different images behind the
same placeholder tokens never share a block, and the same image twice does.

Free blocks wait in `free` in eviction order (front first). A freed block keeps its hash and
stays findable until it is reused: that is the prefix cache (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from polymodal.llm_core.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class KVCacheManager:
    """Allocates `block_size`-token blocks to requests; counts refs; finds cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_hit_tokens = 0  # prompt tokens served from the prefix cache (a statistic)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def _blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, req: Request) -> list[int]:
        """Extend `req.block_hashes` to cover every full block of its tokens."""
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_known_tokens // bs):
            parent = req.block_hashes[i - 1] if i else None
            lo, hi = i * bs, (i + 1) * bs
            tokens = tuple(req.token_id(j) for j in range(lo, hi))
            media = tuple(
                (item.content_hash, item.slot_start)
                for item in req.mm_items
                if item.slot_start < hi and item.slot_start + item.num_slots > lo
            )
            req.block_hashes.append(hash((parent, tokens, media)))
        return req.block_hashes

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Block ids of the longest cached prefix of `req` (at least one token is left to run)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for block_hash in self._update_hashes(req):
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        # The last token must run to produce logits: never take a prefix covering all tokens.
        while hits and len(hits) * self.block_size >= req.num_tokens:
            hits.pop()
        return hits

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[int] = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens (after `computed` prefix blocks).

        Returns False, changing nothing, when the pool cannot hold them.
        """
        if not computed and (
            req.num_computed_tokens + num_new_tokens <= len(req.block_ids) * self.block_size
        ):
            return True  # the common decode step: its blocks already have room
        reused_free = sum(1 for b in computed if b in self.free)
        held = len(req.block_ids) + len(computed)
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        needed = max(0, self._blocks_needed(total) - held)
        if needed + reused_free > len(self.free):
            return False
        for block_id in computed:
            self.free.pop(block_id, None)
            self.blocks[block_id].ref_count += 1
        req.block_ids.extend(computed)
        self.num_hit_tokens += len(computed) * self.block_size
        req.num_computed_tokens += len(computed) * self.block_size
        req.num_cached_blocks = len(req.block_ids) if computed else req.num_cached_blocks
        for _ in range(needed):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict its cached content
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            req.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens, req.num_known_tokens) // self.block_size
        if num_full <= req.num_cached_blocks:
            return
        hashes = self._update_hashes(req)
        for i in range(req.num_cached_blocks, num_full):
            block = self.blocks[req.block_ids[i]]
            if hashes[i] not in self.cached:
                self.cached[hashes[i]] = block.block_id
                block.block_hash = hashes[i]
        req.num_cached_blocks = num_full

    def free_request(self, req: Request) -> None:
        """Drop `req`'s references. Its tail blocks are evicted before its head blocks."""
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.block_hash is None:  # nothing worth keeping: reuse it first
                    self.free.move_to_end(block_id, last=False)
        req.block_ids = []
        req.num_cached_blocks = 0
