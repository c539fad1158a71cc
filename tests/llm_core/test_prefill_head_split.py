"""Head dims that are not a power of 2 in the Triton prefill / varlen kernel: run as two
power-of-2 parts (`head_dim_split`: 80 = 64 + 16, 96 = 64 + 32, 72 = 64 + 16 with 8 masked,
48 = 32 + 16), or as one padded part (64, 128, 256). Against SDPA per segment and the torch
reference, in fp32 under TRITON_INTERPRET=1 (`interpreted.py`), every mask kind and feature."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.attention import TorchAttentionBackend, triton_backend
from polymodal.llm_core.attention.spec import Mask
from polymodal.llm_core.attention.triton_prefill import head_dim_split
from tests.helpers import spec_for
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_triton_kernels import make_batch

REF = TorchAttentionBackend()
SPLIT_DIMS = [80, 96, 72, 48]  # two parts
WHOLE_DIMS = [64, 128, 256]  # one part, as before the split
FP32 = torch.float32


def test_head_dim_split_rule():
    assert [head_dim_split(d) for d in SPLIT_DIMS] == [(64, 16), (64, 32), (64, 16), (32, 16)]
    assert [head_dim_split(d) for d in WHOLE_DIMS] == [(64, 0), (128, 0), (256, 0)]
    assert head_dim_split(192) == (128, 64)  # MLA's q/k (128 nope + 64 rope)
    assert head_dim_split(112) == (128, 0)  # 64 + 64 saves nothing
    assert head_dim_split(24) == (32, 0)  # 16 + 16 saves nothing
    for d in range(16, 513):
        first, second = head_dim_split(d)
        full = 1 << (d - 1).bit_length()
        assert first & (first - 1) == 0 and second & (second - 1) == 0, d  # powers of 2
        assert first + second >= d, d  # every column covered
        if second:
            assert second >= 16 and first <= d and first + second < full, d  # tl.dot, a saving
        else:
            assert first == full, d


def sdpa_varlen(q, k, v, bounds, scale, causal):
    """SDPA per segment (k/v heads repeated for GQA), fp32."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        qs, ks, vs = (x[lo:hi].transpose(0, 1) for x in (q, k, v))  # [heads, len, d]
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        att = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[lo:hi] = att.transpose(0, 1)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("head_dim", SPLIT_DIMS + WHOLE_DIMS)
def test_varlen_segments(head_dim, heads, kv_heads, causal):
    """Several segments (16-row tiles here: one tile, partial tiles, an empty segment, three
    tiles), GQA or not, bidirectional (the vision towers) or causal."""
    bounds = [0, 15, 31, 31, 48, 49, 90]  # lens 15, 16, 0, 17, 1, 41
    gen = torch.Generator().manual_seed(head_dim + heads)
    q = torch.randn(bounds[-1], heads, head_dim, generator=gen)
    k, v = (torch.randn(bounds[-1], kv_heads, head_dim, generator=gen) for _ in "kv")
    cu = torch.tensor(bounds, dtype=torch.int32)
    scale = head_dim**-0.5
    out = triton_backend.TritonAttentionBackend().varlen_attention(q, k, v, cu, 41, scale, causal)
    assert_close(out, sdpa_varlen(q, k, v, bounds, scale, causal), FP32)


@pytest.mark.parametrize("head_dim", [80, 72])
def test_varlen_bf16_packed_tower_views(head_dim):
    """bf16 q/k/v as strided views of a tower's packed qkv `[tokens, 3, heads, d]`."""
    q, k, v = torch.randn(45, 3, 2, head_dim).to(torch.bfloat16).unbind(1)
    cu = torch.tensor([0, 7, 20, 45], dtype=torch.int32)
    out = triton_backend.TritonAttentionBackend().varlen_attention(q, k, v, cu, 25, 0.11)
    assert out.dtype == torch.bfloat16
    assert_close(out, REF.varlen_attention(q, k, v, cu, 25, 0.11), torch.bfloat16)


PAGED_MASKS = {  # name: (mask, window, softcap)
    "causal": (None, None, None),
    "sliding": (None, 7, None),
    "chunked_softcap": (Mask.CHUNKED, 11, 2.0),
    "bidirectional": (Mask.BIDIRECTIONAL, None, None),
}


@pytest.mark.parametrize("mask", sorted(PAGED_MASKS))
@pytest.mark.parametrize("head_dim", SPLIT_DIMS + WHOLE_DIMS)
def test_paged_prefill_with_cached_prefix(head_dim, mask):
    """Chunked prefill over a shuffled paged cache: new queries after cached prefixes, a
    one-query sequence, GQA 3."""
    q, cache, meta = make_batch([5, 17, 1, 20], [21, 17, 16, 40], 6, 2, head_dim, page=8)
    meta.is_decode = False
    kind, window, softcap = PAGED_MASKS[mask]
    spec = spec_for(q, cache, 0.2, window, kind, softcap)
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec)
    assert_close(out, REF.paged_attention(q, cache, meta, spec), FP32)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("head_dim", [80, 72])
def test_paged_prefill_media_ranges(head_dim, window):
    """Media key ranges (RANGES): queries also see their image run past the causal edge."""
    q, cache, meta = make_batch([30, 9], [45, 9], 4, 2, head_dim)
    runs = [[(17, 25), (27, 41)], [(2, 7)]]
    lows, highs = [], []
    for q_len, seq_len, seq_runs in zip([30, 9], [45, 9], runs):
        for pos in range(seq_len - q_len, seq_len):
            run = next(((a, b) for a, b in seq_runs if a <= pos < b), (0, 0))
            lows.append(run[0])
            highs.append(run[1])
    meta.query_lens_cpu, meta.seq_lens_cpu = [30, 9], [45, 9]
    meta.media_key_ranges_cpu = (lows, highs)
    meta.media_key_ranges = tuple(torch.tensor(x, dtype=torch.int32) for x in (lows, highs))
    spec = spec_for(q, cache, 0.2, window)
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec)
    assert_close(out, REF.paged_attention(q, cache, meta, spec), FP32)


@pytest.mark.parametrize("head_dim", [80, 96])
def test_cross_prefill(head_dim):
    """Cross attention (MASK 4): each query sees its range of encoder rows; none: zeros."""
    from tests.llm_core.test_cross_attention_kernels import CASES, cross_batch

    case = CASES["sub_ranges_and_text_only"]
    q, cache, meta, spec = cross_batch(*case, head_dim=head_dim)
    meta.is_decode = False
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec)
    assert_close(out, REF.paged_attention(q, cache, meta, spec), FP32)


@pytest.mark.parametrize("scales", [None, (0.5, 2.0)])
@pytest.mark.parametrize("head_dim", [80, 72])
def test_paged_prefill_fp8(head_dim, scales):
    """An FP8 cache: the key scale folded into the softmax scale, the value scale into both
    output parts."""
    q, cache, meta = make_batch([5, 17, 1, 3], [21, 17, 16, 35], 4, 2, head_dim)
    cache = (cache * 8).to(torch.float8_e4m3fn)
    meta.is_decode = False
    spec = spec_for(q, cache, 0.05)
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec, scales)
    assert_close(out, REF.paged_attention(q, cache, meta, spec, scales), FP32)
