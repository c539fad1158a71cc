"""The MLA decode kernel on CUDA at DeepSeek-V3's sizes (128 heads, rank 512, rope 64, bf16),
against the torch absorbed reference in fp32; no host sync (CUDA-graph capture and replay)."""

import pytest
import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.mla import mla_decode_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HEADS, RANK, ROPE, PAGE = 128, 512, 64, 16


def _case(seq_lens, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages = [-(-n // PAGE) for n in seq_lens]
    num_blocks = sum(pages) + 1
    cache = torch.randn(num_blocks, PAGE, 1, RANK + ROPE, device="cuda", generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device="cuda")
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used : used + n]
        used += n
    q = torch.randn(len(seq_lens), HEADS, RANK + ROPE, device="cuda", generator=gen)
    seq_t = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return q.to(torch.bfloat16), cache.to(torch.bfloat16), tables, seq_t


@pytest.mark.parametrize("seq_lens", [[1], [4096], [17, 300, 1, 2048], [513] * 64])
def test_mla_decode_matches_the_reference(seq_lens):
    from polymodal.llm_core.attention.triton_mla import mla_decode

    q, cache, tables, seq_t = _case(seq_lens)
    scale = 192**-0.5
    out = mla_decode(q, cache, tables, seq_t, RANK, scale)
    meta = AttentionMetadata(seq_t, seq_t, tables, seq_t.long(), 1, max(seq_lens), True,
                             seq_lens_cpu=seq_lens)  # fmt: skip
    ref = mla_decode_reference(q.float(), cache.float(), meta, RANK, scale)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_mla_decode_captures_in_a_cuda_graph():
    from polymodal.llm_core.attention.triton_mla import mla_decode

    q, cache, tables, seq_t = _case([100, 900])
    mla_decode(q, cache, tables, seq_t, RANK, 0.07)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode(q, cache, tables, seq_t, RANK, 0.07)
    seq_t.copy_(torch.tensor([3, 800], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, mla_decode(q, cache, tables, seq_t, RANK, 0.07))
