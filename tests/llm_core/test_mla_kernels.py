"""The MLA Triton kernels on CPU under TRITON_INTERPRET=1 (set up in `interpreted.py`): the
absorbed-form decode over a paged latent cache against the expanded form (per-head keys and
values up-projected from the latents, plain softmax attention), and the latent store."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.attention import triton_mla
from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.mla import mla_decode_reference
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)

HEADS, NOPE, ROPE, V, RANK = 20, 16, 8, 12, 32  # 20 heads: two head blocks, one partial


def make_case(seq_lens, page=8, dtype=torch.float32, seed=0):
    """A shuffled paged latent cache, block tables, queries and the up-projection."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // page) for n in seq_lens]
    num_blocks = sum(pages) + 2
    cache = torch.randn(num_blocks, page, 1, RANK + ROPE, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(pages) + 1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used : used + n]
        used += n
    q_nope = torch.randn(len(seq_lens), HEADS, NOPE, generator=gen)
    q_pe = torch.randn(len(seq_lens), HEADS, ROPE, generator=gen)
    kv_b = torch.randn(HEADS, NOPE + V, RANK, generator=gen) * RANK**-0.5
    return cache, tables, q_nope, q_pe, kv_b


def expanded_reference(cache, tables, seq_lens, q_nope, q_pe, kv_b, scale):
    """Per sequence: k_h = [W_UK_h c | k_pe], v_h = W_UV_h c, softmax(q_h . k_h) v_h."""
    page = cache.shape[1]
    out = []
    for s, n in enumerate(seq_lens):
        rows = cache[tables[s, : -(-n // page)].long()].reshape(-1, RANK + ROPE)[:n].float()
        c, k_pe = rows[:, :RANK], rows[:, RANK:]
        k_nope = torch.einsum("hdr,lr->hld", kv_b[:, :NOPE], c)  # [H, L, nope]
        v = torch.einsum("hdr,lr->hld", kv_b[:, NOPE:], c)  # [H, L, v]
        scores = torch.einsum("hd,hld->hl", q_nope[s], k_nope) + q_pe[s] @ k_pe.T
        out.append(torch.einsum("hl,hld->hd", torch.softmax(scores * scale, -1), v))
    return torch.stack(out)  # [B, H, v]


@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_decode_matches_the_expanded_form(splits, dtype):
    seq_lens = [1, 7, 8, 9, 45]
    cache, tables, q_nope, q_pe, kv_b = make_case(seq_lens, dtype=dtype)
    scale = (NOPE + ROPE) ** -0.5
    ref = expanded_reference(cache, tables, seq_lens, q_nope, q_pe, kv_b, scale)
    q_lat = torch.einsum("bhd,hdr->bhr", q_nope, kv_b[:, :NOPE])
    q = torch.cat([q_lat, q_pe], -1).to(dtype)
    seq_t = torch.tensor(seq_lens, dtype=torch.int32)
    for _ in range(2):  # nothing carried between launches
        out_lat = triton_mla.mla_decode(q, cache, tables, seq_t, RANK, scale, splits)
        assert out_lat.dtype == dtype
        out = torch.einsum("bhr,hdr->bhd", out_lat.float(), kv_b[:, NOPE:])
        assert_close(out, ref, dtype)
    meta = AttentionMetadata(torch.arange(6, dtype=torch.int32), seq_t, tables,
                             torch.zeros(5, dtype=torch.int64), 1, 45, True)  # fmt: skip
    torch_lat = mla_decode_reference(q.float(), cache.float(), meta, RANK, scale)
    out = torch.einsum("bhr,hdr->bhd", torch_lat, kv_b[:, NOPE:])
    assert_close(out, ref, torch.float32 if dtype == torch.float32 else dtype)


def test_store_latent():
    cache = torch.randn(4, 8, 1, RANK + ROPE)
    expected = cache.clone()
    entries = torch.randn(5, RANK + ROPE)
    slots = torch.tensor([3, -1, 8, 31, 0])
    keep = slots >= 0
    expected[slots[keep] // 8, slots[keep] % 8, 0] = entries[keep]
    triton_mla.store_latent(entries, cache, slots)
    assert torch.equal(cache, expected)
