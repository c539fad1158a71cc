"""Mixed steps (decode rows first, then prompt chunks): the Triton backend attends the decode
rows with the decode kernel and the chunks with the prefill kernel or the SDPA route
(`AttentionMetadata.decode_split`); the result equals the reference and the unsplit kernel,
on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from polymodal.llm_core.attention import TorchAttentionBackend, causal_sdpa, triton_backend
from tests.helpers import spec_for
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_causal_sdpa import layer_output, step
from tests.llm_core.test_triton_kernels import make_batch

REF = TorchAttentionBackend()


def _with_lists(q_lens, seq_lens, **kwargs):
    q, cache, meta = make_batch(q_lens, seq_lens, **kwargs)
    meta.query_lens_cpu, meta.seq_lens_cpu = list(q_lens), list(seq_lens)
    return q, cache, meta


def test_split_takes_the_leading_decode_rows():
    q, cache, meta = _with_lists([1, 1, 1, 20, 1, 9], [30, 7, 50, 45, 12, 9])
    head, tail = meta.decode_split()
    assert meta.decode_split()[0] is head  # made once a step
    assert head.is_decode and head.num_seqs == 3 and head.seq_lens_cpu == [30, 7, 50]
    assert torch.equal(head.block_tables, meta.block_tables[:3])
    assert tail.num_seqs == 3 and tail.query_lens_cpu == [20, 1, 9]
    assert tail.query_start_loc.tolist() == [3, 23, 24, 33]  # rows keep their place
    assert tail.max_query_len == 20 and not tail.is_decode


@pytest.mark.parametrize(
    "q_lens,lists",
    [
        ([1, 1, 1], True),  # a decode step
        ([20, 1, 1], True),  # no decode row first
        ([1, 20], False),  # no host lists: a captured graph's layout
    ],
)
def test_no_split(q_lens, lists):
    q, cache, meta = make_batch(q_lens, [40] * len(q_lens))
    if lists:
        meta.query_lens_cpu, meta.seq_lens_cpu = list(q_lens), [40] * len(q_lens)
    assert meta.decode_split() is None


def test_no_split_with_media_ranges():
    q, cache, meta = _with_lists([1, 20], [30, 45])
    zeros = torch.zeros(21, dtype=torch.int32)
    meta.media_key_ranges = (zeros, zeros)
    assert meta.decode_split() is None


@pytest.mark.parametrize(
    "spec_kwargs,heads,kv_heads",
    [({}, 4, 2), ({}, 6, 1), ({"window": 8}, 4, 2), ({"softcap": 5.0}, 4, 4)],
    ids=["gqa2", "gqa6", "window", "softcap"],
)
def test_mixed_step_equals_the_reference_and_the_unsplit_kernel(spec_kwargs, heads, kv_heads):
    q_lens, seq_lens = [1, 1, 1, 20, 1, 9], [30, 7, 50, 45, 12, 9]
    q, cache, meta = _with_lists(q_lens, seq_lens, heads=heads, kv_heads=kv_heads)
    spec = spec_for(q, cache, 32**-0.5, **spec_kwargs)
    backend = triton_backend.TritonAttentionBackend(causal_sdpa=False)
    split = backend.paged_attention(q, cache, meta, spec)
    assert meta.decode_split() is not None
    unsplit_meta = dataclasses.replace(meta, query_lens_cpu=None, seq_lens_cpu=None)
    unsplit = backend.paged_attention(q, cache, unsplit_meta, spec)
    assert unsplit_meta.decode_split() is None
    assert_close(split, REF.paged_attention(q, cache, meta, spec), torch.float32)
    assert_close(split, unsplit, torch.float32)


@pytest.mark.parametrize("context", [0, 37])
def test_decode_rows_then_one_long_chunk_take_the_sdpa_route(monkeypatch, context):
    monkeypatch.setattr(causal_sdpa, "SDPA_MIN_CAUSAL", 16)
    q, k, v, cache, meta = step([1, 1, 24], [30, 9, context + 24], 4, 2, 64)
    spec = spec_for(q, cache, 64**-0.5)
    routed = triton_backend.TritonAttentionBackend(causal_sdpa=True)
    assert routed.sdpa_prefill(q, k, v, cache.clone(), meta, spec) is not None
    out = layer_output(spec, routed, q, k, v, cache.clone(), meta)
    kernel = layer_output(spec, triton_backend.TritonAttentionBackend(causal_sdpa=False),
                          q, k, v, cache.clone(), meta)  # fmt: skip
    assert_close(out, kernel, torch.float32)
    stored = cache.clone()
    layer_output(spec, REF, q, k, v, stored, meta)  # the reference stores too
    assert_close(out, REF.paged_attention(q, stored, meta, spec), torch.float32)
