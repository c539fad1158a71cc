"""The paged decode kernel with q's and k's per-head RMSNorms folded in (`QKNorms`: Qwen3,
Gemma 3) against the kernels it replaces, on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.attention import triton_backend
from polymodal.llm_core.layers import triton_ops
from polymodal.llm_core.layers.norm import QKNorms
from polymodal.llm_core.layers.triton_norm import qk_rms_norm_
from tests.helpers import spec_for
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_triton_kernels import make_batch


@pytest.mark.parametrize("unit_offset", [False, True])  # Qwen3's RMSNorm, Gemma 3's
@pytest.mark.parametrize("dtype,rotary_dim", [(torch.float32, 32), (torch.bfloat16, 16)])
def test_rope_decode_folds_the_qk_norms(unit_offset, dtype, rotary_dim):
    """q's and k's per-head RMSNorms inside the decode kernel equal `qk_rms_norm_` before the
    rotary, KV store and attention: the stored keys within one rounding of the input dtype
    (the fp32 sums may add in another order), the output as close."""
    heads, kv_heads, head_dim = 6, 2, 32
    _, cache, meta = make_batch([1] * 3, [5, 17, 70], heads, kv_heads, head_dim, dtype=dtype)
    lens = meta.seq_lens.long() - 1
    meta.slot_mapping = meta.block_tables[torch.arange(3), lens // 16].long() * 16 + lens % 16
    qkv = (3 * torch.randn(3, (heads + 2 * kv_heads) * head_dim)).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.view(3, heads, head_dim), k.view(3, kv_heads, head_dim)
    v = v.view(3, kv_heads, head_dim)
    weights = [(torch.randn(head_dim) * 0.3 + (0 if unit_offset else 1)).to(dtype) for _ in "qk"]
    angles = torch.randn(3, rotary_dim)
    cos, sin = angles.cos().chunk(2, -1)[0], angles.sin().chunk(2, -1)[0]
    backend = triton_backend.TritonAttentionBackend(3)
    spec = spec_for(q, cache, 0.3)
    ref_cache = cache.clone()
    ref_q, ref_k = qk_rms_norm_(q.clone(), k.clone(), *weights, 1e-6, unit_offset)
    ref_q, ref_k = triton_ops.rotary_embedding(ref_q, ref_k, cos, sin)
    backend.store_kv(ref_k, v, ref_cache, meta.slot_mapping)
    want = backend.paged_attention(ref_q, ref_cache, meta, spec)
    norms = QKNorms(*weights, 1e-6, unit_offset)
    out = backend.rope_decode(q, k, v, (cos, sin), cache, meta, spec, norms=norms)
    assert_close(cache, ref_cache, dtype)
    assert_close(out, want, dtype)
    if dtype == torch.float32:  # (bf16: one rounding apart at most; fp32 shows a bug)
        assert (cache - ref_cache).abs().max() < 1e-5
