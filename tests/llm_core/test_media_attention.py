"""Media key ranges (bidirectional image runs, Gemma 3): the torch reference against a dense
definition, and the Triton prefill kernel against the reference (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.attention import TorchAttentionBackend, triton_backend
from polymodal.llm_core.attention.spec import Mask
from tests.helpers import spec_for
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_triton_kernels import make_batch

REF = TorchAttentionBackend()

# (query lens, context lens, per sequence the runs [a, b) of absolute positions)
CASES = {
    "one_run": ([20], [20], [[(3, 11)]]),
    "two_runs_chunk_after_prefix": ([30, 9], [45, 9], [[(17, 25), (27, 41)], [(2, 7)]]),
    "run_across_tiles": ([40], [52], [[(14, 50)]]),
}


def _ranges(q_lens, seq_lens, runs):
    lows, highs = [], []
    for q_len, seq_len, seq_runs in zip(q_lens, seq_lens, runs):
        for pos in range(seq_len - q_len, seq_len):
            run = next(((a, b) for a, b in seq_runs if a <= pos < b), (0, 0))
            lows.append(run[0])
            highs.append(run[1])
    return lows, highs


def _dense(q, cache, meta, spec, runs):
    """Definition: per sequence, mask = window AND (causal OR same run), fp32 softmax."""
    out, start, page = [], 0, cache.shape[2]
    heads, kv_heads = q.shape[1], cache.shape[3]
    for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        blocks = meta.block_tables[s, : -(-seq_len // page)].long()
        k = cache[0, blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(heads // kv_heads, 1)
        v = cache[1, blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(heads // kv_heads, 1)
        qs = q[start : start + q_len].float()
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        run_of = torch.full((seq_len,), -1)
        for r, (a, b) in enumerate(runs[s]):
            run_of[a:b] = r
        same = (run_of[q_pos] == run_of[k_pos]) & (run_of[q_pos] >= 0)
        mask = (k_pos <= q_pos) | same
        if spec.mask == Mask.SLIDING:
            mask &= k_pos > q_pos - spec.window
        scores = torch.einsum("qhd,khd->hqk", qs, k) * spec.scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", probs, v))
        start += q_len
    return torch.cat(out)


@pytest.mark.parametrize("window", [None, 6, 100])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_and_triton_match_definition(case, window):
    q_lens, seq_lens, runs = CASES[case]
    q, cache, meta = make_batch(q_lens, seq_lens)
    meta.query_lens_cpu, meta.seq_lens_cpu = q_lens, seq_lens
    lows, highs = _ranges(q_lens, seq_lens, runs)
    meta.media_key_ranges_cpu = (lows, highs)
    meta.media_key_ranges = (
        torch.tensor(lows, dtype=torch.int32),
        torch.tensor(highs, dtype=torch.int32),
    )
    spec = spec_for(q, cache, 32**-0.5, window)
    expected = _dense(q, cache, meta, spec, runs)
    ref = REF.paged_attention(q, cache, meta, spec)
    assert_close(ref, expected, torch.float32)
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, spec)
    assert_close(out, expected, torch.float32)
    # the runs matter: without them the answer differs
    meta.media_key_ranges = meta.media_key_ranges_cpu = None
    assert not torch.allclose(REF.paged_attention(q, cache, meta, spec), expected, atol=1e-3)
