"""CUDA-graph capture and replay of decode steps, one graph per batch-size bucket.

A decode step (one new token per sequence, no media slots) has the same kernels every time;
only the contents of a few small tensors change. Each bucket's graph is captured once over
static buffers; a step copies its inputs into the first `n` rows, pads the rest (slot -1:
nothing stored; seq_len 1: a harmless read of block 0), replays, and reads `hidden[:n]`.
Graphs are captured largest first and share one memory pool (as nano-vllm does).
"""

from __future__ import annotations

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata

BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


class DecodeGraphs:
    """Captured decode graphs for batch sizes up to `max_batch` (eager above it)."""

    def __init__(self, model, kv_caches, max_batch: int, max_blocks: int, uses_mrope: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        device = kv_caches[0].device
        n = self.buckets[-1]
        hidden = model.config.hidden_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros((3, n) if uses_mrope else n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden, dtype=model.lm_head.weight.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Pinned host mirrors of the static inputs, filled from lists and copied
        # asynchronously. Two sets, alternating: with one step in flight, the set being
        # filled was last read by the step before it, whose tokens were already waited for.
        self.host_sets = [
            {
                name: torch.zeros_like(getattr(self, name), device="cpu").pin_memory()
                for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")
            }
            for _ in range(2)
        ]
        self.runs = 0
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.kv_caches[0].shape[2],
            is_decode=True,
        )

    def _forward(self, bs: int) -> None:
        positions = self.positions[..., :bs]
        embeds = self.model.embed(self.input_ids[:bs])
        self.hidden[:bs] = self.model(positions, embeds, self.kv_caches, self._meta(bs))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one shared memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):
                self._forward(bs)  # warm-up: Triton compiles, allocator settles
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self._forward(bs)
                self.pool = self.pool or graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def can_run(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and num_blocks <= self.block_tables.shape[1]

    def run(self, hb, patch=None) -> torch.Tensor:
        """Replay the smallest bucket that fits `hb` (a decode `HostBatch`); returns hidden
        `[num_seqs, hidden]`. Inputs go host -> pinned buffer -> one async copy each; `patch`
        (rows, ids on the device) fills ids still in flight from the previous step."""
        n = len(hb.ids)
        bs = next(b for b in self.buckets if b >= n)
        h = self.host_sets[self.runs % 2]
        self.runs += 1
        h["input_ids"].numpy()[:n] = hb.ids
        h["positions"].numpy()[..., :n] = hb.rows if self.positions.dim() == 2 else hb.rows[0]
        h["slot_mapping"].numpy()[:n] = hb.slots
        h["slot_mapping"].numpy()[n:bs] = -1  # padding rows store nothing
        h["seq_lens"].numpy()[:n] = hb.seq_lens
        h["seq_lens"].numpy()[n:bs] = 1  # and read one (finite) cache row
        tables = h["block_tables"].numpy()
        for row, table in enumerate(hb.tables):
            tables[row, : len(table)] = table
        for name in ("input_ids", "slot_mapping", "seq_lens", "block_tables"):
            getattr(self, name)[:bs].copy_(h[name][:bs], non_blocking=True)
        self.positions[..., :bs].copy_(h["positions"][..., :bs], non_blocking=True)
        if patch is not None:  # ids sampled by the step before, never read back to the host
            self.input_ids[patch[0]] = patch[1]
        self.graphs[bs].replay()
        return self.hidden[:n]
