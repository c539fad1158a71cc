"""An FP8 KV cache in the Triton attention kernels (store, paged prefill, paged decode, the
fused rope_decode) against the torch reference with the same scales, on CPU under
TRITON_INTERPRET=1 (`interpreted.py`). Stored values are k / k_scale (saturated E4M3); the
kernels fold k_scale into the softmax scale and v_scale into the output."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.attention import TorchAttentionBackend, triton_backend
from polymodal.llm_core.layers import triton_ops
from tests.helpers import spec_for
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_triton_kernels import make_batch

REF = TorchAttentionBackend()
FP8 = torch.float8_e4m3fn
SCALES = (0.5, 2.0)


def fp8_batch(q_lens, seq_lens, **kw):
    q, cache, meta = make_batch(q_lens, seq_lens, **kw)
    return q, (cache * 8).to(FP8), meta  # E4M3 values of a realistic spread


def test_store_kv_fp8():
    """Values on the grid (k = e4m3 * k_scale, so no rounding: the interpreter's cast rounds
    some values a binade low), one past the range (saturates to 448)."""
    gen = torch.Generator().manual_seed(0)
    k = (torch.randn(9, 3, 24, generator=gen) * 8).to(FP8).float() * SCALES[0]
    v = (torch.randn(9, 3, 24, generator=gen) * 8).to(FP8).float() * SCALES[1]
    k[0, 0, 0] = 1e6
    slots = torch.tensor([5, -1, 0, 15, 16, 17, -1, 40, 33], dtype=torch.int64)
    cache = torch.zeros(2, 4, 16, 3, 24, dtype=FP8)
    expected = cache.clone()
    REF.store_kv(k, v, expected, slots, SCALES)
    triton_backend.TritonAttentionBackend().store_kv(k, v, cache, slots, SCALES)
    assert torch.equal(cache.float(), expected.float())
    assert expected[0, 0, 5, 0, 0].float() == 448.0


@pytest.mark.parametrize("scales", [None, SCALES])
def test_paged_prefill_fp8(scales):
    q, cache, meta = fp8_batch([5, 17, 1, 3], [21, 17, 16, 35])
    meta.is_decode = False
    spec = spec_for(q, cache, 0.2)
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec, scales)
    assert_close(out, REF.paged_attention(q, cache, meta, spec, scales), torch.float32)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("scales", [None, SCALES])
def test_paged_decode_fp8(splits, scales):
    q, cache, meta = fp8_batch([1] * 5, [1, 15, 16, 17, 70], heads=6, kv_heads=2)
    spec = spec_for(q, cache, 0.3)
    backend = triton_backend.TritonAttentionBackend(splits)
    out = backend.paged_attention(q, cache, meta, spec, scales)
    assert_close(out, REF.paged_attention(q, cache, meta, spec, scales), torch.float32)


@pytest.mark.parametrize("splits", [1, 3])
def test_rope_decode_fp8_equals_rotary_store_then_decode(splits):
    """The fused decode quantizes the new key and value as store_kv does, stores them and
    attends to the stored (quantized) values: the same cache bits and output as the three
    kernels."""
    heads, kv_heads, head_dim = 6, 2, 32
    _, cache, meta = fp8_batch([1] * 4, [1, 17, 40, 70], heads=heads, kv_heads=kv_heads)
    lens = meta.seq_lens.long() - 1
    meta.slot_mapping = meta.block_tables[torch.arange(4), lens // 16].long() * 16 + lens % 16
    qkv = torch.randn(4, (heads + 2 * kv_heads) * head_dim)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = q.view(4, heads, -1), k.view(4, kv_heads, -1), v.view(4, kv_heads, -1)
    angles = torch.randn(4, head_dim)
    cos, sin = angles.cos().chunk(2, -1)[0], angles.sin().chunk(2, -1)[0]
    backend = triton_backend.TritonAttentionBackend(splits)
    spec = spec_for(q, cache, 0.3)
    ref_cache = cache.clone()
    ref_q, ref_k = triton_ops.rotary_embedding(q.clone(), k.clone(), cos, sin)
    backend.store_kv(ref_k, v, ref_cache, meta.slot_mapping, SCALES)
    want = backend.paged_attention(ref_q, ref_cache, meta, spec, SCALES)
    out = backend.rope_decode(q, k, v, (cos, sin), cache, meta, spec, SCALES)
    assert torch.equal(cache.float(), ref_cache.float())
    assert torch.equal(out, want)
