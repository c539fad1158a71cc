"""The flash-attn backend's calls, on CPU, against a stand-in `flash_attn` module written from
flash-attn 2's documented semantics (bottom-right causal mask, `window_size=(left, right)`,
paged K/V through `block_table`, GQA). This checks our side of the contract (arguments,
layouts, window conversion, fallbacks); the real kernels run only in the GPU test
`test_flash_backend_matches_reference`, where flash-attn is installed."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from polymodal.llm_core.attention import TorchAttentionBackend
from tests.helpers import spec_for
from tests.llm_core import interpreted
from tests.llm_core.interpreted import assert_close
from tests.llm_core.test_triton_kernels import make_batch

REF = TorchAttentionBackend()


def _attend(q, k, v, scale, causal, window):
    """q [sq, h, d], k/v [sk, hk, d] -> [sq, h, d]: flash-attn's masks, computed in fp32."""
    sq, sk, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    i = torch.arange(sq)[:, None] + (sk - sq)  # query i's diagonal, bottom-right aligned
    j = torch.arange(sk)[None, :]
    left, right = window
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        visible &= j <= i + right
    if left >= 0:
        visible &= j >= i - left
    p = s.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num()
    return torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)


def _pages(cache, table, length):
    return cache[table.long()].flatten(0, 1)[:length]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size=(-1, -1),
                           block_table=None):  # fmt: skip
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = cu_seqlens_q[b].item(), cu_seqlens_q[b + 1].item()
        k0, k1 = cu_seqlens_k[b].item(), cu_seqlens_k[b + 1].item()
        assert q1 - q0 <= max_seqlen_q and k1 - k0 <= max_seqlen_k
        if block_table is None:
            kb, vb = k[k0:k1], v[k0:k1]
        else:
            kb, vb = _pages(k, block_table[b], k1 - k0), _pages(v, block_table[b], k1 - k0)
        out[q0:q1] = _attend(q[q0:q1], kb, vb, softmax_scale, causal, window_size)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1)):  # fmt: skip
    out = torch.empty_like(q)  # q [batch, seqlen, heads, d]
    for b in range(q.shape[0]):
        n = cache_seqlens[b].item()
        kb, vb = _pages(k_cache, block_table[b], n), _pages(v_cache, block_table[b], n)
        out[b] = _attend(q[b], kb, vb, softmax_scale, causal, window_size)
    return out


@pytest.fixture
def flash(monkeypatch):
    """The flash backend over the stand-in module, and the calls it made."""
    calls = []
    fake = types.ModuleType("flash_attn")

    def traced(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return call

    fake.flash_attn_varlen_func = traced(flash_attn_varlen_func)
    fake.flash_attn_with_kvcache = traced(flash_attn_with_kvcache)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    from polymodal.llm_core.attention import get_backend

    return get_backend("flash", "cpu"), calls


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("q_lens,seq_lens", [([1] * 4, [1, 255, 256, 600]), ([5, 300], [5, 700])])
def test_paged_attention_through_flash(flash, window, q_lens, seq_lens):
    """256-token pages in bf16 take flash-attn: decode through `flash_attn_with_kvcache`,
    prefill (with cached prefixes) through `flash_attn_varlen_func` on the paged cache."""
    backend, calls = flash
    q, cache, meta = make_batch(q_lens, seq_lens, heads=4, kv_heads=2, page=256,
                                dtype=torch.bfloat16)  # fmt: skip
    out = backend.paged_attention(q, cache, meta, spec_for(q, cache, 0.2, window))
    want = REF.paged_attention(
        q.float(), cache.float(), meta, spec_for(q.float(), cache.float(), 0.2, window)
    )
    assert_close(out, want, torch.bfloat16)
    assert calls == ["flash_attn_with_kvcache" if meta.is_decode else "flash_attn_varlen_func"]


def test_rotary_folds_into_decode_only_where_triton_decodes(flash, monkeypatch):
    """Where the Triton backend would fold rotary + KV store into decode (CUDA), the flash
    backend does too on 16-token pages (Triton decodes) but not on 256 (flash-attn does)."""
    from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend

    backend, _ = flash
    monkeypatch.setattr(TritonAttentionBackend, "fuses_rope_decode", lambda self, q, kv: True)
    for page, folds in ((16, True), (256, False)):
        q, cache, _ = make_batch([1, 1], [17, 40], page=page, dtype=torch.bfloat16)
        assert backend.fuses_rope_decode(q, cache) is folds


@pytest.mark.skipif(not interpreted.IN_PROCESS, reason="Triton kernels compile for CUDA here")
def test_other_pages_and_dtypes_stay_on_triton(flash):
    """16-token pages and fp32 run the Triton kernels (interpreted here), not flash-attn."""
    backend, calls = flash
    q, cache, meta = make_batch([1, 1], [17, 40], page=16, dtype=torch.bfloat16)
    backend.paged_attention(q, cache, meta, spec_for(q, cache, 0.2))
    q32, cache32, meta32 = make_batch([1, 1], [17, 40], page=256)
    backend.paged_attention(q32, cache32, meta32, spec_for(q32, cache32, 0.2))
    assert calls == []


def test_varlen_through_flash(flash):
    backend, calls = flash
    cu = torch.tensor([0, 15, 31, 31, 48])
    q, k, v = (torch.randn(48, 2, 80).bfloat16() for _ in range(3))
    for causal in (False, True):
        out = backend.varlen_attention(q, k, v, cu, 17, 0.11, causal)
        want = REF.varlen_attention(q.float(), k.float(), v.float(), cu, 17, 0.11, causal)
        assert_close(out, want, torch.bfloat16)
    assert calls == ["flash_attn_varlen_func"] * 2
