"""Mixed steps on CUDA (compiled kernels, bf16): decode rows by the decode kernel, the chunks by
the prefill kernel or the SDPA route (`AttentionMetadata.decode_split`), against the unsplit
kernel and the fp32 reference, at the 7B's head layout (28 / 4 heads, d 128)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted here"
    ),
]


def _step(q_lens, seq_lens):
    from tests.llm_core.test_triton_kernels import make_batch

    q, cache, meta = make_batch(q_lens, seq_lens, 28, 4, 128, 16)
    meta.query_lens_cpu, meta.seq_lens_cpu = list(q_lens), list(seq_lens)
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta) if f.init}
    moved = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
    return q.cuda().bfloat16(), cache.cuda().bfloat16(), type(meta)(**moved)


@pytest.mark.parametrize("chunk", [300, 1500])
def test_split_matches_unsplit_and_reference(chunk):
    from polymodal.llm_core.attention import TorchAttentionBackend, triton_backend
    from tests.helpers import spec_for

    q_lens = [1] * 40 + [chunk, 1, 17]
    seq_lens = [700 + 13 * i for i in range(40)] + [chunk + 900, 64, 17]
    q, cache, meta = _step(q_lens, seq_lens)
    spec = spec_for(q, cache, 128**-0.5)
    backend = triton_backend.TritonAttentionBackend(causal_sdpa=False)
    split = backend.paged_attention(q, cache, meta, spec)
    assert meta.decode_split() is not None
    plain = dataclasses.replace(meta, query_lens_cpu=None, seq_lens_cpu=None)
    unsplit = backend.paged_attention(q, cache, plain, spec)
    ref = TorchAttentionBackend().paged_attention(q.float(), cache.float(), meta, spec)
    torch.testing.assert_close(split.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(split.float(), unsplit.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("context", [0, 500])
def test_decode_rows_then_a_long_chunk_route_through_sdpa(context):
    from polymodal.llm_core.attention import TorchAttentionBackend, triton_backend
    from polymodal.llm_core.attention.layer import AttentionLayer
    from tests.helpers import spec_for
    from tests.llm_core.test_causal_sdpa import step

    q_lens, seq_lens = [1] * 8 + [2048], [600 + 7 * i for i in range(8)] + [context + 2048]
    q, k, v, cache, meta = step(q_lens, seq_lens, 28, 4, 128)
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta) if f.init}
    meta = type(meta)(**{n: x.cuda() if isinstance(x, torch.Tensor) else x
                         for n, x in fields.items()})  # fmt: skip
    q, k, v, cache = (x.cuda().bfloat16() for x in (q, k, v, cache))
    spec = spec_for(q, cache, 128**-0.5)
    # the route on for CUDA bf16; cuDNN from a shape's first sight
    routed = triton_backend.TritonAttentionBackend(sdpa_shapes="first")
    out = AttentionLayer(spec, routed)(q, k, v, None, cache.clone(), meta).view(q.shape)
    assert routed.sdpa_prefill(q, k, v, cache.clone(), meta, spec) is not None
    stored = cache.clone()
    AttentionLayer(spec, TorchAttentionBackend())(q, k, v, None, stored, meta)
    ref = TorchAttentionBackend().paged_attention(q.float(), stored.float(), meta, spec)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
