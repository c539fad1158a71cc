"""CUDA-graph capture and replay of decoder steps: decode steps by batch-size bucket
(`DecodeGraphs`), small prefill / mixed steps by token-count bucket (`PrefillGraphs`).

A decode step (one new token per sequence, no media slots) has the same kernels every time;
only the contents of a few small tensors change. Each bucket's graph is captured once over
static buffers; a step copies its inputs into the first `n` rows, pads the rest (slot -1:
nothing stored; seq_len 1: a harmless read of block 0), replays, and reads `hidden[:n]`.
Graphs are captured largest first and share one memory pool (as nano-vllm does).

Captures use `capture_error_mode="thread_local"`: media staging threads may touch the device
while the engine thread captures (an encoder graph mid-run, say), which must not void it.
"""

from __future__ import annotations

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata

BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
# 16-token steps up to 512 (an image prompt's prefill pads by < 16 tokens), coarser above.
PREFILL_BUCKETS = [*range(16, 513, 16), 640, 768, 896, 1024]
PREFILL_MAX_SEQS = 8  # sequences per captured prefill step (padding ones have no queries)


def capture_buckets(buckets: list[int], forward) -> tuple[dict, object]:
    """Capture `forward(n)` for each bucket, largest first, into one shared memory pool."""
    graphs, pool = {}, None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for n in reversed(buckets):
            forward(n)  # warm-up: Triton compiles, allocator settles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph, pool=pool, stream=stream, capture_error_mode="thread_local"
            ):
                forward(n)
            pool = pool or graph.pool()
            graphs[n] = graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graphs, pool


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
        self.graphs, self.pool = capture_buckets(self.buckets, self._forward)

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


class PrefillGraphs:
    """Captured decoder stacks for small non-decode steps: a short prompt's prefill (the TTFT
    path) or a mixed step, up to `max_tokens` tokens of at most PREFILL_MAX_SEQS sequences.

    Eager, such a step is bound by the host launching hundreds of kernels that each run for
    microseconds; a replay launches them at once. The step's embeddings (media slots merged)
    are computed eagerly and copied in. Padding tokens store nothing (slot -1); padding
    sequences get no queries, so the prefill kernel's programs for them exit at once (its grid
    is sized by the bucket). Logits and sampling stay outside, on the returned rows.
    """

    def __init__(self, model, kv_caches, max_tokens: int, max_blocks: int, uses_mrope: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = [b for b in PREFILL_BUCKETS if b < max_tokens] + [max_tokens]
        device = kv_caches[0].device
        n, s = self.buckets[-1], PREFILL_MAX_SEQS
        hidden, dtype = model.config.hidden_size, model.lm_head.weight.dtype
        self.embeds = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros((3, n) if uses_mrope else n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(s, max_blocks, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.runs = 0

    def _forward(self, n: int) -> None:
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:n],
            max_query_len=n,  # sizes the prefill grid for any split of n tokens
            max_seq_len=self.block_tables.shape[1] * self.kv_caches[0].shape[2],
        )
        positions = self.positions[..., :n]
        self.hidden[:n] = self.model(positions, self.embeds[:n], self.kv_caches, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (no queries during capture: nothing is stored or read)."""
        self.graphs, self.pool = capture_buckets(self.buckets, self._forward)

    def can_run(self, num_tokens: int, num_seqs: int, num_blocks: int) -> bool:
        return (
            num_tokens <= self.buckets[-1]
            and num_seqs <= PREFILL_MAX_SEQS
            and num_blocks <= self.block_tables.shape[1]
        )

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """Replay the smallest bucket that holds this step; returns hidden `[num_tokens, hidden]`
        (a view of a static buffer: valid until the next replay)."""
        n, s = embeds.shape[0], meta.num_seqs
        bucket = next(b for b in self.buckets if b >= n)
        self.runs += 1
        self.embeds[:n].copy_(embeds)
        self.positions[..., :n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bucket].fill_(-1)
        self.query_start_loc[: s + 1].copy_(meta.query_start_loc)
        self.query_start_loc[s + 1 :].fill_(n)  # padding sequences: zero queries
        self.seq_lens[:s].copy_(meta.seq_lens)
        self.seq_lens[s:].zero_()
        self.block_tables[:s, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if self.graphs:
            self.graphs[bucket].replay()
        else:  # not captured (CPU tests of the padding): the same padded forward, eagerly
            self._forward(bucket)
        return self.hidden[:n]
