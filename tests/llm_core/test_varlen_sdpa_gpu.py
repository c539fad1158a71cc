"""The Triton backend's SDPA routes on CUDA. Encoder attention: equal-length segments (one image,
same-sized tiles) of >= `SDPA_MIN_SEGMENT` rows run as one batched SDPA, others on the Triton
kernel; both routes against fp32 SDPA per segment, at tower head dims (SigLIP 72, Qwen-VL 80,
Llama 4 88). Causal prefill (`sdpa_prefill`): a long chunk, fresh or after cached context,
against the paged kernel, and a long chunked prompt's logits and greedy tokens."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted here"
    ),
]


def _backend():
    from polymodal.llm_core.attention import triton_backend

    return triton_backend


def reference(q, k, v, lens, scale, causal):
    out, start = torch.empty_like(q, dtype=torch.float32), 0
    for n in lens:
        qs, ks, vs = (x[start : start + n].float().transpose(0, 1) for x in (q, k, v))
        att = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[start : start + n] = att.transpose(0, 1)
        start += n
    return out


@pytest.mark.parametrize(
    "lens,head_dim,causal,routed",
    [
        ([4096], 72, False, True),  # Gemma 3's SigLIP: one 896 px image
        ([577] * 5, 64, False, True),  # LLaVA-NeXT's CLIP: base + 4 crops
        ([1024, 1024], 80, False, True),
        ([256] * 13, 80, False, True),  # two SDPA calls: 8 and 5 segments
        ([4784] * 3, 88, False, True),
        ([300, 300], 80, True, True),
        ([64] * 40, 80, False, False),  # Qwen2.5-VL windows: the kernel
        ([1024, 500], 80, False, False),  # unequal segments: the kernel
    ],
)
def test_segments_route_and_match(lens, head_dim, causal, routed):
    backend = _backend()
    heads, total = 16, sum(lens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(total, 3, heads, head_dim, device="cuda", generator=gen).bfloat16()
    q, k, v = qkv.unbind(1)  # strided views, as a fused qkv projection gives
    cu = torch.tensor([0, *lens], device="cuda").cumsum(0).int()
    scale = head_dim**-0.5
    assert bool(backend.sdpa_segments(q, k, v, cu, max(lens))) == routed
    first = backend.TritonAttentionBackend(sdpa_shapes="first")  # cuDNN at first sight
    out = first.varlen_attention(q, k, v, cu, max(lens), scale, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(
        out.float(), reference(q, k, v, lens, scale, causal), atol=2e-2, rtol=2e-2
    )
    kernel = _backend().triton_prefill.varlen_attention(q, k, v, cu, max(lens), scale, causal)
    torch.testing.assert_close(out.float(), kernel.float(), atol=2e-2, rtol=2e-2)


def test_segment_groups_under_the_second_sight_rule():
    """Eleven equal segments run as SDPAs of 8 and 3: on the kernel at first sight, on cuDNN
    (two plans, of batch 8 and 3) from the second; the same values either way."""
    backend = _backend().TritonAttentionBackend(sdpa_shapes="second")
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = torch.randn(3, 11 * 512, 16, 80, device="cuda", generator=gen).bfloat16().unbind(0)
    cu = torch.arange(12, device="cuda", dtype=torch.int32) * 512
    want = reference(q, k, v, [512] * 11, 0.1, False)
    for _ in range(2):
        out = backend.varlen_attention(q, k, v, cu, 512, 0.1)
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    if torch.backends.cudnn.is_available() and backend.shapes.built():
        batches = sorted(key[1][0][0] for key in backend.shapes.built())
        assert batches == [3, 8]


def test_graph_capture_of_the_sdpa_route():
    """Vision towers replay CUDA graphs: the SDPA route captures and replays."""
    backend = _backend().TritonAttentionBackend(sdpa_shapes="first")
    q, k, v = (torch.randn(2048, 16, 72, device="cuda").bfloat16() for _ in "qkv")
    cu = torch.tensor([0, 1024, 2048], device="cuda").int()
    eager = backend.varlen_attention(q, k, v, cu, 1024, 0.1)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        backend.varlen_attention(q, k, v, cu, 1024, 0.1)  # warm
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.varlen_attention(q, k, v, cu, 1024, 0.1)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out, backend.varlen_attention(q, k, v, cu, 1024, 0.1))
    assert not torch.equal(out, eager)


def chunk_step(backend, heads, kv_heads, head_dim, context, length):
    """One sequence's chunk of `length` tokens after `context` cached ones, bf16 on CUDA: its
    q / k / v (views of one fused projection, k / v stored), the cache, metadata and spec."""
    from polymodal.llm_core.attention import AttentionMetadata
    from polymodal.llm_core.attention.spec import AttentionSpec

    page, total = 16, context + length
    blocks = -(-total // page)
    gen = torch.Generator(device="cuda").manual_seed(context + length)
    cache = torch.randn(2, blocks + 2, page, kv_heads, head_dim, device="cuda", generator=gen)
    cache = cache.bfloat16()  # the context's keys: random, as if stored by earlier steps
    table = torch.randperm(blocks + 2, device="cuda", generator=gen)[:blocks].int()[None]
    slots = (table[0].long()[:, None] * page + torch.arange(page, device="cuda")).flatten()
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, length], device="cuda").int(),
        seq_lens=torch.tensor([total], device="cuda").int(),
        block_tables=table,
        slot_mapping=slots[context:total],
        max_query_len=length,
        max_seq_len=total,
        is_decode=False,
        query_lens_cpu=[length],
        seq_lens_cpu=[total],
    )
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5)
    # q / k / v as the decoder gives them: views of one fused projection
    qkv = torch.randn(length, heads + 2 * kv_heads, head_dim, device="cuda", generator=gen)
    q, k, v = qkv.bfloat16().split([heads, kv_heads, kv_heads], 1)
    backend.store_kv(k, v, cache, meta.slot_mapping)
    return q, k, v, cache, meta, spec


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,context,length,routed",
    [
        (28, 4, 128, 0, 6000, True),  # a fresh long prompt, GQA 7: SDPA over the step's k / v
        (16, 8, 256, 0, 4096, True),  # Gemma 3's global layers' head dim
        (28, 4, 128, 0, 1000, False),  # short: the paged kernel
        (28, 4, 128, 3072, 2000, True),  # a chunk after cached context: gathered + merged
        (28, 4, 128, 4099, 3000, True),  # context ending inside a page
        (16, 8, 256, 2048, 1536, True),
        (32, 32, 80, 1500, 2500, True),  # Phi-2's head dim, no GQA
        (28, 4, 128, 5000, 1000, False),  # a short chunk after long context: the kernel
    ],
)
def test_sdpa_prefill_matches_the_paged_kernel(heads, kv_heads, head_dim, context, length, routed):
    """One causal chunk alone in its step, fresh or after cached context: `sdpa_prefill` (SDPA)
    where it applies, equal to the paged kernel reading the stored cache; None where it does not
    (two prompts' chunks in the step)."""
    backend = _backend().TritonAttentionBackend(sdpa_shapes="first")
    q, k, v, cache, meta, spec = chunk_step(backend, heads, kv_heads, head_dim, context, length)
    fast = backend.sdpa_prefill(q, k, v, cache, meta, spec)
    assert (fast is not None) == routed
    paged = backend.paged_attention(q, cache, meta, spec)
    if routed:
        assert fast.shape == q.shape and fast.dtype == q.dtype
        torch.testing.assert_close(fast.float(), paged.float(), atol=2e-2, rtol=2e-2)
    # two prompts' chunks in one step: not routed (a step whose first rows decode is split
    # first, `AttentionMetadata.decode_split`, and its one chunk may be: test_mixed_step_split)
    two = dataclasses.replace(meta, query_lens_cpu=[2, length - 2])
    assert backend.sdpa_prefill(q, k, v, cache, two, spec) is None


@pytest.mark.parametrize("context,length", [(0, 6000), (0, 2725)])
def test_fresh_prefill_is_rotary_store_and_sdpa(context, length):
    """A fresh chunk's `fresh_prefill` (rotary, KV store and SDPA's padded copies in one
    launch) at Qwen2.5-VL-7B's heads, bf16: its cache bit for bit the Triton rotary + `store_kv`
    one, its output equal to `sdpa_prefill` on the rotated, stored q / k / v."""
    backend = _backend().TritonAttentionBackend(sdpa_shapes="first")
    q, k, v, cache, meta, spec = chunk_step(backend, 28, 4, 128, context, length)
    cache.zero_()  # chunk_step stored the unrotated k
    angles = torch.randn(length, 64, device="cuda")
    rope = (angles.cos(), angles.sin())
    fused_cache = cache.clone()
    fused = backend.fresh_prefill(q, k, v, rope, fused_cache, meta, spec)
    from polymodal.llm_core.layers import triton_ops

    q, k = triton_ops.rotary_embedding(q, k, *rope)
    backend.store_kv(k, v, cache, meta.slot_mapping)
    assert torch.equal(fused_cache, cache)
    assert torch.equal(fused, backend.sdpa_prefill(q, k, v, cache, meta, spec))


def test_long_chunked_prompt_keeps_its_greedy_tokens(tmp_path_factory):
    """A 6000-token prompt in 2048-token chunks (fresh, then after 2048 and 4096 cached tokens),
    bf16: SDPA route vs the paged kernel alone give the same logits (bf16 noise) and greedy
    tokens (up to a genuine near tie)."""
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits, record_sdpa_contexts, tiny_checkpoint

    path = tiny_checkpoint(
        tmp_path_factory, "qwen2", max_position_embeddings=8192, hidden_size=256
    )  # head dim 64
    prompt = [(7 * i + 3) % 400 + 20 for i in range(6000)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    runs = {}
    for on in (True, False):
        engine = Engine(
            str(path), dtype="bfloat16", device="cuda", max_num_batched_tokens=2048,
            num_kv_blocks=640, sdpa_shapes="first",
        )  # fmt: skip
        contexts = record_sdpa_contexts(engine, on)
        seen = record_logits(engine)
        rid = engine.add_request(prompt, params)
        runs[on] = (engine.run_until_done()[rid].outputs[0].token_ids, seen, sorted(set(contexts)))
    (tokens, logits, contexts), (ref_tokens, ref_logits, ref_contexts) = runs[True], runs[False]
    assert contexts == [0, 2048, 4096] and ref_contexts == []
    for step, (got, ref) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(got, ref, atol=5e-2, rtol=0, msg=f"step {step}")
        if tokens[step] != ref_tokens[step]:
            top2 = ref[-1].float().topk(2).values
            assert top2[0] - top2[1] < 0.1, f"step {step}: greedy token changed without a tie"
            break


@pytest.mark.parametrize(
    "context,length",
    [(0, 2725), (0, 1025), (1100, 1500), (900, 3000), (16384, 5538), (20000, 4096)],
)
def test_bucketed_lengths_equal_exact_ones(context, length):
    """`sdpa_shapes`: a chunk padded to its bucket, its context cut to one (the rest leading the
    chunk's own causal call) give the exact shapes' answer on cuDNN, bf16 (28 / 4 heads, d 128);
    the paged kernel agrees."""
    from polymodal.llm_core.attention import causal_sdpa
    from polymodal.llm_core.attention.sdpa_shapes import SdpaShapes, bucket_down, bucket_up

    backend = _backend().TritonAttentionBackend(sdpa_shapes="first")
    q, k, v, cache, meta, spec = chunk_step(backend, 28, 4, 128, context, length)
    exact = causal_sdpa.attend(q, k, v, cache, meta, spec, context, SdpaShapes("exact"))
    bucketed = causal_sdpa.attend(q, k, v, cache, meta, spec, context, backend.shapes)
    assert bucket_up(length) != length or bucket_down(context) != context or context == 0
    assert bucketed.shape == q.shape and not bucketed.isnan().any()
    torch.testing.assert_close(bucketed.float(), exact.float(), atol=2e-2, rtol=2e-2)
    paged = backend.paged_attention(q, cache, meta, spec)
    torch.testing.assert_close(bucketed.float(), paged.float(), atol=2e-2, rtol=2e-2)


def test_a_new_tower_shape_runs_the_kernel_until_seen_twice():
    """Policy "second" (the default): an image size's first full-attention call runs the Triton
    kernel (no cuDNN plan built), its second builds one; both match the reference."""
    backend = _backend()
    policy = backend.TritonAttentionBackend()
    q, k, v = (torch.randn(4356, 16, 80, device="cuda").bfloat16() for _ in "qkv")
    cu = torch.tensor([0, 4356], device="cuda").int()
    ref = reference(q, k, v, [4356], 0.1, False)
    for sight in (1, 2):
        out = policy.varlen_attention(q, k, v, cu, 4356, 0.1)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        assert len(policy.shapes.built()) == sight - 1  # cuDNN picked by torch on an H200


@pytest.mark.parametrize("context,length", [(0, 2725), (1100, 1500)])
def test_a_steps_layers_share_one_route_decision(monkeypatch, context, length):
    """Policy "second": every layer of a shape's first step runs the paged kernel where torch
    picks cuDNN (none of them pads or asks torch for a backend again), every layer of the next
    step runs SDPA with the first layer's plan; the answer is the paged kernel's."""
    from polymodal.llm_core.attention import causal_sdpa

    choices = []
    original = torch._fused_sdp_choice
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **kw: choices.append(1) or
                        original(*a, **kw))  # fmt: skip
    backend = _backend().TritonAttentionBackend(sdpa_shapes="second")
    q, k, v, cache, meta, spec = chunk_step(backend, 28, 4, 128, context, length)
    first = [backend.sdpa_prefill(q, k, v, cache, meta, spec) for _ in range(4)]
    per_plan = len(choices)
    assert len({out is None for out in first}) == 1  # one decision for the step's layers
    assert 1 <= per_plan <= 4 and len(meta.sdpa_plans) == 1
    meta = dataclasses.replace(meta)  # the next step
    outs = [backend.sdpa_prefill(q, k, v, cache, meta, spec) for _ in range(4)]
    assert len(choices) == 2 * per_plan  # once a step, not once a layer
    plan = next(iter(meta.sdpa_plans.values()))
    assert isinstance(plan, causal_sdpa.SdpaPlan) and plan.context == context
    paged = backend.paged_attention(q, cache, meta, spec)
    for out in outs:
        assert out is not None
        torch.testing.assert_close(out.float(), paged.float(), atol=2e-2, rtol=2e-2)
