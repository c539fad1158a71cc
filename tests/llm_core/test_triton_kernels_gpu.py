"""Triton attention and fused kernels at realistic sizes in bf16 on CUDA (Qwen2.5-7B-like: 28 q
heads, 4 kv heads, head_dim 128), against the torch reference computed in fp32; plus CUDA-graph
replay of decode and the PDL layer chain (the GEMV alone: test_gemv_gpu.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from polymodal.llm_core.attention import AttentionMetadata, TorchAttentionBackend
from tests.helpers import spec_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted here"
    ),
]

HEADS, KV_HEADS, HEAD_DIM, PAGE = 28, 4, 128, 16
ATOL = RTOL = 2e-2  # bf16 inputs/outputs, fp32 accumulation
REF = TorchAttentionBackend()


def _backend(splits=None):
    from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(splits)


def make_batch(q_lens, seq_lens, seed=0, extra_blocks=4, page=PAGE):
    """bf16 paged cache (shuffled blocks) + metadata on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-s // page) for s in seq_lens]
    num_blocks = sum(pages) + extra_blocks
    cache = torch.randn(2, num_blocks, page, KV_HEADS, HEAD_DIM, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(pages) + extra_blocks, dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used : used + n]
        used += n
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32).cuda(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).cuda(),
        block_tables=tables.cuda(),
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64).cuda(),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        is_decode=all(n == 1 for n in q_lens),
        query_lens_cpu=list(q_lens),
        seq_lens_cpu=list(seq_lens),
    )
    q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, generator=gen)
    return q.cuda().bfloat16(), cache.cuda().bfloat16(), meta


def reference(q, cache, meta, scale, window=None):
    return REF.paged_attention(
        q.float(), cache.float(), meta, spec_for(q.float(), cache.float(), scale, window)
    )


def check(out, ref):
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("window", [None, 1024])
def test_prefill_mixed_batch(window):
    q_lens = [1, 17, 512, 2048, 300, 8192]
    seq_lens = [100, 17, 4096, 2048, 7000, 8192]  # with and without cached prefixes
    q, cache, meta = make_batch(q_lens, seq_lens)
    out = _backend().paged_attention(q, cache, meta, spec_for(q, cache, HEAD_DIM**-0.5, window))
    check(out, reference(q, cache, meta, HEAD_DIM**-0.5, window))


@pytest.mark.parametrize("splits", [None, 1, 8])
@pytest.mark.parametrize("window", [None, 4096])
def test_decode_64_sequences(splits, window):
    seq_lens = torch.randint(1, 8192, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    seq_lens[:4] = [1, 15, 16, 8192]
    q, cache, meta = make_batch([1] * 64, seq_lens)
    out = _backend(splits).paged_attention(
        q, cache, meta, spec_for(q, cache, HEAD_DIM**-0.5, window)
    )
    check(out, reference(q, cache, meta, HEAD_DIM**-0.5, window))


@pytest.mark.parametrize(
    "mask,window,softcap",
    [
        ("SLIDING", 1024, 50.0),
        ("CHUNKED", 2048, None),
        ("CHUNKED", 1000, 30.0),
        ("CAUSAL", None, 50.0),
    ],
)
def test_masks_and_softcap_at_size(mask, window, softcap):
    """Chunked-local and soft-capped attention (Gemma-style caps, Llama-4-style chunks) in
    prefill (with cached prefixes) and decode (split-KV), against the fp32 reference."""
    from polymodal.llm_core.attention.spec import Mask

    q_lens, seq_lens = [1, 17, 512, 2048, 300], [100, 17, 4096, 2048, 7000]
    q, cache, meta = make_batch(q_lens, seq_lens, seed=3)
    spec = spec_for(q, cache, HEAD_DIM**-0.5, window, Mask[mask], softcap)
    ref_spec = spec_for(q.float(), cache.float(), HEAD_DIM**-0.5, window, Mask[mask], softcap)
    want = REF.paged_attention(q.float(), cache.float(), meta, ref_spec)
    check(_backend().paged_attention(q, cache, meta, spec), want)
    q, cache, meta = make_batch([1] * 8, [1, 15, 16, 1000, 2049, 4097, 6000, 8192], seed=4)
    want = REF.paged_attention(q.float(), cache.float(), meta, ref_spec)
    for splits in (None, 1, 8):
        check(_backend(splits).paged_attention(q, cache, meta, spec), want)


def test_decode_single_long_sequence_splits():
    q, cache, meta = make_batch([1], [8000])
    out = _backend().paged_attention(
        q, cache, meta, spec_for(q, cache, HEAD_DIM**-0.5)
    )  # heuristic: split-KV
    check(out, reference(q, cache, meta, HEAD_DIM**-0.5))


@pytest.mark.parametrize("seq_lens", [[40], [1, 15, 16, 17, 300, 8000], list(range(1, 1000, 4))])
def test_rope_decode_equals_rotary_store_then_decode(seq_lens):
    """Rotary + KV store inside decode attention (views of a packed qkv, M-RoPE-sized cos/sin)
    gives the same cache bits and the same output as the three kernels it replaces: batch 1,
    splits, and a captioning-sized batch; twice (arrival counters back at zero)."""
    from polymodal.llm_core.layers import triton_ops

    n = len(seq_lens)
    _, cache, meta = make_batch([1] * n, seq_lens, seed=n)
    lens = meta.seq_lens.long() - 1
    meta.slot_mapping = meta.block_tables[torch.arange(n).cuda(), lens // PAGE].long() * PAGE
    meta.slot_mapping += lens % PAGE
    sizes = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    qkv = torch.randn(n, sum(sizes), device="cuda").bfloat16()
    q, k, v = (t.view(n, -1, HEAD_DIM) for t in qkv.split(sizes, -1))
    angles = torch.rand(n, HEAD_DIM // 2, device="cuda") * 1000
    cos, sin = angles.cos(), angles.sin()
    backend = _backend()
    ref_cache = cache.clone()
    ref_q, ref_k = triton_ops.rotary_embedding(q.clone(), k.clone(), cos, sin)
    backend.store_kv(ref_k, v, ref_cache, meta.slot_mapping)
    want = backend.paged_attention(
        ref_q, ref_cache, meta, spec_for(ref_q, ref_cache, HEAD_DIM**-0.5)
    )
    for _ in range(2):
        out = backend.rope_decode(
            q, k, v, (cos, sin), cache, meta, spec_for(q, cache, HEAD_DIM**-0.5)
        )
        assert torch.equal(cache, ref_cache)
        assert torch.equal(out, want)


def test_store_kv_realistic():
    cache = torch.zeros(2, 64, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(700, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(64 * PAGE, device="cuda")[:700]
    slots[::7] = -1
    expected = cache.clone()
    REF.store_kv(k, v, expected, slots)
    _backend().store_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_vision_encoder(causal):
    """Qwen2.5-VL tower: 16 heads, head_dim 80, windows of 64 patches plus one 1024 image."""
    lens = [64] * 12 + [1024, 37, 200]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32).cuda()
    total = sum(lens)
    q, k, v = (torch.randn(total, 16, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = _backend().varlen_attention(q, k, v, cu, max(lens), 80**-0.5, causal)
    ref = REF.varlen_attention(q.float(), k.float(), v.float(), cu, max(lens), 80**-0.5, causal)
    check(out, ref)


def test_decode_cuda_graph_replay_matches_eager():
    """Capture decode once; replay twice with new q / seq_lens / block tables copied in."""
    backend = _backend()
    scale = HEAD_DIM**-0.5
    q, cache, meta = make_batch([1] * 32, [4000] * 32, seed=2, extra_blocks=300)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        backend.paged_attention(q, cache, meta, spec_for(q, cache, scale))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.paged_attention(q, cache, meta, spec_for(q, cache, scale))
    for seed in (3, 4):
        gen = torch.Generator().manual_seed(seed)
        capacity = meta.block_tables.shape[1] * PAGE  # may exceed the captured lengths
        new_lens = torch.randint(1, capacity + 1, (32,), generator=gen).int()
        new_tables = torch.randint(0, cache.shape[1], meta.block_tables.shape, generator=gen)
        q.copy_(torch.randn(q.shape, generator=gen).bfloat16())
        meta.seq_lens.copy_(new_lens)
        meta.block_tables.copy_(new_tables.int())
        cache.normal_()
        graph.replay()
        eager = backend.paged_attention(q, cache, meta, spec_for(q, cache, scale))
        torch.testing.assert_close(static_out, eager, atol=0, rtol=0)
        meta.seq_lens_cpu = new_lens.tolist()
        check(static_out, reference(q, cache, meta, scale))


def test_fused_ops_realistic():
    from polymodal.llm_core.layers import triton_ops as ops

    x = torch.randn(333, 3584, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(3584, device="cuda", dtype=torch.bfloat16)
    for got, want in zip(ops.rms_norm(x, w, 1e-6, res), ops.rms_norm_ref(x, w, 1e-6, res)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    gate_up = torch.randn(333, 2 * 18944, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), ops.silu_and_mul_ref(gate_up))
    qkv = torch.randn(333, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : HEADS * HEAD_DIM].view(333, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(333, KV_HEADS, HEAD_DIM)
    angles = torch.randn(333, HEAD_DIM // 2, device="cuda")
    ref_q, ref_k = ops.rotary_embedding_ref(q.clone(), k.clone(), angles.cos(), angles.sin())
    ops.rotary_embedding(q, k, angles.cos(), angles.sin())
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(k, ref_k)


def test_gemma_fused_ops_realistic():
    """Gemma-3-12B sizes: the (1 + w) RMSNorm (with and without the residual add) and the
    GELU-tanh gated activation, against their torch definitions."""
    from polymodal.llm_core.layers import triton_ops as ops
    from polymodal.llm_core.layers.norm import GemmaRMSNorm

    x = torch.randn(77, 3840, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    norm = GemmaRMSNorm(3840).cuda().bfloat16()
    norm.weight.data.normal_()
    for residual in (None, res):
        got = ops.rms_norm(x, norm.weight, 1e-6, residual, unit_offset=True)
        h = (x if residual is None else x + residual).float()
        want = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1 + norm.weight.float())
        torch.testing.assert_close(got[0], want.bfloat16(), atol=2e-2, rtol=2e-2)
    gate_up = torch.randn(77, 2 * 15360, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.float().chunk(2, -1)
    want = (torch.nn.functional.gelu(gate, approximate="tanh") * up).bfloat16()
    torch.testing.assert_close(ops.silu_and_mul(gate_up, gelu_tanh=True), want)


@pytest.mark.parametrize("page", [16, 256])  # 16: flash backend falls back to Triton
def test_flash_backend_matches_reference(page):
    pytest.importorskip("flash_attn")
    from polymodal.llm_core.attention import get_backend

    backend = get_backend("flash", "cuda")
    cases = [([1] * 8, [1, 300, 17, 512, 999, 5, 256, 257]), ([7, 300], [500, 300])]
    for q_lens, seq_lens in cases:
        q, cache, meta = make_batch(q_lens, seq_lens, page=page)
        for window in (None, 64):
            out = backend.paged_attention(q, cache, meta, spec_for(q, cache, 0.09, window))
            check(out, reference(q, cache, meta, 0.09, window))
    cu = torch.tensor([0, 64, 128, 1152], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1152, 16, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = backend.varlen_attention(q, k, v, cu, 1024, 0.11)
    check(out, REF.varlen_attention(q.float(), k.float(), v.float(), cu, 1024, 0.11))


def _decode_layer_chain(x, weights, cache, meta, layers=6):
    """Batch-1 decoder layers from the Triton kernels alone: each kernel reads what the one
    before it wrote (the chain programmatic dependent launch must keep ordered)."""
    from polymodal.llm_core.layers import triton_ops as ops
    from polymodal.llm_core.layers.gemv import gemv

    backend = _backend()
    w_qkv, w_o, w_gate_up, w_down, norm_w = weights
    hidden, residual = x, torch.zeros_like(x)
    angles = torch.arange(HEAD_DIM // 2, device="cuda", dtype=torch.float32)[None] * 0.01
    for _ in range(layers):
        normed, residual = ops.rms_norm(hidden, norm_w, 1e-6, residual)
        qkv = gemv(normed, w_qkv)
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        q, k = q.view(1, HEADS, HEAD_DIM), k.view(1, KV_HEADS, HEAD_DIM)
        ops.rotary_embedding(q, k, angles.cos(), angles.sin())
        backend.store_kv(k, v.view(1, KV_HEADS, HEAD_DIM), cache, meta.slot_mapping)
        attn = backend.paged_attention(q, cache, meta, spec_for(q, cache, HEAD_DIM**-0.5))
        hidden = gemv(attn.reshape(1, -1), w_o)
        normed, residual = ops.rms_norm(hidden, norm_w, 1e-6, residual)
        hidden = gemv(ops.silu_and_mul(gemv(normed, w_gate_up)), w_down)  # down: split K
    return hidden + residual


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="programmatic dependent launch needs sm_90+",
)
def test_pdl_layer_chain_graph_equals_plain_launches():
    """Six decoder layers of Triton kernels with PDL, captured and replayed twice, give bit for
    bit what plain launches give (a kernel reading before its predecessor finished would not)."""
    from polymodal.llm_core import pdl

    hidden_size, inter = HEADS * HEAD_DIM, 8192
    gen = torch.Generator(device="cuda").manual_seed(11)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    weights = (
        rand(qkv_rows, hidden_size, scale=hidden_size**-0.5),
        rand(hidden_size, hidden_size, scale=hidden_size**-0.5),
        rand(2 * inter, hidden_size, scale=hidden_size**-0.5),
        rand(hidden_size, inter, scale=inter**-0.5),
        rand(hidden_size, scale=0.1) + 1,
    )
    _, cache, meta = make_batch([1], [700], seed=8)
    last = 699  # the new token's slot: attention reads what store_kv just wrote
    meta.slot_mapping.fill_(int(meta.block_tables[0, last // PAGE]) * PAGE + last % PAGE)
    x = rand(1, hidden_size)
    assert pdl.is_enabled()
    try:
        pdl.set_enabled(False)
        cache_plain = cache.clone()
        want = _decode_layer_chain(x, weights, cache_plain, meta)
    finally:
        pdl.set_enabled(True)
    cache_start = cache.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile the PDL variants outside the capture
        eager_pdl = _decode_layer_chain(x, weights, cache, meta)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(eager_pdl, want, atol=0, rtol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _decode_layer_chain(x, weights, cache, meta)
    for _ in range(2):
        cache.copy_(cache_start)
        static_out.zero_()
        graph.replay()
        torch.testing.assert_close(static_out, want, atol=0, rtol=0)
        torch.testing.assert_close(cache, cache_plain, atol=0, rtol=0)
