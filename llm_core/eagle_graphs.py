"""CUDA graphs of an EAGLE head's one-token draft steps (eagle.py): per batch-size bucket, the
head's embedding of the draft ids, its layer over the paged cache, its greedy pick and its
next features, captured over static buffers as the decode graphs are (cuda_graph.py).

A step copies its draft ids and features (on the device: the step before's outputs) into the
first `n` rows of the static inputs and its positions, slots, lengths and block tables from
the host in one upload; padding rows store nothing (slot -1) and read one cache row. Without
capture (the CPU) the same padded step runs eagerly: that is what the CPU tests check.
"""

from __future__ import annotations

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.cuda_graph import BUCKETS, StepInputs, capture_buckets, unpack_tables


class HeadGraphs:
    """Captured one-token steps of `head` for up to `max_batch` sequences."""

    def __init__(self, head, kv_caches: list, max_batch: int, max_blocks: int, block_size: int):
        self.head, self.kv_caches = head, kv_caches
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_blocks, self.block_size = max_blocks, block_size
        n = self.buckets[-1]
        device = next(c for c in kv_caches if c is not None).device
        fields = [
            ("positions", torch.int64, (n,)),
            ("slot_mapping", torch.int64, (n,)),
            ("seq_lens", torch.int32, (n,)),
            ("table_width", torch.int32, (1,)),
            ("packed_tables", torch.int32, (n * max_blocks,)),  # last: uploaded as filled
        ]
        self.inputs = StepInputs(fields, device)
        hidden = head.config.hidden_size
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.feature = torch.zeros(n, hidden, dtype=head.config.dtype, device=device)
        self.tokens = torch.zeros(n, dtype=torch.int64, device=device)
        self.feature_out = torch.zeros_like(self.feature)
        self.tables = torch.zeros(n, 1, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.runs = 0

    def _forward(self, bs: int) -> None:
        v = self.inputs.device_views
        unpack_tables(v["packed_tables"], v["table_width"], self.tables, bs)
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=v["seq_lens"][:bs],
            block_tables=self.tables[:bs, 0],
            slot_mapping=v["slot_mapping"][:bs],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            is_decode=True,
        )
        head = self.head
        out, feature = head(v["positions"][:bs], head.embed(self.ids[:bs]), self.feature[:bs],
                            self.kv_caches, meta)  # fmt: skip
        self.tokens[:bs] = head.greedy(out)
        self.feature_out[:bs] = feature

    @torch.inference_mode()
    def capture(self) -> None:
        self.graphs, self.pool, _ = capture_buckets(self.buckets, self._forward, self.pool)

    def can_run(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and num_blocks <= self.max_blocks

    def run(self, positions: list[int], slots: list[int], tables: list[list[int]],
            tokens: torch.Tensor, feature: torch.Tensor):  # fmt: skip
        """One step of `len(positions)` sequences (`tokens`, `feature`: their inputs on the
        device); returns copies of the next draft ids and features."""
        n = len(positions)
        bs = next(b for b in self.buckets if b >= n)
        mirror = self.runs % 2  # the host mirror the step before did not fill
        h = self.inputs.host_views[mirror]
        self.runs += 1
        h["positions"][:n] = positions
        h["slot_mapping"][:n] = slots
        h["slot_mapping"][n:bs] = -1  # padding rows store nothing ...
        h["seq_lens"][:n] = [p + 1 for p in positions]
        h["seq_lens"][n:bs] = 1  # ... and read one cache row
        width = max(map(len, tables))
        packed = h["packed_tables"]
        for row, table in enumerate(tables):
            packed[row * width : row * width + len(table)] = table
        h["table_width"][0] = width
        self.inputs.upload(mirror, rows=bs * width)
        self.ids[:n].copy_(tokens)
        self.feature[:n].copy_(feature)
        if self.graphs:
            self.graphs[bs].replay()
        else:  # not captured (the CPU): the same padded step, eagerly
            self._forward(bs)
        return self.tokens[:n].clone(), self.feature_out[:n].clone()
