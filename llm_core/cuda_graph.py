"""CUDA-graph capture of decoder steps (`capture_buckets`, shared with `prefill_graphs.py`) and
the decode graphs: decode steps by batch-size bucket (`DecodeGraphs`, their static inputs
`StepInputs`). Small prefill / mixed steps by token-count bucket: `prefill_graphs.py`.

A decode step (one new token per sequence, no media slots) has the same kernels every time;
only the contents of a few small tensors change. Each bucket's graph is captured once over
static buffers; a step copies its inputs into the first `n` rows, pads the rest (slot -1:
nothing stored; seq_len 1: a harmless read of block 0), replays, and reads `hidden[:n]`.
Graphs are captured largest first and share one memory pool (as nano-vllm does).

Cross-attention models replay too: their cross groups' tables, row counts and per-token row
ranges are more inputs (tables share one buffer with the token groups' tables, `[rows, groups,
width]`); a step that writes encoder rows (a request's first) runs eager.

Captures use `capture_error_mode="thread_local"`: media staging threads may touch the device
while the engine thread captures (an encoder graph mid-run, say), which must not void it.

An engine with LoRA captures every bucket twice (`capture(lora)`): with the LoRA kernels in,
and without (the base layers' kernels and fused epilogues, exactly the plain engine's); a step
replays the LoRA set only when a token of it uses an adapter. Both sets share the static
inputs and the one memory pool (only one graph runs at a time), so the second set costs its
graph objects and capture time, not a second set of activations.
"""

from __future__ import annotations

import math
import time

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.aux_states import outputs_aux
from polymodal.llm_core.host_copy import to_device
from polymodal.llm_core.layers import fused_ops

# decode batch sizes with a graph (each set also captures its `max_batch`)
BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


def capture_buckets(buckets: list[int], forward, pool=None) -> tuple[dict, object, tuple]:
    """Capture `forward(n)` for each bucket, largest first, into one shared memory pool
    (`pool`, or a new one); returns the graphs by bucket, the pool and what the capture cost:
    (seconds, device bytes it took: pool growth and the graphs themselves)."""
    start, free = time.perf_counter(), torch.cuda.mem_get_info()[0]
    graphs = {}
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
    return graphs, pool, (time.perf_counter() - start, free - torch.cuda.mem_get_info()[0])


class DecodeGraphs:
    """Captured decode steps for batch sizes up to `max_batch` (eager above it).

    A graph runs the whole step: the ids (each either from the host or sampled by the step
    before, still on the device), embeddings, decoder, LM head and the greedy argmax. The host
    then reads back `tokens` when every row is plain greedy, or samples from `logits`.

    The inputs live in one device buffer (`StepInputs`): a step fills a pinned host mirror and
    copies it over in one transfer.
    """

    def __init__(
        self,
        model,
        kv_caches,
        max_batch: int,
        max_blocks: int,
        uses_mrope: bool,
        num_groups: int = 1,
        num_cross_groups: int = 0,
        max_cross_blocks: int = 0,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        device = cache_device(kv_caches)
        n, g, c = self.buckets[-1], num_groups, num_cross_groups
        width = max(max_blocks, max_cross_blocks)
        fields = [
            ("input_ids", torch.int64, (n,)),
            ("src", torch.int64, (n,)),  # row of `tokens` holding this row's id, or -1
            ("positions", torch.int64, (3, n) if uses_mrope else (n,)),
            ("slot_mapping", torch.int64, (g, n)),  # per KV group
            ("seq_lens", torch.int32, (n,)),
            ("table_width", torch.int32, (1,)),
        ]
        if c:  # cross groups: encoder rows per sequence, per token rows lo, hi and gate
            fields += [("cross_lens", torch.int32, (n,)), ("cross_ranges", torch.int32, (3, n))]
        # last: a step copies only what it fills: rows x groups tables (token groups, then
        # cross groups), `table_width` entries each
        fields.append(("packed_tables", torch.int32, (n * (g + c) * width,)))
        self.inputs = StepInputs(fields, device)
        self.max_blocks = max_blocks
        self.num_groups, self.max_cross_blocks = g, max_cross_blocks
        # The graphs read full-width tables [n, groups, width] (group g: [:, g]), unpacked on
        # the device each step: the upload grows with the batch's longest table, not with
        # max_model_len (128k context: 8192 blocks, 32 KiB a row).
        self.block_tables = torch.zeros(n, g + c, width, dtype=torch.int32, device=device)
        self.tokens = torch.zeros(n, dtype=torch.int64, device=device)  # this step's argmax
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        vocab = model.lm_head.weight.shape[0]
        self.logits = torch.zeros(n, vocab, dtype=torch.float32, device=device)
        # {lora: {bucket: graph}}: captured with the LoRA kernels in (True) or without
        self.graphs: dict[bool, dict[int, torch.cuda.CUDAGraph]] = {}
        self.capture_cost: dict[bool, tuple[float, int]] = {}  # per set: seconds, device bytes
        self.runs = 0
        self.lora_runs = 0  # of which with the LoRA kernels
        self.pool = None
        # per bucket: its hidden states and kept residual streams (aux_states.py); the last
        # step's rows of them (`last_hidden`, `last_aux`: read by an EAGLE head)
        self.outputs: dict[int, tuple] = {}
        self.last_hidden, self.last_aux = None, []

    def _meta(self, bs: int) -> AttentionMetadata:
        v = self.inputs.device_views
        tables, slots = self.block_tables, v["slot_mapping"]
        page = cache_page(self.kv_caches)
        metas = [
            AttentionMetadata(
                query_start_loc=self.query_start_loc[: bs + 1],
                seq_lens=v["seq_lens"][:bs],
                block_tables=tables[:bs, g, : self.max_blocks],
                slot_mapping=slots[g, :bs],
                max_query_len=1,
                max_seq_len=self.max_blocks * page,
                is_decode=True,
            )
            for g in range(self.num_groups)
        ]
        metas += [  # cross groups: nothing stored in a decode step
            AttentionMetadata(
                query_start_loc=self.query_start_loc[: bs + 1],
                seq_lens=v["cross_lens"][:bs],
                block_tables=tables[:bs, g, : self.max_cross_blocks],
                slot_mapping=slots[0, :0],
                max_query_len=1,
                max_seq_len=self.max_cross_blocks * page,
                is_decode=True,
                cross_ranges=v["cross_ranges"][:, :bs],
            )
            for g in range(self.num_groups, tables.shape[1])
        ]
        metas[0].groups = metas if len(metas) > 1 else None
        return metas[0]

    def _forward(self, bs: int) -> None:
        v = self.inputs.device_views
        unpack_tables(v["packed_tables"], v["table_width"], self.block_tables, bs)
        ids = resolve_ids(v["input_ids"][:bs], v["src"][:bs], self.tokens)
        hidden = self.model(v["positions"][..., :bs], self.model.embed(ids), self.kv_caches,
                            self._meta(bs))  # fmt: skip
        self.model.compute_logits(hidden, out=self.logits[:bs], argmax=self.tokens[:bs])
        self.outputs[bs] = (hidden, outputs_aux(self.model))  # static once captured

    @torch.inference_mode()
    def capture(self, lora: bool = False) -> None:
        """Capture every bucket, largest first, into the shared memory pool, as the set `lora`
        (the caller sets the model up to run the LoRA kernels or not)."""
        self.graphs[lora], self.pool, self.capture_cost[lora] = capture_buckets(
            self.buckets, self._forward, self.pool
        )

    def can_run(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and num_blocks <= self.max_blocks

    def run(self, hb, prev_tokens: torch.Tensor | None = None, lora: bool = False):
        """Replay the smallest bucket that fits `hb` (a decode `HostBatch`) from the set `lora`;
        returns (logits `[num_seqs, vocab]` fp32, greedy tokens `[num_seqs]`), views of static
        buffers valid until the next replay. Rows in `hb.pending_rows` take their id from
        `prev_tokens` (the step before's sampled ids, on the device) at `hb.pending_src`."""
        n = len(hb.ids)
        bs = next(b for b in self.buckets if b >= n)
        mirror = self.runs % 2
        h = self.inputs.host_views[mirror]  # numpy views, filled in place
        self.runs += 1
        self.lora_runs += lora
        h["input_ids"][:n] = hb.ids
        h["positions"][..., :n] = hb.rows if h["positions"].ndim == 2 else hb.rows[0]
        for g, group_slots in enumerate(hb.slots):
            h["slot_mapping"][g, :n] = group_slots
        h["slot_mapping"][:, n:bs] = -1  # padding rows store nothing
        h["seq_lens"][:n] = hb.seq_lens
        h["seq_lens"][n:bs] = 1  # and read one (finite) cache row
        h["src"][:bs] = -1
        if hb.pending_rows:
            src = hb.pending_src
            if prev_tokens is not None and prev_tokens.data_ptr() != self.tokens.data_ptr():
                # sampled outside a graph (a prefill step, a sampled row): gather them in
                index = to_device(src, torch.int64, self.tokens.device)
                self.tokens[: len(src)].copy_(prev_tokens[index])
                src = range(len(src))
            h["src"][hb.pending_rows] = list(src)
        # rows x groups tables of the longest one's width; padding rows' tables keep whatever
        # block ids the buffer last held (their one read is of a valid block)
        cross = hb.cross
        all_tables = hb.tables + (cross.tables if cross else [])
        groups = len(all_tables)
        width = max(len(t) for group_tables in all_tables for t in group_tables) or 1
        packed = h["packed_tables"]
        for g, group_tables in enumerate(all_tables):
            for row, table in enumerate(group_tables):
                start = (row * groups + g) * width
                packed[start : start + len(table)] = table
        h["table_width"][0] = width
        if cross is not None:  # padding rows: no encoder rows, nothing seen
            h["cross_lens"][:n] = cross.lens
            h["cross_lens"][n:bs] = 0
            h["cross_ranges"][:, :n] = cross.ranges
            h["cross_ranges"][:, n:bs] = 0
        self.inputs.upload(mirror, rows=bs * groups * width)
        if self.graphs:
            self.graphs[lora][bs].replay()
        else:  # not captured (CPU tests): the same padded step, eagerly
            self._forward(bs)
        hidden, aux = self.outputs[bs]
        self.last_hidden, self.last_aux = hidden[:n], [a[:n] for a in aux]
        return self.logits[:n], self.tokens[:n]


class StepInputs:
    """Named int tensors packed in one device buffer, with two pinned host mirrors: the host
    fills one mirror through its numpy views (`host_views[i]`) and `upload` copies it over in
    one asynchronous transfer.

    Two mirrors, alternating: with one step in flight, the mirror being filled was last read by
    the step before it, whose tokens were already waited for. The last field's leading rows are
    all of it a step needs (packed block tables), so `upload(i, rows)` copies only up to them.
    """

    def __init__(self, fields: list[tuple[str, torch.dtype, tuple]], device: torch.device):
        offsets, size = {}, 0
        for name, dtype, shape in fields:
            offsets[name] = size
            nbytes = dtype.itemsize * math.prod(shape)
            size += -(-nbytes // 8) * 8  # 8-byte aligned views
        pin = torch.device(device).type == "cuda"
        self.device_buffer = torch.zeros(size, dtype=torch.uint8, device=device)
        self.host_buffers = [torch.zeros(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.host_views = [
            {k: v.numpy() for k, v in _views(b, fields, offsets).items()} for b in self.host_buffers
        ]
        self.device_views = _views(self.device_buffer, fields, offsets)
        name, dtype, shape = fields[-1]
        self._last = (offsets[name], dtype.itemsize * math.prod(shape[1:]))

    def upload(self, index: int, rows: int) -> None:
        """Copy host mirror `index`, up to `rows` rows of the last field, to the device."""
        offset, row_bytes = self._last
        end = offset + rows * row_bytes
        self.device_buffer[:end].copy_(self.host_buffers[index][:end], non_blocking=True)


def resolve_ids(ids: torch.Tensor, src: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Row r's input id: `tokens[src[r]]` (sampled by the step before, on the device) where
    `src[r] >= 0`, else `ids[r]`. One Triton kernel on CUDA."""
    if ids.is_cuda and fused_ops() is not None:
        return fused_ops().resolve_ids(ids, src, tokens)
    return torch.where(src >= 0, tokens[src.clamp(min=0)], ids)


def unpack_tables(packed: torch.Tensor, width: torch.Tensor, out: torch.Tensor, rows: int) -> None:
    """`out[:rows, g, :w]` = the packed `[rows, groups, w]` tables (`w = width[0]`, on the
    device: a captured graph replays any width). One Triton kernel on CUDA."""
    if out.is_cuda and fused_ops() is not None:
        fused_ops().unpack_tables(packed, width, out, rows)
        return
    w, groups = int(width[0]), out.shape[1]
    out[:rows, :, :w] = packed[: rows * groups * w].view(rows, groups, w)


def _views(buffer: torch.Tensor, fields, offsets) -> dict[str, torch.Tensor]:
    views = {}
    for name, dtype, shape in fields:
        nbytes = dtype.itemsize * math.prod(shape)
        views[name] = buffer[offsets[name] : offsets[name] + nbytes].view(dtype).view(shape)
    return views


def cache_device(kv_caches) -> torch.device:
    """The device of the layers' caches."""
    return next(c for c in kv_caches if c is not None).device


def cache_page(kv_caches) -> int:
    """Tokens per block of the layers' caches."""
    return next(c for c in kv_caches if c is not None).shape[2]
