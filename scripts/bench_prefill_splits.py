"""Split-KV paged prefill on CUDA: a causal chunk of few queries after a long cached prefix,
one-pass kernel (splits 1) vs the split form `split_count` picks, at Qwen2.5-VL-7B's decoder
heads (28 / 4, d 128, bf16, page 16). CUDA-graph replays (`polymodal.bench.timing.graph_ms`).

    python scripts/bench_prefill_splits.py

Rows: (queries, cached + new keys): a repeated 1080p image's text tail (16, 2.7k), a repeated
64-frame video's (16, 38k), a chat turn (64, 8k), a short prompt (512, 1k: never split). The
last row is a short chat turn (16 queries over 300 keys) sized as a prefill graph sizes it (a
64k-key table): the host picks splits, the device finds one with work, so its "split" column
is the cost the split form adds to short contexts (idle programs and the merge launch).
"""

from __future__ import annotations

import torch

from polymodal.bench.timing import graph_ms
from polymodal.llm_core.attention import prefill_splits, triton_prefill
from polymodal.llm_core.attention.spec import AttentionSpec

HEADS, KV_HEADS, D, PAGE = 28, 4, 128, 16
CASES = [(16, 2741, 0), (16, 38322, 0), (64, 8192, 0), (512, 1024, 0), (16, 300, 65536)]


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
    print("| queries | keys | table keys | one pass us | splits | split us | max diff |")
    print("|---|---|---|---|---|---|---|")
    for queries, keys, table_keys in CASES:
        run, width = case(queries, keys, table_keys)
        splits = prefill_splits.split_count(queries, HEADS, width, torch.device("cuda"))
        diff = (run(1).float() - run(splits).float()).abs().max().item()
        one = graph_ms(lambda run=run: run(1)) * 1e3
        split = graph_ms(lambda run=run, n=splits: run(n)) * 1e3
        print(f"| {queries} | {keys} | {width} | {one:.1f} | {splits} | {split:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
