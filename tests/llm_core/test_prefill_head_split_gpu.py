"""The Triton prefill / varlen kernel at real sizes in bf16 on CUDA, head dims split into two
power-of-2 parts (`head_dim_split`: the Qwen2.5-VL tower's 80 = 64 + 16) or padded (the one-part
path, e.g. 128 of a 38k-token decoder prefill), against SDPA per segment in fp32."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.attention import AttentionMetadata
from tests.helpers import spec_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted here"
    ),
]
ATOL = RTOL = 2e-2  # bf16 inputs / outputs, fp32 accumulation


def _prefill():
    from polymodal.llm_core.attention import triton_prefill

    return triton_prefill


def sdpa_segments(q, k, v, lens, scale, causal=False):
    """fp32 SDPA per segment of flat `[tokens, heads, d]` q/k/v (k/v heads repeated)."""
    out, start = torch.empty_like(q, dtype=torch.float32), 0
    group = q.shape[1] // k.shape[1]
    for n in lens:
        qs, ks, vs = (x[start : start + n].float().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        att = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[start : start + n] = att.transpose(0, 1)
        start += n
    return out


def check(out, ref):
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=ATOL, rtol=RTOL)


TOWER_CASES = {  # name: (head_dim, segment lengths); 16 heads
    "qwen25vl_frames_and_16k": (80, [4784, 4784, 4784, 16384, 37]),
    "qwen25vl_windows": (80, [64] * 40 + [16, 1]),
    "d96": (96, [4784, 1000]),
    "siglip_d72": (72, [4096, 729, 1]),
    "d48": (48, [3000, 17]),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", sorted(TOWER_CASES))
def test_varlen_split_head_dim_at_tower_sizes(case, causal):
    """bf16 q/k/v as views of a packed qkv `[tokens, 3, heads, d]` (as the towers give them)."""
    head_dim, lens = TOWER_CASES[case]
    assert _prefill().head_dim_split(head_dim)[1] > 0  # the split path
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    qkv = torch.randn(sum(lens), 3, 16, head_dim, device="cuda", generator=gen).bfloat16()
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, *lens], device="cuda").cumsum(0).int()
    scale = head_dim**-0.5
    out = _prefill().varlen_attention(q, k, v, cu, max(lens), scale, causal)
    check(out, sdpa_segments(q, k, v, lens, scale, causal))


def test_split_equals_padded_path(monkeypatch):
    """The two-part and the padded one-part kernels agree (both fp32-accumulated)."""
    prefill = _prefill()
    lens = [4784, 2000]
    q, k, v = (torch.randn(sum(lens), 16, 80, device="cuda").bfloat16() for _ in range(3))
    cu = torch.tensor([0, *lens], device="cuda").cumsum(0).int()
    split = prefill.varlen_attention(q, k, v, cu, max(lens), 80**-0.5)
    full = prefill.triton.next_power_of_2
    monkeypatch.setattr(prefill, "head_dim_split", lambda d: (full(d), 0))
    padded = prefill.varlen_attention(q, k, v, cu, max(lens), 80**-0.5)
    torch.testing.assert_close(split.float(), padded.float(), atol=1e-2, rtol=1e-2)


def paged(q_lens, seq_lens, heads, kv_heads, head_dim, page=16, seed=0):
    """bf16 paged cache (shuffled blocks) + metadata + the dense k/v of each sequence."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-s // page) for s in seq_lens]
    cache = torch.randn(2, sum(pages) + 4, page, kv_heads, head_dim, generator=gen).bfloat16()
    perm = torch.randperm(cache.shape[1], generator=gen)
    tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used : used + n]
        used += n
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *q_lens]).cumsum(0).int().cuda(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).cuda(),
        block_tables=tables.cuda(),
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64).cuda(),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        is_decode=False,
        query_lens_cpu=list(q_lens),
        seq_lens_cpu=list(seq_lens),
    )
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).bfloat16().cuda()
    return q, cache.cuda(), meta


def sdpa_paged(q, cache, meta, scale, rows_per_call=2048):
    """Causal fp32 SDPA of each sequence's new queries over its whole context, `rows_per_call`
    query rows at a time (fp32 SDPA takes the math path: a 38k x 38k score matrix per head
    would not fit)."""
    out, start, page = torch.empty_like(q, dtype=torch.float32), 0, cache.shape[2]
    group = q.shape[1] // cache.shape[3]
    for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        blocks = meta.block_tables[s, : -(-seq_len // page)].long()
        k, v = (cache[i, blocks].flatten(0, 1)[:seq_len].float() for i in (0, 1))
        k, v = (x.transpose(0, 1).repeat_interleave(group, 0) for x in (k, v))
        for a in range(0, q_len, rows_per_call):
            b = min(q_len, a + rows_per_call)
            qs = q[start + a : start + b].float().transpose(0, 1)  # [heads, rows, d]
            last = seq_len - q_len + b  # keys past the chunk's last row are masked anyway
            rows = torch.arange(seq_len - q_len + a, last, device=q.device)[:, None]
            mask = torch.arange(last, device=q.device)[None, :] <= rows
            att = F.scaled_dot_product_attention(
                qs, k[:, :last], v[:, :last], attn_mask=mask, scale=scale
            )
            out[start + a : start + b] = att.transpose(0, 1)
        start += q_len
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,q_lens,seq_lens",
    [
        (32, 32, 80, [2048, 300, 1], [2048, 5000, 77]),  # phi-2-like, cached prefixes
        (32, 8, 96, [1500, 17], [4000, 17]),  # phi-3-like GQA
        (16, 16, 192, [1024], [3000]),  # MLA's expanded q/k (values padded to 192)
        (28, 4, 128, [38_000], [38_000]),  # one part: a 38k-token causal prefill, GQA 7
    ],
)
def test_paged_causal_prefill(heads, kv_heads, head_dim, q_lens, seq_lens):
    q, cache, meta = paged(q_lens, seq_lens, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    out = _prefill().paged_prefill(
        q, cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, max(q_lens),
        spec_for(q, cache, scale),
    )  # fmt: skip
    check(out, sdpa_paged(q, cache, meta, scale))
