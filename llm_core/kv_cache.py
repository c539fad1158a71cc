"""Paged KV cache bookkeeping: block pool, block tables per KV group, ref counts, prefix caching.

Pure Python (no tensors): the runner owns the KV tensors, this module owns which block holds
what. Layers are grouped by their cache spec (`kv_cache_spec.py`); all groups draw from one
pool and a request holds one block table per group, every table indexed by token position.
Windowed groups (sliding window, chunked local) free the blocks their queries can no longer
see as the request advances; their table entries then point at the null block (block 0,
reserved, never written), so kernels index tables by position as before.

A full block is identified by a chained hash of (parent hash, its token ids, the content
hashes of media whose slots fall inside it), so two different images behind the same
placeholder tokens never share a block, and the same image twice does. The prefix cache is
per group (keys: (group, hash)).

Cross groups (`KVCacheSpec.is_cross`) hold a request's encoder rows: their tables are allocated
whole (`Request.num_encoder_rows` rows) with the request's first blocks, flagged
`Request.cross_pending` until the runner has written them, never grown, never prefix-cached. A
request without encoder rows holds empty cross tables. Since every token of such a model may
read the encoder states, a request's first block hash includes the content hashes of its
cross-attention items (and the chain carries them to every later block).

Free blocks wait in `free` in eviction order (front first). A freed block keeps its hash and
stays findable until it is reused: that is the prefix cache (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from polymodal.llm_core.kv_cache_spec import FULL, KVCacheSpec
from polymodal.llm_core.request import CROSS_ATTENTION, Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: tuple[int, int] | None = None  # (group, chained hash) while cached


class KVCacheManager:
    """Allocates `block_size`-token blocks to requests for each KV group (`specs`, default one
    full-attention group); counts refs; finds cached prefixes."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        specs: list[KVCacheSpec] | None = None,
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.specs = [KVCacheSpec(FULL)] if specs is None else list(specs)
        self.windowed = [g for g, s in enumerate(self.specs) if s.is_windowed]
        self.cross = [g for g, s in enumerate(self.specs) if s.is_cross]
        self.token_groups = [g for g, s in enumerate(self.specs) if not s.is_cross]
        # Windowed groups point freed positions at a reserved null block (never allocated).
        self.null_block = 0 if self.windowed else None
        self.blocks = [Block(i) for i in range(num_blocks)]
        first = 0 if self.null_block is None else 1
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(first, num_blocks))
        self.cached: dict[tuple[int, int], int] = {}  # (group, block hash) -> block id
        self.num_hit_tokens = 0  # prompt tokens served from the prefix cache (a statistic)
        # kv_offload.HostKVTier: evicted cached blocks kept in host memory, read back on a hit
        self.host = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's content (they stay free, reused first); call it with
        no request holding blocks."""
        self.cached.clear()
        if self.host is not None:
            self.host.reset()
        for block in self.blocks:
            block.block_hash = None

    @property
    def num_usable_blocks(self) -> int:
        """Blocks requests can hold (all but the null block)."""
        return self.num_blocks - (self.null_block is not None)

    def _blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _tables(self, req: Request) -> list[list[int]]:
        if len(req.block_tables) != len(self.specs):  # first allocation (or after a free)
            req.block_tables = [[] for _ in self.specs]
            req.num_skipped_blocks = [0] * len(self.specs)
        return req.block_tables

    def _update_hashes(self, req: Request) -> list[int]:
        """Extend `req.block_hashes` to cover every full block of its tokens.

        Block `i`'s hash is `hash((parent, its token ids, media))`, `media` the `(content hash,
        slot_start)` of the items whose slots overlap it, in item order (and every
        cross-attention item in block 0). Token ids are sliced, media placed per item, not per
        token: a 38k-token video prompt hashes its 2.4k blocks in ~2 ms, not ~30."""
        bs, hashes = self.block_size, req.block_hashes
        first, last = len(hashes), req.num_known_tokens // bs
        if first >= last:
            return hashes
        lo, hi, prompt_len = first * bs, last * bs, len(req.prompt_token_ids)
        ids = req.prompt_token_ids[lo:hi]
        if hi > prompt_len:
            ids += req.output_token_ids[max(0, lo - prompt_len) : hi - prompt_len]
        media: dict[int, list] = {}  # block index -> its media, for the blocks that have any
        for item in req.mm_items:
            end = item.slot_start + item.num_slots  # overlaps blocks start // bs .. ceil(end / bs)
            blocks = range(max(first, item.slot_start // bs), min(last, -(-end // bs)))
            if item.target == CROSS_ATTENTION and first == 0 and 0 not in blocks:
                blocks = [0, *blocks]  # every token reads them: the chain's first block has them
            for i in blocks:
                media.setdefault(i, []).append((item.content_hash, item.slot_start))
        # the chain starts at the request's adapter and salt: blocks computed with one LoRA (or
        # none) are never served to another, nor to a request of another `cache_salt`
        parent = hashes[-1] if hashes else (
            req.lora_request.cache_key if req.lora_request is not None else None,
            req.cache_salt,
        )  # fmt: skip
        for i in range(first, last):
            offset = (i - first) * bs
            tokens = tuple(ids[offset : offset + bs])
            parent = hash((parent, tokens, tuple(media.get(i, ()))))
            hashes.append(parent)
        return hashes

    # ---- prefix cache -------------------------------------------------------------------
    def get_computed_blocks(self, req: Request, limit: int | None = None) -> list[list[int]]:
        """Per group, the blocks of the longest prefix of `req` every group has cached (a
        windowed group needs only the blocks its first new query can see; the rest of its
        table is the null block). `[]` when there is no hit. At least one token is left to
        run; `limit` caps the hit at that many tokens (the scheduler's: never inside an
        image a model attends to bidirectionally)."""
        if not self.enable_prefix_caching or not self.specs:
            return []
        bs, hashes = self.block_size, self._update_hashes(req)
        length = len(hashes) if limit is None else min(len(hashes), limit // bs)
        while length and length * bs >= req.num_tokens:  # the last token must run for logits
            length -= 1
        found = {g: [self.cached.get((g, h)) for h in hashes[:length]] for g in self.token_groups}
        if self.host is not None:  # past the device cache: the host tier's blocks
            self._load_from_host(found[0], hashes, length)
        changed = True
        while changed and length:  # shrink until every group can serve the same length
            changed = False
            for g, ids in found.items():
                ok = _longest_servable(self.specs[g], ids, length, bs)
                if ok < length:
                    length, changed = ok, True
        if not length:
            return []
        hits = []
        for g, spec in enumerate(self.specs):
            if spec.is_cross:  # encoder rows: written anew for each request
                hits.append([])
                continue
            first = spec.first_needed(length * bs) // bs
            hits.append([self.null_block] * first + found[g][first:length])
        return hits

    def _load_from_host(self, ids: list, hashes: list[int], length: int) -> None:
        """Fill `ids` (the prefix's cached block per position, None past the device cache)
        from the host tier while it holds the next block: each copied into a free block that
        is not one of the prefix's, which then counts as cached (kv_offload.py)."""
        first = next((i for i, b in enumerate(ids) if b is None), length)
        keep = set(ids[:first])
        spare = len(self.free) - sum(b in self.free for b in keep)
        for i in range(first, length):
            if ids[i] is not None:  # on the device after a hole: nothing to copy
                spare -= ids[i] in self.free and ids[i] not in keep
                keep.add(ids[i])
                continue
            slot = self.host.lookup((0, hashes[i]))
            if slot is None or spare <= 0:
                return
            block_id = self._take_free(keep)
            block = self.blocks[block_id]
            block.ref_count, block.block_hash = 0, (0, hashes[i])
            self.cached[block.block_hash] = block_id
            self.free[block_id] = None  # free and cached, as a device hit's block
            self.host.load(slot, block_id)
            ids[i] = block_id
            keep.add(block_id)
            spare -= 1

    # ---- allocation ---------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens (after `computed` prefix blocks
        per group). Out-of-window blocks of windowed groups are freed first. Returns False,
        changing nothing else, when the pool cannot hold the rest."""
        tables, bs = req.block_tables, self.block_size
        # the common decode step: its blocks already have room (every group's table covers the
        # same positions)
        if (
            not computed
            and tables
            and req.num_computed_tokens + num_new_tokens <= len(tables[0]) * bs
        ):
            if self.windowed:
                self._free_skipped(req, req.num_computed_tokens)
            return True
        tables = self._tables(req)
        if not tables:
            return True  # no layer keeps a KV cache
        if self.windowed:
            self._free_skipped(req, req.num_computed_tokens)
        held = len(tables[0])
        # encoder rows of a request whose cross tables are not allocated yet (its first step)
        cross_new = 0
        if self.cross and req.num_encoder_rows and not tables[self.cross[0]]:
            cross_new = self._blocks_needed(req.num_encoder_rows)
        if not computed and not cross_new and req.num_computed_tokens + num_new_tokens <= held * bs:
            return True
        num_hit = len(computed[0]) if computed else 0
        start = req.num_computed_tokens + num_hit * bs  # first position this step computes
        new_entries = max(0, self._blocks_needed(start + num_new_tokens) - held - num_hit)
        fresh = {
            g: self._fresh_entries(self.specs[g], held + num_hit, new_entries, start)
            for g in self.token_groups
        }
        reused_free = len({b for ids in computed for b in ids if b in self.free})
        if sum(fresh.values()) + cross_new * len(self.cross) + reused_free > len(self.free):
            return False
        for table, ids in zip(tables, computed):
            for block_id in ids:
                if block_id != self.null_block:
                    self.free.pop(block_id, None)
                    self.blocks[block_id].ref_count += 1
                table.append(block_id)
        if computed:
            self.num_hit_tokens += num_hit * bs
            req.num_computed_tokens += num_hit * bs
            req.num_cached_blocks = held + num_hit
        for g, count in fresh.items():
            table = tables[g]
            table.extend([self.null_block] * (new_entries - count))  # out of the window already
            for _ in range(count):
                table.append(self._take_free())
        if cross_new:
            for g in self.cross:
                tables[g].extend(self._take_free() for _ in range(cross_new))
            req.cross_pending = True  # the runner writes the encoder rows' K/V this step
        return True

    def _fresh_entries(self, spec: KVCacheSpec, first_index: int, count: int, start: int) -> int:
        """How many of `count` new table entries from `first_index` need a real block: a
        windowed group skips those its first new query (at `start`) cannot see."""
        if not spec.is_windowed:
            return count
        skipped = max(0, spec.first_needed(start) // self.block_size - first_index)
        return count - min(count, skipped)

    def _take_free(self, keep: set | frozenset = frozenset()) -> int:
        """The next free block (least recently used first), none of `keep`."""
        block_id = next(iter(self.free))
        if keep:
            block_id = next(b for b in self.free if b not in keep)
        del self.free[block_id]
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached content
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
                if self.host is not None:  # keep it in host memory first
                    self.host.save(block_id, block.block_hash)
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self.free[block_id] = None
            if block.block_hash is None:  # nothing worth keeping: reuse it first
                self.free.move_to_end(block_id, last=False)

    def _free_skipped(self, req: Request, position: int) -> None:
        """Windowed groups: free the blocks no query at `position` or later can see."""
        for g in self.windowed:
            table = req.block_tables[g]
            target = min(self.specs[g].first_needed(position) // self.block_size, len(table))
            for i in range(req.num_skipped_blocks[g], target):
                if table[i] != self.null_block:
                    self._release(table[i])
                    table[i] = self.null_block
            req.num_skipped_blocks[g] = max(req.num_skipped_blocks[g], target)

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching or not req.block_tables:
            return
        num_full = min(req.num_computed_tokens, req.num_known_tokens) // self.block_size
        if num_full <= req.num_cached_blocks:
            return
        hashes = self._update_hashes(req)
        for g in self.token_groups:
            table = req.block_tables[g]
            for i in range(req.num_cached_blocks, num_full):
                block_id = table[i]
                if block_id == self.null_block or (g, hashes[i]) in self.cached:
                    continue
                self.cached[(g, hashes[i])] = block_id
                self.blocks[block_id].block_hash = (g, hashes[i])
        req.num_cached_blocks = num_full

    def free_request(self, req: Request) -> None:
        """Drop `req`'s references. Its tail blocks are evicted before its head blocks."""
        for table in req.block_tables:
            for block_id in reversed(table):
                if block_id != self.null_block:
                    self._release(block_id)
        req.block_tables = []
        req.num_cached_blocks = 0
        req.cross_pending = False

    def num_held_blocks(self, req: Request) -> list[int]:
        """Per group, the real blocks `req` holds now (memory accounting)."""
        return [sum(b != self.null_block for b in table) for table in req.block_tables]


def _longest_servable(spec: KVCacheSpec, ids: list[int | None], length: int, bs: int) -> int:
    """The longest prefix (in blocks, <= `length`) whose blocks a group of `spec` has cached:
    all of them for full attention, those its next query sees for a windowed group."""
    if not spec.is_windowed:
        return next((i for i, b in enumerate(ids[:length]) if b is None), length)
    for n in range(length, 0, -1):
        first = spec.first_needed(n * bs) // bs
        if all(b is not None for b in ids[first:n]):
            return n
    return 0
