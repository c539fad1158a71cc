"""Split-KV paged prefill (`prefill_splits.split_count`, the `SPLITS` form of the kernel and
its merge): a causal chunk's key range cut over several programs, merged exactly by log-sum-exp,
equals the one-pass kernel and the torch reference; a context too short for more than one
split is written by the first split directly (no partials). CPU, TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.attention import TorchAttentionBackend, prefill_splits, triton_prefill
from polymodal.llm_core.attention.spec import Mask
from polymodal.llm_core.counters import arrival_counters
from tests.helpers import spec_for
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_triton_kernels import make_batch

REF = TorchAttentionBackend()
CASES = {  # name: (q_lens, seq_lens): few queries after cached prefixes of several tiles
    "one_long": ([3], [150]),
    "several": ([5, 1, 16, 2], [101, 40, 16, 70]),
    "short_context": ([4], [20]),  # 2 tiles of 16: one split per tile
    "two_q_blocks": ([20], [90]),  # 20 queries: two 16-row tiles
}


def _prefill(q, cache, meta, spec, splits):
    return triton_prefill.paged_prefill(
        q, cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len,
        spec, max_seq_len=meta.max_seq_len, splits=splits,
    )  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("head_dim", [32, 80])
@pytest.mark.parametrize("heads", [(6, 2), (3, 3), (32, 1)])  # packed by kv head (group 3 of
# 16-row tiles: 5 queries x 3 heads a program), no group, a group wider than a tile
def test_split_equals_one_pass_and_reference(case, splits, head_dim, heads):
    if heads != (6, 2) and (splits == 3 or head_dim == 80):
        pytest.skip("the unpacked forms: one split count and head dim suffice")
    q, cache, meta = make_batch(*CASES[case], heads=heads[0], kv_heads=heads[1],
                                head_dim=head_dim, page=8)  # fmt: skip
    meta.is_decode = False
    spec = spec_for(q, cache, 0.2)
    one = _prefill(q, cache, meta, spec, 1)
    split = _prefill(q, cache, meta, spec, splits)
    assert_close(split, REF.paged_attention(q, cache, meta, spec), torch.float32)
    assert_close(split, one, torch.float32)


def test_split_fp8_cache_scales_values():
    q, cache, meta = make_batch([3, 2], [70, 45], heads=4, kv_heads=2, head_dim=32, page=16)
    meta.is_decode = False
    cache8 = cache.to(torch.float8_e4m3fn)
    spec = spec_for(q, cache, 0.2)
    args = (q, cache8, meta.query_start_loc, meta.seq_lens, meta.block_tables, 3, spec, (0.5, 2.0))
    one = triton_prefill.paged_prefill(*args, max_seq_len=70, splits=1)
    split = triton_prefill.paged_prefill(*args, max_seq_len=70, splits=4)
    assert_close(split, one, torch.float32)


def test_split_count_rule(monkeypatch):
    """About two programs an SM (an H200's 132 here), only for few queries over a cache long
    enough to give every split its minimum of key tiles."""
    from polymodal.llm_core.layers import gemv

    cuda = torch.device("cuda")
    monkeypatch.setattr(gemv.torch.cuda, "get_device_properties", _FakeProps)
    count = prefill_splits.split_count
    assert count(16, 28, 38000, cuda) == 264 // 28  # one 64-row tile a head: 28 programs
    assert count(16, 4, 38000, cuda) == prefill_splits.SPLIT_MAX
    assert count(16, 28, 1000, cuda) == 1  # < 2 x 8 tiles of 64 keys: one pass
    assert count(prefill_splits.SPLIT_MAX_QUERIES + 1, 28, 38000, cuda) == 1
    assert count(64, 28, 38000, cuda) == 264 // 28
    # packed (group 7 into 64-row tiles: 9 queries a program): 16 queries, 2 x 4 programs
    assert prefill_splits.packed_rows(64, 7) == 9
    assert count(16, 28, 38000, cuda, group=7) == prefill_splits.SPLIT_MAX
    assert count(64, 28, 38000, cuda, group=7) == 264 // (8 * 4)
    assert prefill_splits.packed_rows(64, 1) == 64  # no group: one head's queries
    assert prefill_splits.packed_rows(16, 32) == 16  # a group wider than the tile
    # interpreted (CPU): one pass unless a test asks for splits
    assert count(3, 2, 150, torch.device("cpu")) == 1


class _FakeProps:
    multi_processor_count = 132

    def __init__(self, device):
        pass


def test_other_masks_keep_one_pass():
    """Windows, media ranges and bidirectional masks never split (the merge assumes causal)."""
    q, cache, meta = make_batch([3], [150], heads=4, kv_heads=2, head_dim=32, page=8)
    spec = spec_for(q, cache, 0.2, 20, Mask.SLIDING)
    out = _prefill(q, cache, meta, spec, 4)  # the override is ignored for a window
    assert_close(out, REF.paged_attention(q, cache, meta, spec), torch.float32)


def test_active_splits_decided_on_the_device(monkeypatch):
    """As in a prefill graph (host splits from the table's width, 8 here): at least 2 tiles a
    split leaves 10 tiles 5 active splits, 3 tiles 2, and 2 tiles one (written directly)."""
    monkeypatch.setattr(prefill_splits, "SPLIT_MIN_TILES_INTERPRETED", 2)
    q, cache, meta = make_batch([3, 2, 4], [150, 30, 40], heads=4, kv_heads=2, head_dim=32, page=8)
    meta.is_decode = False
    spec = spec_for(q, cache, 0.2)
    split = _prefill(q, cache, meta, spec, 8)
    assert_close(split, REF.paged_attention(q, cache, meta, spec), torch.float32)
    assert_close(split, _prefill(q, cache, meta, spec, 1), torch.float32)
    # the last split of each tile merged and set its arrival counter back to zero: a second
    # launch (as a graph replay) merges the same way
    assert not arrival_counters(q.device, 1).any()
    assert torch.equal(_prefill(q, cache, meta, spec, 8), split)
