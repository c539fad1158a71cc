"""Cross attention (`Mask.CROSS`) in the Triton prefill and decode kernels against the torch
reference and against plain attention over each query's rows, on CPU under TRITON_INTERPRET=1:
each query sees the encoder rows `[lo, hi)` of its range in its sequence's cross table; empty
ranges (text-only requests) give zeros."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    triton_backend,
    triton_prefill,
)
from polymodal.llm_core.attention.spec import AttentionSpec, Mask
from polymodal.llm_core.counters import arrival_counters
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)

REF = TorchAttentionBackend()
PAGE = 16


def cross_batch(q_lens, rows, ranges, heads=4, kv_heads=2, head_dim=32, dtype=torch.float32):
    """A cross cache holding `rows[s]` encoder rows of sequence s in shuffled blocks, queries
    `q_lens[s]`, per-query ranges `ranges` (a list of (lo, hi), one per query)."""
    gen = torch.Generator().manual_seed(sum(rows) + sum(q_lens) + heads)
    pages = [-(-r // PAGE) for r in rows]
    num_blocks = sum(pages) + 3
    cache = torch.randn(2, num_blocks, PAGE, kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(rows), max(max(pages), 1) + 1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used : used + n]
        used += n
    lo, hi = (list(x) for x in zip(*ranges))
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(rows, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        max_query_len=max(q_lens),
        max_seq_len=max(rows),
        is_decode=all(n == 1 for n in q_lens),
        cross_ranges=torch.tensor([lo, hi, [1] * len(lo)], dtype=torch.int32),
    )
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, Mask.CROSS, encoder_rows=99)
    return q, cache, meta, spec


def dense_reference(q, cache, meta, spec):
    """Plain softmax attention of each query over its rows, gathered by hand."""
    out = torch.zeros_like(q)
    starts = meta.query_start_loc.tolist()
    group = spec.num_heads // spec.num_kv_heads
    for s, num_rows in enumerate(meta.seq_lens.tolist()):
        blocks = meta.block_tables[s, : -(-num_rows // PAGE)].long()
        k = cache[0, blocks].flatten(0, 1)[:num_rows].repeat_interleave(group, 1)
        v = cache[1, blocks].flatten(0, 1)[:num_rows].repeat_interleave(group, 1)
        for t in range(starts[s], starts[s + 1]):
            lo, hi = meta.cross_ranges[0, t].item(), meta.cross_ranges[1, t].item()
            if hi <= lo:
                continue
            scores = torch.einsum("hd,rhd->hr", q[t].float(), k[lo:hi].float()) * spec.scale
            out[t] = torch.einsum("hr,rhd->hd", scores.softmax(-1), v[lo:hi].float()).to(q.dtype)
    return out


CASES = {  # q_lens, rows per sequence, per-query ranges
    # Whisper-like: every query sees all rows of its sequence
    "all_rows": ([3, 20], [37, 50], [(0, 37)] * 3 + [(0, 50)] * 20),
    # Mllama-like: text before the image sees all rows, later text a sub-range; a text-only
    # sequence (no rows) in the same batch
    "sub_ranges_and_text_only": (
        [6, 4, 5],
        [70, 0, 33],
        [(0, 70), (0, 70), (0, 40), (0, 40), (40, 70), (17, 18)]
        + [(0, 0)] * 4
        + [(0, 33), (16, 33), (32, 33), (0, 1), (5, 21)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_cross_prefill(case, heads, kv_heads):
    q, cache, meta, spec = cross_batch(*CASES[case], heads=heads, kv_heads=kv_heads)
    meta.is_decode = False
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec)
    ref = REF.paged_attention(q, cache, meta, spec)
    assert_close(ref, dense_reference(q, cache, meta, spec), torch.float32)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])  # packed by kv head, and not
def test_cross_prefill_split(case, splits, heads, kv_heads):
    """A cross launch's rows cut over several programs a query tile (few queries over many
    encoder rows: Mllama's prompt over its image), merged by log-sum-exp, equals one pass and
    the reference; queries without rows (a text-only sequence) stay zeros through the merge."""
    q, cache, meta, spec = cross_batch(*CASES[case], heads=heads, kv_heads=kv_heads)
    args = (q, cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            meta.max_query_len, spec, None, (meta.cross_ranges[0], meta.cross_ranges[1]),
            meta.max_seq_len)  # fmt: skip
    split = triton_prefill.paged_prefill(*args, splits=splits)
    assert_close(split, triton_prefill.paged_prefill(*args, splits=1), torch.float32)
    assert_close(split, dense_reference(q, cache, meta, spec), torch.float32)
    assert not split.isnan().any()
    if case == "sub_ranges_and_text_only":
        assert torch.equal(split[6:10], torch.zeros_like(split[6:10]))
    assert not arrival_counters(q.device, 1).any()  # every merging split reset its counter


def test_cross_prefill_picks_splits(monkeypatch):
    """The backend hands a cross prefill its cross group's most encoder rows, so a launch of
    few queries over a long range splits as a causal one does."""
    calls = []
    real = triton_prefill._launch
    monkeypatch.setattr(triton_prefill, "split_count", lambda *a, **k: 4)
    monkeypatch.setattr(triton_prefill, "_launch", lambda *a: calls.append(a[-1]) or real(*a))
    q, cache, meta, spec = cross_batch(*CASES["all_rows"])
    meta.is_decode = False
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec)
    assert calls == [4]
    assert_close(out, dense_reference(q, cache, meta, spec), torch.float32)


@pytest.mark.parametrize("splits", [1, 3])
def test_cross_decode(splits):
    ranges = [(0, 70), (0, 0), (16, 33), (5, 6)]  # one sequence without rows
    q, cache, meta, spec = cross_batch([1, 1, 1, 1], [70, 0, 33, 40], ranges)
    assert meta.is_decode
    backend = triton_backend.TritonAttentionBackend(decode_splits=splits)
    out = backend.paged_attention(q, cache, meta, spec)
    ref = REF.paged_attention(q, cache, meta, spec)
    assert_close(ref, dense_reference(q, cache, meta, spec), torch.float32)
    assert_close(out, ref, torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # no rows: zeros, not NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_half(dtype):
    case = CASES["sub_ranges_and_text_only"]
    q, cache, meta, spec = cross_batch(*case, dtype=dtype)
    meta.is_decode = False
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec)
    assert_close(out, REF.paged_attention(q, cache, meta, spec), dtype)


def test_store_then_attend_over_written_rows():
    """Rows stored through the cross slots (as a request's first step does) are what the
    kernels then read."""
    q, cache, meta, spec = cross_batch([2], [21], [(0, 21), (3, 9)])
    cache.zero_()
    k = torch.randn(21, 2, 32)
    v = torch.randn(21, 2, 32)
    blocks = meta.block_tables[0, :2].long()
    slots = torch.cat([blocks[0] * PAGE + torch.arange(16), blocks[1] * PAGE + torch.arange(5)])
    backend = triton_backend.TritonAttentionBackend()
    backend.store_kv(k, v, cache, slots)
    meta.is_decode = False
    out = backend.paged_attention(q, cache, meta, spec)
    assert_close(out, dense_reference(q, cache, meta, spec), torch.float32)


def _backend_outputs(path, prompts, backend, **kwargs):
    from polymodal import LLM, SamplingParams
    from tests.helpers import record_logits_by_request

    llm = LLM(str(path), dtype="float32", device="cpu", attention_backend=backend, **kwargs)
    seen = record_logits_by_request(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, torch.stack(seen[o.request_id])) for o in outs]


def _assert_same(path, prompts, **kwargs):
    ref = _backend_outputs(path, prompts, "torch", **kwargs)
    for (tokens, logits), (ref_tokens, ref_logits) in zip(
        _backend_outputs(path, prompts, "triton", **kwargs), ref
    ):
        assert tokens == ref_tokens
        assert_close(logits, ref_logits, torch.float32)


@pytest.mark.parametrize("splits", [1, 3])
def test_mllama_through_the_triton_backend(tmp_path_factory, monkeypatch, splits):
    """The whole model on the Triton kernels (cross prefill in 16-token chunks with per-token
    ranges, cross decode, a text-only request alongside) equals the torch reference; with
    `splits` 3 every prefill launch that may split does (as a GPU's few-query cross launches:
    on the CPU `split_count` keeps one pass)."""
    if splits > 1:
        monkeypatch.setattr(triton_prefill, "split_count", lambda *a, **k: splits)
    from tests.helpers import tiny_checkpoint
    from tests.sdk.vl_reference import messages, random_image

    prompts = [
        {"messages": messages([random_image(64, 48, 0)])},
        {"messages": messages([])},
        {"prompt": "Look <|image|> at <|image|> this",
         "multi_modal_data": {"image": [random_image(28, 28, 1), random_image(90, 40, 2)]}},
    ]  # fmt: skip
    path = tiny_checkpoint(tmp_path_factory, "mllama")
    _assert_same(path, prompts, num_kv_blocks=256, max_num_batched_tokens=16)


def test_whisper_through_the_triton_backend(tmp_path_factory):
    """Whisper's encoder (varlen kernel), self and cross attention on the Triton kernels."""
    import numpy as np

    from tests.helpers import tiny_checkpoint

    t = np.arange(32000) / 16000
    audio = (np.sin(2 * np.pi * 440 * t) * 0.5).astype(np.float32)
    prompt = {"prompt": "", "multi_modal_data": {"audio": (audio, 16000)},
              "mm_processor_kwargs": {"language": "en"}}  # fmt: skip
    path = tiny_checkpoint(tmp_path_factory, "whisper")
    _assert_same(path, [prompt, prompt], num_kv_blocks=128)
