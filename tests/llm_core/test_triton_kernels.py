"""The attention Triton kernels against their torch references, on CPU under TRITON_INTERPRET=1
(set up in `interpreted.py`; the elementwise ones are in test_triton_ops.py, the GEMV's in
test_triton_gemv.py)."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    triton_backend,
)
from polymodal.llm_core.layers import triton_ops
from tests.helpers import spec_for
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)

REF = TorchAttentionBackend()


def make_batch(q_lens, seq_lens, heads=4, kv_heads=2, head_dim=32, page=16, dtype=torch.float32):
    """Random paged cache + metadata; each sequence gets shuffled physical blocks."""
    gen = torch.Generator().manual_seed(sum(seq_lens) + heads + head_dim)
    pages = [-(-s // page) for s in seq_lens]
    num_blocks = sum(pages) + 3
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(pages) + 2, dtype=torch.int32)  # padded
    used = 0
    for s, n in enumerate(pages):
        block_tables[s, :n] = perm[used : used + n]
        used += n
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        is_decode=all(n == 1 for n in q_lens),
    )
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype)
    return q, cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv(dtype):
    k = torch.randn(9, 3, 24, dtype=dtype)
    v = torch.randn(9, 3, 24, dtype=dtype)
    slots = torch.tensor([5, -1, 0, 15, 16, 17, -1, 40, 33], dtype=torch.int64)  # page 16
    cache = torch.randn(2, 4, 16, 3, 24).to(dtype)
    expected = cache.clone()
    REF.store_kv(k, v, expected, slots)
    triton_backend.TritonAttentionBackend().store_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)  # written slots copied exactly, others untouched


PREFILL_CASES = {  # name: (q_lens, seq_lens)
    "len15": ([15], [15]),
    "len16": ([16], [16]),
    "len17": ([17], [17]),
    "several_odd": ([1, 7, 33], [1, 7, 33]),
    "cached_prefix": ([5, 17, 1, 3], [21, 17, 16, 35]),
}


@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (6, 2)])
def test_paged_prefill(case, heads, kv_heads):
    q, cache, meta = make_batch(*PREFILL_CASES[case], heads=heads, kv_heads=kv_heads)
    meta.is_decode = False  # q_len 1 sequences go through the prefill kernel here too
    out = triton_backend.TritonAttentionBackend().paged_attention(
        q, cache, meta, spec_for(q, cache, 0.2)
    )
    assert_close(out, REF.paged_attention(q, cache, meta, spec_for(q, cache, 0.2)), torch.float32)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_paged_prefill_sliding_window(window):
    q, cache, meta = make_batch([5, 17, 20], [21, 17, 40])
    meta.is_decode = False
    out = triton_backend.TritonAttentionBackend().paged_attention(
        q, cache, meta, spec_for(q, cache, 0.2, window)
    )
    assert_close(
        out, REF.paged_attention(q, cache, meta, spec_for(q, cache, 0.2, window)), torch.float32
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_prefill_half_and_odd_head_dim(dtype):
    q, cache, meta = make_batch([5, 17], [21, 17], head_dim=24, page=8, dtype=dtype)
    out = triton_backend.TritonAttentionBackend().paged_attention(
        q, cache, meta, spec_for(q, cache, 0.2)
    )
    assert out.dtype == dtype
    assert_close(out, REF.paged_attention(q, cache, meta, spec_for(q, cache, 0.2)), dtype)


@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_decode(splits, window):
    """splits: heuristic, single pass, split-KV, and more splits than tiles (empty splits).
    Twice: the last split merges only if the arrival counters were left at zero."""
    q, cache, meta = make_batch([1] * 5, [1, 15, 16, 17, 70], heads=6, kv_heads=2)
    assert meta.is_decode
    backend = triton_backend.TritonAttentionBackend(splits)
    for _ in range(2):
        out = backend.paged_attention(q, cache, meta, spec_for(q, cache, 0.3, window))
        assert_close(
            out, REF.paged_attention(q, cache, meta, spec_for(q, cache, 0.3, window)), torch.float32
        )


@pytest.mark.parametrize("window", [None, 50])
def test_paged_decode_scales_splits_to_the_context(window):
    """A split count that is a maximum (`min_split_keys`): contexts of 1, 40, 100 and 200 keys
    use 1, 2, 4 and 4 of 4 splits at 32 keys a split (one split writes the output directly);
    twice, so the arrival counters of the merged ones must be back at zero."""
    from polymodal.llm_core.attention.triton_decode import paged_decode

    q, cache, meta = make_batch([1] * 4, [1, 40, 100, 200], heads=4, kv_heads=2)
    want = REF.paged_attention(q, cache, meta, spec_for(q, cache, 0.3, window))
    for _ in range(2):
        out = paged_decode(
            q,
            cache,
            meta.block_tables,
            meta.seq_lens,
            spec_for(q, cache, 0.3, window),
            4,
            16,
            min_split_keys=32,
        )
        assert_close(out, want, torch.float32)


@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_wide_heads_at_their_cuda_tile(splits):
    """Head dim 256 (Gemma 3) at the keys a tile CUDA uses for it (`decode_block_n`: 32),
    contexts shorter than, equal to and spanning several tiles, a window on one pass."""
    from polymodal.llm_core.attention.triton_decode import paged_decode

    q, cache, meta = make_batch([1] * 4, [5, 32, 33, 100], heads=4, kv_heads=2, head_dim=256)
    block_n = triton_backend.decode_block_n(256)
    keys = triton_backend.split_keys(block_n)  # one tile a split, as CUDA runs it
    assert keys == block_n == 32
    for window in (None, 40):
        spec = spec_for(q, cache, 0.05, window)
        out = paged_decode(q, cache, meta.block_tables, meta.seq_lens, spec, splits, block_n,
                           min_split_keys=keys)  # fmt: skip
        assert_close(out, REF.paged_attention(q, cache, meta, spec), torch.float32)


def _naive(q, cache, meta, spec):
    """Attention spelled out per query: its visible keys by the spec's definition, logits
    scaled and soft-capped, softmax, weighted values (the reference's reference)."""
    from polymodal.llm_core.attention.spec import Mask

    page, group = cache.shape[2], q.shape[1] // cache.shape[3]
    out = torch.zeros_like(q)
    starts = meta.query_start_loc.tolist()
    for s, seq_len in enumerate(meta.seq_lens.tolist()):
        keys = [int(meta.block_tables[s, p // page]) * page + p % page for p in range(seq_len)]
        k = cache[0].flatten(0, 1)[keys].float()  # [seq_len, kv_heads, d]
        v = cache[1].flatten(0, 1)[keys].float()
        q_len = starts[s + 1] - starts[s]
        for i in range(q_len):
            p = seq_len - q_len + i
            seen = [j for j in range(seq_len) if spec.mask == Mask.BIDIRECTIONAL or j <= p]
            if spec.mask == Mask.SLIDING:
                seen = [j for j in seen if j > p - spec.window]
            if spec.mask == Mask.CHUNKED:
                seen = [j for j in seen if j // spec.window == p // spec.window]
            for h in range(q.shape[1]):
                logits = k[seen, h // group] @ q[starts[s] + i, h].float() * spec.scale
                if spec.softcap:
                    logits = spec.softcap * torch.tanh(logits / spec.softcap)
                out[starts[s] + i, h] = torch.softmax(logits, 0) @ v[seen, h // group]
    return out


MASK_CASES = {  # name: (mask, window, softcap)
    "causal_softcap": ("CAUSAL", None, 2.0),
    "sliding_softcap": ("SLIDING", 7, 1.5),
    "chunked": ("CHUNKED", 16, None),
    "chunked_odd_softcap": ("CHUNKED", 11, 3.0),
    "bidirectional": ("BIDIRECTIONAL", None, None),
}


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_masks_and_softcap_prefill_and_decode(case):
    """Every mask kind and the soft-cap: the torch reference against the definition, and the
    Triton prefill (chunked prefill with a cached prefix) and decode (split-KV) against it."""
    from polymodal.llm_core.attention.spec import Mask

    name, window, softcap = MASK_CASES[case]
    mask = Mask[name]
    q, cache, meta = make_batch([5, 17, 1, 40], [21, 17, 16, 40])
    spec = spec_for(q, cache, 0.3, window, mask, softcap)
    want = _naive(q, cache, meta, spec)
    assert_close(REF.paged_attention(q, cache, meta, spec), want, torch.float32)
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec)
    assert_close(out, want, torch.float32)
    if mask == Mask.BIDIRECTIONAL:
        return  # no decode step
    q, cache, meta = make_batch([1] * 4, [1, 16, 33, 70])
    want = _naive(q, cache, meta, spec)
    assert_close(REF.paged_attention(q, cache, meta, spec), want, torch.float32)
    for splits in (1, 3):
        out = triton_backend.TritonAttentionBackend(splits).paged_attention(q, cache, meta, spec)
        assert_close(out, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_decode_half(dtype):
    q, cache, meta = make_batch([1, 1], [33, 9], heads=8, kv_heads=1, head_dim=24, dtype=dtype)
    for splits in (1, 2):
        out = triton_backend.TritonAttentionBackend(splits).paged_attention(
            q, cache, meta, spec_for(q, cache, 0.3)
        )
        assert_close(out, REF.paged_attention(q, cache, meta, spec_for(q, cache, 0.3)), dtype)


def test_decode_split_heuristic():
    pick = triton_backend.decode_num_splits
    assert pick(64, 8, 8192, 132, 16) == 1  # enough programs already
    assert pick(1, 4, 4096, 132, 16) == 16  # one long sequence: split, capped
    assert pick(1, 4, 512, 132, 16) == 512 // triton_backend.MIN_KEYS_PER_SPLIT  # short context
    assert pick(1, 4, 40, 132, 16) == 1
    assert pick(0, 4, 16, 132, 16) == 1


def test_decode_tiles_hold_at_most_64_x_128_elements():
    pick = triton_backend.decode_block_n
    assert [pick(d) for d in (64, 80, 128, 256, 512, 1024)] == [64, 64, 64, 32, 16, 16]


def test_store_then_decode_matches_reference():
    """store_kv + decode through the backend equal the reference doing the same."""
    q, cache, meta = make_batch([1, 1], [17, 32], heads=4, kv_heads=2)
    k, v = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    meta.slot_mapping = meta.block_tables[:, 1].long() * 16 + torch.tensor([0, 15])  # pos 16, 31
    ref_cache = cache.clone()
    REF.store_kv(k, v, ref_cache, meta.slot_mapping)
    backend = triton_backend.TritonAttentionBackend(2)
    backend.store_kv(k, v, cache, meta.slot_mapping)
    out = backend.paged_attention(q, cache, meta, spec_for(q, cache, 0.25))
    assert_close(
        out, REF.paged_attention(q, ref_cache, meta, spec_for(q, ref_cache, 0.25)), torch.float32
    )


@pytest.mark.parametrize(
    "splits,window,mask,softcap",
    [
        (None, None, None, None),
        (1, None, None, None),
        (3, None, None, None),
        (3, 20, None, None),
        (3, 16, "CHUNKED", 2.5),  # a chunked layer with soft-capped logits
    ],
)
@pytest.mark.parametrize("rotary_dim", [32, 16])  # full and partial rotary
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_decode_equals_rotary_store_then_decode(
    splits, window, mask, softcap, rotary_dim, dtype
):
    """Decode with the rotary and the KV store inside the kernel, from views of a packed qkv
    row, equals the three kernels it replaces: the same cache bits and the same output; twice
    (split merges need the arrival counters back at zero). A padding row (slot -1) stores
    nothing."""
    heads, kv_heads, head_dim = 6, 2, 32
    _, cache, meta = make_batch([1] * 4, [1, 17, 40, 70], heads, kv_heads, head_dim, dtype=dtype)
    lens = meta.seq_lens.long() - 1
    meta.slot_mapping = meta.block_tables[torch.arange(4), lens // 16].long() * 16 + lens % 16
    meta.slot_mapping[0] = -1
    qkv = torch.randn(4, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.view(4, heads, head_dim), k.view(4, kv_heads, head_dim)
    v = v.view(4, kv_heads, head_dim)
    angles = torch.randn(4, rotary_dim)
    cos, sin = angles.cos().chunk(2, -1)[0], angles.sin().chunk(2, -1)[0]  # strided views
    backend = triton_backend.TritonAttentionBackend(splits)
    from polymodal.llm_core.attention.spec import Mask

    spec = spec_for(q, cache, 0.3, window, mask and Mask[mask], softcap)
    ref_cache = cache.clone()
    ref_q, ref_k = triton_ops.rotary_embedding(q.clone(), k.clone(), cos, sin)
    backend.store_kv(ref_k, v, ref_cache, meta.slot_mapping)
    want = backend.paged_attention(ref_q, ref_cache, meta, spec)
    before = qkv.clone()
    for _ in range(2):
        out = backend.rope_decode(q, k, v, (cos, sin), cache, meta, spec)
        assert torch.equal(cache, ref_cache)
        assert torch.equal(out[1:], want[1:])  # row 0 (padding) attends to a stale slot
        assert torch.equal(qkv, before)  # the inputs are not rotated in place


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(80, 2, 2), (32, 4, 2)])
def test_varlen_attention(causal, head_dim, heads, kv_heads):
    bounds = [0, 15, 31, 31, 48, 49]  # lens 15, 16, 0 (empty), 17, 1
    total = bounds[-1]
    q = torch.randn(total, heads, head_dim)
    k, v = torch.randn(total, kv_heads, head_dim), torch.randn(total, kv_heads, head_dim)
    cu = torch.tensor(bounds, dtype=torch.int32)
    out = triton_backend.TritonAttentionBackend().varlen_attention(q, k, v, cu, 17, 0.1, causal)
    ref = REF.varlen_attention(q, k, v, cu, 17, 0.1, causal)
    assert_close(out, ref, torch.float32)


def test_varlen_attention_bf16_strided_views():
    qkv = torch.randn(20, 3, 2, 80).to(torch.bfloat16)  # packed like a vision tower's qkv
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    out = triton_backend.TritonAttentionBackend().varlen_attention(q, k, v, cu, 13, 0.11)
    assert_close(out, REF.varlen_attention(q, k, v, cu, 13, 0.11), torch.bfloat16)


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("qwen2", {}),
        ("qwen3", {}),
        (
            "phi3",
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.5,
                }
            },
        ),
        ("mistral", {}),
    ],
)  # qkv bias, q/k norm, partial rotary, sliding window (8, passed by 7 + 5 tokens)
def test_decoder_decode_with_rope_in_attention_matches_separate_kernels(
    arch, overrides, tmp_path_factory
):
    """The Triton backend's decode with rotary and KV store inside the attention kernel (as
    CUDA runs it; forced on here) gives the greedy tokens and logits of the separate path."""
    from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits, tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, arch, **overrides)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    runs = []
    for fused in (False, True):
        engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=16,
                        attention_backend="triton", skip_tokenizer_init=True)  # fmt: skip
        calls = []
        backend = engine.runner.model.model.layers[0].self_attn.attn.backend
        assert isinstance(backend, TritonAttentionBackend)
        rope_decode = backend.rope_decode

        def traced(*args, calls=calls, rope_decode=rope_decode, **kwargs):
            calls.append(1)
            return rope_decode(*args, **kwargs)

        backend.fuses_rope_decode = lambda q, kv_cache, fused=fused: fused
        backend.rope_decode = traced
        seen = record_logits(engine)
        rid = engine.add_request([5, 17, 42, 99, 3, 8, 21], params)
        runs.append((engine.run_until_done()[rid].outputs[0].token_ids, seen, calls))
    if overrides:
        assert engine.model_config.rotary_dim < engine.model_config.head_dim
    (tokens, seen, calls), (fused_tokens, fused_seen, fused_calls) = runs
    layers = len(engine.runner.model.model.layers)
    assert not calls and len(fused_calls) == 4 * layers  # every decode step, every layer
    assert fused_tokens == tokens and len(fused_seen) == len(seen) == 5
    for got, ref in zip(fused_seen, seen):
        assert_close(got, ref, torch.float32)
