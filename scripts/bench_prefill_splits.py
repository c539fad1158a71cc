"""Split-KV paged prefill on CUDA: a causal chunk of few queries after a long cached prefix,
one-pass kernel (splits 1) vs the split forms (`split_count`'s counts; one query head a
program, and a kv head's 7 query heads packed into a program's rows), at Qwen2.5-VL-7B's decoder
heads (28 / 4, d 128, bf16, page 16). CUDA-graph replays (`polymodal.bench.timing.graph_ms`).

    python scripts/bench_prefill_splits.py

Rows: (queries, cached + new keys): a repeated 1080p image's text tail (16, 2.7k), a repeated
64-frame video's (16, 38k), a chat turn (64, 8k), a speculative verify step (8, 8k), a short
prompt (512, 1k: never split). The
last row is a short chat turn (16 queries over 300 keys) sized as a prefill graph sizes it (a
64k-key table): the host picks splits, the device finds one with work, so its "split" column
is the cost the split form adds to short contexts (idle programs and the merge launch).
"""

from __future__ import annotations

from unittest.mock import patch

import torch

from polymodal.bench.timing import graph_ms
from polymodal.llm_core.attention import prefill_splits, triton_prefill
from polymodal.llm_core.attention.spec import AttentionSpec

HEADS, KV_HEADS, D, PAGE = 28, 4, 128, 16
CASES = [
    (16, 2741, 0),
    (16, 38322, 0),
    (64, 8192, 0),
    (8, 8192, 0),
    (512, 1024, 0),
    (16, 300, 65536),
]


def case(queries: int, keys: int, table_keys: int):
    """A one-sequence launch; `table_keys` > keys: the host sizes it as a graph of that width."""
    pages = -(-keys // PAGE)
    cache = torch.randn(2, pages + 1, PAGE, KV_HEADS, D, device="cuda", dtype=torch.bfloat16)
    width = max(keys, table_keys)
    table = torch.zeros(1, -(-width // PAGE), device="cuda", dtype=torch.int32)
    table[0, :pages] = torch.randperm(pages, device="cuda", dtype=torch.int32)
    q = torch.randn(queries, HEADS, D, device="cuda", dtype=torch.bfloat16)
    starts = torch.tensor([0, queries], device="cuda", dtype=torch.int32)
    lens = torch.tensor([keys], device="cuda", dtype=torch.int32)
    spec = AttentionSpec(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=D, scale=D**-0.5)

    def run(splits):
        return triton_prefill.paged_prefill(
            q, cache, starts, lens, table, queries, spec, max_seq_len=width, splits=splits
        )

    return run, width


def main() -> None:
    """Columns: one pass; the split form with one head's queries a program (as before the
    packing); the split form packed by kv head (the default) at SPLIT_MIN_TILES 8 / 4 / 2."""
    cuda = torch.device("cuda")
    group = HEADS // KV_HEADS
    print("| queries | keys | table keys | one pass us | unpacked (splits) | packed, min tiles"
          " 8 / 4 / 2 (splits) | max diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for queries, keys, table_keys in CASES:
        run, width = case(queries, keys, table_keys)
        one = graph_ms(lambda run=run: run(1)) * 1e3
        ref = run(1).float()
        unpacked = prefill_splits.split_count(queries, HEADS, width, cuda)
        with patch.object(triton_prefill, "packed_rows", lambda block_m, group: block_m):
            old = graph_ms(lambda run=run, n=unpacked: run(n)) * 1e3
        packed, diff = [], 0.0
        splits = prefill_splits.split_count(queries, HEADS, width, cuda, group)
        for tiles in (8, 4, 2):
            with patch.object(prefill_splits, "SPLIT_MIN_TILES", tiles):
                diff = max(diff, (run(splits).float() - ref).abs().max().item())
                packed.append(graph_ms(lambda run=run, n=splits: run(n)) * 1e3)
        cells = " / ".join(f"{t:.1f}" for t in packed)
        print(
            f"| {queries} | {keys} | {width} | {one:.1f} | {old:.1f} ({unpacked}) | {cells} "
            f"({splits}) | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
