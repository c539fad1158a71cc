"""Split-KV paged prefill on CUDA at Qwen2.5-VL-7B's decoder heads (28 / 4, d 128, bf16): the
split form `split_count` picks for a short chunk after a long cache equals the one-pass
kernel, eager and replayed from a CUDA graph whose table is wider than the sequence (as a
prefill graph's: the active splits are decided on the device)."""

import pytest
import torch

from polymodal.llm_core.attention import prefill_splits, triton_prefill
from polymodal.llm_core.attention.spec import AttentionSpec

pytestmark = pytest.mark.gpu
HEADS, KV_HEADS, D, PAGE = 28, 4, 128, 16


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _inputs(q_lens, seq_lens, width):
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = sum(-(-s // PAGE) for s in seq_lens) + 1
    cache = torch.randn(2, blocks, PAGE, KV_HEADS, D, device="cuda", generator=gen)
    perm = torch.randperm(blocks - 1, device="cuda", generator=gen).to(torch.int32)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32, device="cuda")
    used = 0
    for i, s in enumerate(seq_lens):
        n = -(-s // PAGE)
        table[i, :n] = perm[used : used + n]
        used += n
    q = torch.randn(sum(q_lens), HEADS, D, device="cuda", generator=gen).bfloat16()
    starts = torch.tensor([0, *q_lens], device="cuda").cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return q, cache.bfloat16(), starts, lens, table


SPEC = AttentionSpec(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=D, scale=D**-0.5)


@pytest.mark.parametrize("q_lens,seq_lens", [([16], [38322]), ([16, 3, 40], [2741, 900, 5000])])
def test_split_equals_one_pass(q_lens, seq_lens):
    q, cache, starts, lens, table = _inputs(q_lens, seq_lens, -(-max(seq_lens) // PAGE))
    max_q, max_len = max(q_lens), max(seq_lens)
    splits = prefill_splits.split_count(max_q, HEADS, max_len, q.device)
    assert splits > 1
    args = (q, cache, starts, lens, table, max_q, SPEC)
    one = triton_prefill.paged_prefill(*args, max_seq_len=max_len, splits=1)
    split = triton_prefill.paged_prefill(*args, max_seq_len=max_len, splits=splits)
    torch.testing.assert_close(split.float(), one.float(), atol=2e-2, rtol=2e-2)


def test_split_in_a_graph_with_a_wide_table():
    """One graph serves a long and a short cache: the short one's single active split writes
    the output itself and the merge leaves it."""
    width = 4096  # a prefill graph's table: 64k keys
    q, cache, starts, lens, table = _inputs([16], [38322], width)
    args = (q, cache, starts, lens, table, 16, SPEC)
    splits = prefill_splits.split_count(16, HEADS, width * PAGE, q.device)
    out = triton_prefill.paged_prefill(*args, max_seq_len=width * PAGE, splits=splits)  # warm
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_prefill.paged_prefill(*args, max_seq_len=width * PAGE, splits=splits)
    for keys in (38322, 700, 16):
        lens.fill_(keys)
        graph.replay()
        one = triton_prefill.paged_prefill(*args, max_seq_len=keys, splits=1)
        torch.testing.assert_close(out.float(), one.float(), atol=2e-2, rtol=2e-2)


def test_cross_split_at_mllama_shape():
    """Mllama-11B's cross layers (32 / 8 heads, d 128) for a 30-token prompt over one image's
    6404 encoder rows (the prompt's text after the image sees them all, the text before it
    too, as transformers' mask has it): the split launch `split_count` picks equals one pass."""
    from polymodal.llm_core.attention.spec import Mask

    heads, kv_heads, rows, q_len = 32, 8, 6404, 30
    gen = torch.Generator(device="cuda").manual_seed(1)
    blocks = -(-rows // PAGE)
    cache = torch.randn(2, blocks, PAGE, kv_heads, D, device="cuda", generator=gen).bfloat16()
    table = torch.randperm(blocks, device="cuda", generator=gen).to(torch.int32)[None]
    q = torch.randn(q_len, heads, D, device="cuda", generator=gen).bfloat16()
    starts = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    lens = torch.tensor([rows], dtype=torch.int32, device="cuda")
    lo = torch.zeros(q_len, dtype=torch.int32, device="cuda")
    hi = torch.full((q_len,), rows, dtype=torch.int32, device="cuda")
    hi[-3:] = 1601  # a sub-range too
    spec = AttentionSpec(heads, kv_heads, D, D**-0.5, Mask.CROSS, encoder_rows=rows)
    splits = prefill_splits.split_count(q_len, heads, rows, q.device, heads // kv_heads)
    assert splits > 1
    args = (q, cache, starts, lens, table, q_len, spec, None, (lo, hi), rows)
    one = triton_prefill.paged_prefill(*args, splits=1)
    split = triton_prefill.paged_prefill(*args)  # the backend's choice: `split_count`'s
    torch.testing.assert_close(split.float(), one.float(), atol=2e-2, rtol=2e-2)
