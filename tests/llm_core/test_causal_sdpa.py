"""The SDPA route of a long causal prefill chunk (`causal_sdpa.py`, `sdpa_prefill`): fresh and
after cached context, against the paged Triton kernel in fp32 on CPU (TRITON_INTERPRET=1; CPU
SDPA runs torch's flash op, the LSE-returning op the route calls). The threshold is lowered so
tiny chunks route; the steps that must not route still get the kernel's answer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from polymodal.llm_core.attention import (
    TorchAttentionBackend,
    causal_sdpa,
    sdpa_pack,
    triton_backend,
    triton_store,
)
from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.attention.sdpa_shapes import SdpaShapes
from polymodal.llm_core.attention.spec import Mask
from polymodal.llm_core.layers import triton_ops
from tests.helpers import spec_for
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_triton_kernels import make_batch

PAGE = 16
MIN_CHUNK = 16  # SDPA_MIN_CAUSAL in these tests


@pytest.fixture(autouse=True)
def _small_threshold(monkeypatch):
    monkeypatch.setattr(causal_sdpa, "SDPA_MIN_CAUSAL", MIN_CHUNK)


def step(q_lens, seq_lens, heads, kv_heads, head_dim):
    """A prefill step whose new k / v are stored the way `AttentionLayer` stores them; returns
    (q, k, v, cache, meta) with the cache holding everything but this step's keys."""
    q, cache, meta = make_batch(q_lens, seq_lens, heads, kv_heads, head_dim, PAGE)
    meta.query_lens_cpu, meta.seq_lens_cpu = list(q_lens), list(seq_lens)
    slots = []
    for s, (n, total) in enumerate(zip(q_lens, seq_lens)):
        pos = torch.arange(total - n, total)
        slots.append(meta.block_tables[s, pos // PAGE].long() * PAGE + pos % PAGE)
    meta.slot_mapping = torch.cat(slots)
    gen = torch.Generator().manual_seed(7)
    k, v = (torch.randn(sum(q_lens), kv_heads, head_dim, generator=gen) for _ in "kv")
    return q, k, v, cache, meta


def layer_output(spec, backend, q, k, v, cache, meta):
    """What a decoder layer gets: store, then `sdpa_prefill` or the paged kernel."""
    out = AttentionLayer(spec, backend)(q, k, v, None, cache, meta)
    return out.view(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,context,chunk",
    [
        (4, 2, 64, 37, 24),  # context ends inside a page
        (4, 4, 128, 48, 20),  # no GQA, context on a page boundary
        (6, 2, 80, 5, 40),  # GQA 3, head dim 80, context shorter than a page
        (8, 1, 64, 70, 17),  # one KV head
        (4, 2, 128, 0, 30),  # fresh prompt
    ],
)
def test_route_matches_the_paged_kernel(heads, kv_heads, head_dim, context, chunk):
    q, k, v, cache, meta = step([chunk], [context + chunk], heads, kv_heads, head_dim)
    spec = spec_for(q, cache, head_dim**-0.5)
    assert causal_sdpa.context_len(q, k, cache, meta, spec) == context
    routed = triton_backend.TritonAttentionBackend(causal_sdpa=True)
    routed_cache = cache.clone()
    out = layer_output(spec, routed, q, k, v, routed_cache, meta)
    kernel_backend = triton_backend.TritonAttentionBackend(causal_sdpa=False)
    kernel = layer_output(spec, kernel_backend, q, k, v, cache, meta)
    assert_close(out, kernel, torch.float32)
    assert torch.equal(routed_cache, cache)  # fresh: stored by the pack launch
    assert_close(out, TorchAttentionBackend().paged_attention(q, cache, meta, spec), torch.float32)
    assert routed.sdpa_prefill(q, k, v, cache, meta, spec) is not None
    # by default only CUDA in 16 bits takes the route
    assert triton_backend.TritonAttentionBackend().sdpa_prefill(q, k, v, cache, meta, spec) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 32, 0], ids=["full", "partial", "no_rotary"])
def test_pack_is_rotary_store_and_copies(rotary_dim, dtype):
    """`rope_store_pack` (a fresh chunk's one launch) == the Triton rotary in place, `store_kv`
    and `_rows`'s padded copies, bit for bit: q / k / v of packed-qkv views, zeros after the
    tokens, the cache (a -1 slot not stored)."""
    n, rows, heads, kv_heads, d = 21, 32, 4, 2, 64
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, heads + 2 * kv_heads, d, generator=gen).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], 1)
    cache = torch.randn(2, 4, PAGE, kv_heads, d, generator=gen).to(dtype)
    slots = torch.randperm(4 * PAGE, generator=gen)[:n]
    slots[5] = -1
    angles = torch.randn(n, rotary_dim // 2, generator=gen)
    rope = (angles.cos(), angles.sin()) if rotary_dim else None
    packed_cache = cache.clone()
    packed = sdpa_pack.rope_store_pack(q, k, v, rope, packed_cache, slots, rows)
    want_q, want_k = q.clone(), k.clone()
    if rope is not None:
        triton_ops.rotary_embedding(want_q, want_k, *rope)
    triton_store.store_kv(want_k, v, cache, slots)
    for got, want in zip(packed, (want_q, want_k, v)):
        assert got.is_contiguous() and got.shape == (rows, *want.shape[1:])
        assert torch.equal(got, causal_sdpa._rows([(0, want)], rows)[0].transpose(0, 1))
    assert torch.equal(packed_cache, cache)
    assert not torch.equal(packed[1][:n], k) or rope is None  # k did turn


@pytest.mark.parametrize(
    "context,chunk",
    [(0, 17), (0, 40), (5, 24), (37, 24), (70, 17), (100, 40), (48, 16)],
)
def test_bucketed_lengths_equal_exact_ones(context, chunk):
    """Padded chunks and a context cut to a bucket (its rest attended in the chunk's own call:
    down(37) = 32 leaves 5, down(5) = 0 leaves all) give the unpadded answer."""
    q, k, v, cache, meta = step([chunk], [context + chunk], 4, 2, 64)
    spec = spec_for(q, cache, 64**-0.5)
    AttentionLayer(spec, TorchAttentionBackend())(q, k, v, None, cache, meta)  # store k / v
    exact = causal_sdpa.attend(q, k, v, cache, meta, spec, context, SdpaShapes("exact"))
    bucketed = causal_sdpa.attend(q, k, v, cache, meta, spec, context, SdpaShapes("first"))
    assert bucketed.shape == exact.shape == q.shape
    assert_close(bucketed, exact, torch.float32)
    assert_close(
        bucketed, TorchAttentionBackend().paged_attention(q, cache, meta, spec), torch.float32
    )


def test_a_new_cudnn_shape_takes_the_kernel_until_seen_twice(monkeypatch):
    """Policy "second" (cuDNN faked: CPU runs flash): the first step of a shape returns None for
    every layer (the layers then run the paged kernel), the next step builds it, for each
    (chunk, context). A sight is a step, not a layer."""
    monkeypatch.setattr(causal_sdpa, "cudnn_key", lambda q, k, v, causal, gqa=False: q.shape)
    routed = triton_backend.TritonAttentionBackend(causal_sdpa=True)
    for context in (0, 37):
        q, k, v, cache, meta = step([24], [context + 24], 4, 2, 64)
        spec = spec_for(q, cache, 64**-0.5)
        AttentionLayer(spec, TorchAttentionBackend())(q, k, v, None, cache, meta)
        for _layer in range(3):
            assert routed.sdpa_prefill(q, k, v, cache, meta, spec) is None
        out = routed.sdpa_prefill(q, k, v, cache, dataclasses.replace(meta), spec)  # next step
        assert_close(
            out, TorchAttentionBackend().paged_attention(q, cache, meta, spec), torch.float32
        )
    with routed.shapes.building(False):  # the warm-up's kernel pass
        assert routed.sdpa_prefill(q, k, v, cache, dataclasses.replace(meta), spec) is None


@pytest.mark.parametrize("context", [0, 37])
def test_the_route_is_decided_once_a_step(monkeypatch, context):
    """A step's layers of one shape share one decision: torch's backend choice, the admission
    and the bucket math run at its first layer only, and no layer pads q / k / v for a shape
    the policy keeps off."""
    calls = {"choice": 0, "key": 0, "admit": 0, "rows": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    key = counted("key", lambda q, k, v, causal, gqa=False: q.shape)
    monkeypatch.setattr(causal_sdpa, "cudnn_key", key)
    monkeypatch.setattr(torch, "_fused_sdp_choice", counted("choice", torch._fused_sdp_choice))
    monkeypatch.setattr(causal_sdpa, "_rows", counted("rows", causal_sdpa._rows))
    routed = triton_backend.TritonAttentionBackend(causal_sdpa=True)
    shapes = routed.shapes
    monkeypatch.setattr(shapes, "admit", counted("admit", shapes.admit))
    q, k, v, cache, meta = step([24], [context + 24], 4, 2, 64)
    spec = spec_for(q, cache, 64**-0.5)
    AttentionLayer(spec, TorchAttentionBackend())(q, k, v, None, cache, meta)
    layers = 4
    for _ in range(layers):  # first sight: kept off, nothing padded
        assert routed.sdpa_prefill(q, k, v, cache, meta, spec) is None
    # one plan: the chunk's own call and, after context (down(37) = 32), the context call
    plan_calls = 1 if context == 0 else 2
    assert calls == {"choice": 0 if context == 0 else 2, "key": plan_calls,
                     "admit": 1, "rows": 0}  # fmt: skip
    meta = dataclasses.replace(meta)  # the next step: built
    for _ in range(layers):
        assert routed.sdpa_prefill(q, k, v, cache, meta, spec) is not None
    assert calls["admit"] == 2 and calls["key"] == 2 * plan_calls
    assert calls["choice"] == (0 if context == 0 else 4)  # F.sdpa's own choice is in C++
    assert calls["rows"] == layers * (3 if context == 0 else 4)  # q, k, v (+ the context's q)


def _two_sequences():
    return step([20, 18], [45, 18], 4, 2, 64), {}


def _short_chunk():
    return step([MIN_CHUNK - 1], [40], 4, 2, 64), {}


def _window():
    return step([20], [45], 4, 2, 64), {"window": 8}


def _softcap():
    return step([20], [45], 4, 2, 64), {"softcap": 5.0}


def _media_ranges():
    q, k, v, cache, meta = step([20], [45], 4, 2, 64)
    lows = torch.tensor([25] * 6 + [0] * 14, dtype=torch.int32)
    highs = torch.tensor([31] * 6 + [0] * 14, dtype=torch.int32)
    meta.media_key_ranges = (lows, highs)
    meta.media_key_ranges_cpu = (lows.tolist(), highs.tolist())
    return (q, k, v, cache, meta), {}


@pytest.mark.parametrize(
    "case",
    [_two_sequences, _short_chunk, _window, _softcap, _media_ranges],
    ids=lambda f: f.__name__,
)
def test_steps_that_do_not_route_get_the_kernel(case):
    (q, k, v, cache, meta), spec_kwargs = case()
    spec = spec_for(q, cache, 64**-0.5, **spec_kwargs)
    routed = triton_backend.TritonAttentionBackend(causal_sdpa=True)
    assert causal_sdpa.context_len(q, k, cache, meta, spec) is None
    out = layer_output(spec, routed, q, k, v, cache.clone(), meta)
    kernel_backend = triton_backend.TritonAttentionBackend(causal_sdpa=False)
    kernel = layer_output(spec, kernel_backend, q, k, v, cache, meta)
    assert torch.equal(out, kernel)


def test_other_caches_and_masks_do_not_route():
    q, k, v, cache, meta = step([20], [45], 4, 2, 64)
    spec = spec_for(q, cache, 0.1)
    assert causal_sdpa.context_len(q, k, cache.half(), meta, spec) is None  # cache dtype != q's
    assert causal_sdpa.context_len(q, None, cache, meta, spec) is None  # no new keys
    chunked = spec_for(q, cache, 0.1, window=16, mask=Mask.CHUNKED)
    assert causal_sdpa.context_len(q, k, cache, meta, chunked) is None
    q36, k36, _, cache36, meta36 = step([20], [45], 4, 2, 36)  # head dim not 8-aligned
    spec36 = spec_for(q36, cache36, 0.1)
    assert causal_sdpa.context_len(q36, k36, cache36, meta36, spec36) is None
    fresh36 = step([20], [20], 4, 2, 36)  # fresh: F.sdpa pads any head dim
    assert causal_sdpa.context_len(fresh36[0], fresh36[1], fresh36[3], fresh36[4], spec36) == 0


def test_gather_context_reads_the_pages_in_order():
    _, _, _, cache, meta = step([20], [53], 4, 2, 32)
    k, v = causal_sdpa.gather_context(cache, meta.block_tables[0], 37)
    pos = torch.arange(37)
    blocks = meta.block_tables[0, pos // PAGE].long()
    assert torch.equal(k, cache[0, blocks, pos % PAGE])
    assert torch.equal(v, cache[1, blocks, pos % PAGE])


def test_merge_partials_weighs_by_lse():
    """Strided partials (as the fused ops return them), LSEs far apart (no NaN, no overflow)."""
    gen = torch.Generator().manual_seed(3)
    tokens, heads, d = 37, 3, 80
    a = torch.randn(heads, tokens, d, generator=gen).transpose(0, 1)  # [tokens, heads, d] view
    b = torch.randn(tokens, heads, d, generator=gen)
    lse_a = torch.randn(tokens, heads, generator=gen).t() * 3  # [heads, tokens] view
    lse_b = torch.randn(heads, tokens, generator=gen) * 3
    lse_a[0, :4] = torch.tensor([300.0, -300.0, 0.0, 88.0])
    out = causal_sdpa.merge_partials(a, lse_a, b, lse_b)
    share_a = torch.sigmoid(lse_a - lse_b).t()[..., None]  # [tokens, heads, 1]
    assert_close(out, share_a * a + (1 - share_a) * b, torch.float32)


@pytest.mark.parametrize("triton_rotary", [False, True], ids=["torch_rotary", "triton_rotary"])
def test_engine_chunks_through_the_route(tmp_path_factory, monkeypatch, triton_rotary):
    """A prompt in three chunks (fresh, then two after cached context) through the whole model:
    the same greedy tokens and logits as the paged kernel, and the route was taken. With the
    rotary as its Triton kernel (as on CUDA), the fresh chunk is rotated, stored and padded by
    `fresh_prefill`'s one launch."""
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.layers.rotary import RotaryEmbedding
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits, record_sdpa_contexts, tiny_checkpoint

    if triton_rotary:
        monkeypatch.setattr(RotaryEmbedding, "runs_fused", staticmethod(lambda q: True))
    packs = []
    pack = causal_sdpa.rope_store_pack
    monkeypatch.setattr(causal_sdpa, "rope_store_pack", lambda *a: packs.append(1) or pack(*a))

    path = tiny_checkpoint(tmp_path_factory, "qwen2")
    prompt = [(7 * i + 3) % 400 + 20 for i in range(90)]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    runs = {}
    for on in (True, False):
        engine = Engine(
            str(path), dtype="float32", device="cpu", attention_backend="triton",
            max_num_batched_tokens=32, num_kv_blocks=64,
        )  # fmt: skip
        contexts = record_sdpa_contexts(engine, on)
        seen = record_logits(engine)
        rid = engine.add_request(prompt, params)
        runs[on] = (engine.run_until_done()[rid].outputs[0].token_ids, seen, contexts)
    (tokens, logits, contexts), (ref_tokens, ref_logits, ref_contexts) = runs[True], runs[False]
    assert sorted(set(contexts)) == [0, 32, 64] and not ref_contexts  # fresh, after 32, after 64
    assert bool(packs) == triton_rotary  # the fresh chunk's one launch, a layer
    assert tokens == ref_tokens
    for got, ref in zip(logits, ref_logits, strict=True):
        assert_close(got, ref, torch.float32)
