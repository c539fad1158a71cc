"""Prefix-cache block hashes are computed per block and per item (a 38k-token video prompt:
2.4k blocks), not per token: the chain must stay exactly the per-token definition's, whatever
the media layout (slots, empty spans, cross-attention items), the root (the LoRA adapter and the
`cache_salt`), and however the tokens arrive (prompt, then generated tokens, hashed a few blocks
at a time)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.request import CROSS_ATTENTION, Request
from polymodal.llm_core.sampling_params import SamplingParams


@dataclass
class _Item:
    content_hash: str
    slot_start: int
    num_slots: int
    target: str = "slots"

    @property
    def num_embeds(self) -> int:  # a cross-attention item's encoder rows (the request counts)
        return self.num_slots


@dataclass
class _Lora:
    cache_key: str


def _reference_hashes(req: Request, bs: int) -> list[int]:
    """The definition, one token and one item at a time."""
    hashes = []
    root = (req.lora_request.cache_key if req.lora_request is not None else None, req.cache_salt)
    for i in range(req.num_known_tokens // bs):
        lo, hi = i * bs, (i + 1) * bs
        tokens = tuple(req.token_id(j) for j in range(lo, hi))
        media = tuple(
            (item.content_hash, item.slot_start)
            for item in req.mm_items
            if (item.slot_start < hi and item.slot_start + item.num_slots > lo)
            or (i == 0 and item.target == CROSS_ATTENTION)
        )
        hashes.append(hash((hashes[-1] if hashes else root, tokens, media)))
    return hashes


def _random_request(rng: random.Random, bs: int) -> Request:
    length = rng.randrange(1, 12 * bs)
    items = []
    for n in range(rng.randrange(0, 5)):
        start = rng.randrange(0, length)
        slots = rng.choice([0, 1, rng.randrange(1, 4 * bs)])
        target = CROSS_ATTENTION if rng.random() < 0.25 else "slots"
        items.append(_Item(f"h{n}", start, min(slots, length - start), target))
    req = Request(
        request_id="r",
        prompt_token_ids=[rng.randrange(100) for _ in range(length)],
        params=SamplingParams(),
        mm_items=items,
    )
    req.lora_request = _Lora("adapter") if rng.random() < 0.3 else None
    req.cache_salt = rng.choice([None, None, "tenant-a"])
    return req


@pytest.mark.parametrize("seed", range(40))
def test_block_hashes_match_the_per_token_definition(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    kv = KVCacheManager(num_blocks=8, block_size=bs)
    req = _random_request(rng, bs)
    assert kv._update_hashes(req) == _reference_hashes(req, bs)
    for _ in range(rng.randrange(0, 3 * bs)):  # generated tokens, hashed as blocks fill
        req.output_token_ids.append(rng.randrange(100))
        if rng.random() < 0.3:
            kv._update_hashes(req)
    assert kv._update_hashes(req) == _reference_hashes(req, bs)


def test_media_at_a_block_edge_belongs_to_the_blocks_it_overlaps():
    """An item's slots [16, 32) touch block 1 alone; an empty span inside block 2 marks it."""
    kv = KVCacheManager(num_blocks=8, block_size=16)
    items = [_Item("image", 16, 16), _Item("empty", 40, 0), _Item("edge", 48, 0)]
    req = Request("r", list(range(64)), SamplingParams(), mm_items=items)
    plain = Request("p", list(range(64)), SamplingParams())
    hashes, base = kv._update_hashes(req), kv._update_hashes(plain)
    assert hashes[0] == base[0] and hashes[1] != base[1]
    assert hashes == _reference_hashes(req, 16)


def test_a_salt_changes_every_block_hash():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    plain, salted, other = (Request(r, list(range(12)), SamplingParams()) for r in "abc")
    salted.cache_salt, other.cache_salt = "tenant-a", "tenant-b"
    chains = [kv._update_hashes(r) for r in (plain, salted, other)]
    assert all(len(set(block)) == 3 for block in zip(*chains))
