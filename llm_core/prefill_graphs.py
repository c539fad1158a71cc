"""CUDA graphs of small non-decode steps (`PrefillGraphs`): a short prompt's prefill or a mixed
step, captured per token-count bucket (with `cuda_graph.capture_buckets`, as the decode graphs;
the same LoRA sets and thread-local capture). The step's embeddings are computed eagerly and
copied in; logits and sampling stay outside. Cross-attention tables, row counts and ranges are
more static inputs; a step that writes encoder rows runs eager. A model whose decoder attends
bidirectionally within an image (`bidirectional_media`: Gemma 3) is captured with per-token
media key ranges as a static input too, (0, 0) for tokens outside an image.
"""

from __future__ import annotations

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.aux_states import outputs_aux
from polymodal.llm_core.cuda_graph import cache_device, cache_page, capture_buckets

# 16-token steps up to 512 (an image prompt's prefill pads by < 16 tokens), 32-token steps up
# to 1024 (Pixtral-12B's one-image prompt, 827 tokens, pads to 832: every padded row is a
# decoder row of GEMM work, so coarse buckets there would cost more than the graph saves).
PREFILL_BUCKETS = [*range(16, 513, 16), *range(544, 1025, 32)]
PREFILL_MAX_SEQS = 8  # sequences per captured prefill step (padding ones have no queries)
# sequences per captured verify step (speculative decoding), above PREFILL_MAX_SEQS
VERIFY_SEQS = [12, 16, 24, 32, 48, 64, 96, 128, 192, 256]


class PrefillGraphs:
    """Captured decoder stacks for small non-decode steps: a short prompt's prefill (the TTFT
    path) or a mixed step, up to `max_tokens` tokens of at most PREFILL_MAX_SEQS sequences.

    Eager, such a step is bound by the host launching hundreds of kernels that each run for
    microseconds; a replay launches them at once. The step's embeddings (media slots merged)
    are computed eagerly and copied in. Padding tokens store nothing (slot -1); padding
    sequences get no queries, so the prefill kernel's programs for them exit at once (its grid
    is sized by the bucket). Logits and sampling stay outside, on the returned rows.
    """

    def __init__(
        self,
        model,
        kv_caches,
        max_tokens: int,
        max_blocks: int,
        uses_mrope: bool,
        num_groups: int = 1,
        num_cross_groups: int = 0,
        max_cross_blocks: int = 0,
        media_ranges: bool = False,
        verify_width: int = 0,
        max_seqs: int = 0,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = [b for b in PREFILL_BUCKETS if b < max_tokens] + [max_tokens]
        # (tokens, sequences, longest query) of each graph, by tokens: the prompt buckets, then
        # verify steps of `verify_width` (k + 1) queries a sequence, up to `max_seqs` sequences
        w = verify_width
        verify = [(c * w, c, w) for c in VERIFY_SEQS if c <= max_seqs and 0 < c * w <= max_tokens]
        self.shapes = sorted([(b, PREFILL_MAX_SEQS, b) for b in self.buckets] + verify)
        device = cache_device(kv_caches)
        n, s = self.buckets[-1], max(c for _, c, _ in self.shapes)
        hidden, dtype = model.config.hidden_size, model.config.dtype
        self.embeds = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros((3, n) if uses_mrope else n, dtype=torch.int64, device=device)
        # per KV group: slots [groups, n], tables [s, groups, max_blocks] (group g: [:, g])
        self.slot_mapping = torch.full((num_groups, n), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(s, num_groups, max_blocks, dtype=torch.int32, device=device)
        # cross groups: tables [s, cross groups, width], rows per sequence, per token ranges
        c = num_cross_groups
        self.cross_tables = torch.zeros(s, c, max_cross_blocks, dtype=torch.int32, device=device)
        self.cross_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.cross_ranges = torch.zeros(3, n, dtype=torch.int32, device=device)
        # media key ranges (lo, hi) per token, or None: the graphs take no ranges
        self.key_ranges = (
            torch.zeros(2, n, dtype=torch.int32, device=device) if media_ranges else None
        )
        self.key_ranges_cpu = None  # the eager (uncaptured) path's lists, for the torch backend
        self.hidden = torch.zeros(n, hidden, dtype=dtype, device=device)
        # by shape index (`shapes`), as DecodeGraphs' by bucket
        self.graphs: dict[bool, dict[int, torch.cuda.CUDAGraph]] = {}
        self.capture_cost: dict[bool, tuple[float, int]] = {}
        self.pool = None
        self.runs = 0
        self.lora_runs = 0
        self.verify_runs = 0
        # per shape its kept residual streams (aux_states.py); the last step's rows of them
        self.aux: dict[int, list] = {}
        self.last_aux: list = []

    def _forward(self, shape: int) -> None:
        n, s, max_q = self.shapes[shape]
        metas = [
            AttentionMetadata(
                query_start_loc=self.query_start_loc[: s + 1],
                seq_lens=self.seq_lens[:s],
                block_tables=self.block_tables[:s, g],
                slot_mapping=self.slot_mapping[g, :n],
                max_query_len=max_q,  # sizes the prefill grid for any split of n tokens
                max_seq_len=self.block_tables.shape[2] * cache_page(self.kv_caches),
            )
            for g in range(self.block_tables.shape[1])
        ]
        if self.key_ranges is not None:  # the same positions in every group
            for m in metas:
                m.media_key_ranges = (self.key_ranges[0, :n], self.key_ranges[1, :n])
                m.media_key_ranges_cpu = self.key_ranges_cpu
        metas += [  # cross groups: nothing stored (a step writing encoder rows runs eager)
            AttentionMetadata(
                query_start_loc=self.query_start_loc[: s + 1],
                seq_lens=self.cross_lens[:s],
                block_tables=self.cross_tables[:s, c],
                slot_mapping=self.slot_mapping[0, :0],
                max_query_len=max_q,
                max_seq_len=self.cross_tables.shape[2] * cache_page(self.kv_caches),
                cross_ranges=self.cross_ranges[:, :n],
            )
            for c in range(self.cross_tables.shape[1])
        ]
        meta = metas[0]
        meta.groups = metas if len(metas) > 1 else None
        positions = self.positions[..., :n]
        self.hidden[:n] = self.model(positions, self.embeds[:n], self.kv_caches, meta)
        self.aux[shape] = outputs_aux(self.model)  # kept residual streams (static once captured)

    @torch.inference_mode()
    def capture(self, lora: bool = False) -> None:
        """Capture every shape as the set `lora` (as `DecodeGraphs.capture`; no queries during
        capture: nothing is stored or read)."""
        self.graphs[lora], self.pool, self.capture_cost[lora] = capture_buckets(
            list(range(len(self.shapes))), self._forward, self.pool
        )

    def shape_for(self, num_tokens: int, num_seqs: int, max_query_len: int) -> int | None:
        """The index of the smallest shape that holds a step, or None."""
        return next(
            (
                i
                for i, (n, s, q) in enumerate(self.shapes)
                if n >= num_tokens and s >= num_seqs and q >= max_query_len
            ),
            None,
        )

    def can_run(self, num_tokens: int, num_seqs: int, num_blocks: int, ranges=None,
                max_query_len: int | None = None) -> bool:  # fmt: skip
        """Whether a step fits a captured shape (`max_query_len`: its longest query, the
        step's tokens when not given); `ranges`: its media key ranges (a step with some fits
        only graphs captured with them)."""
        return (
            self.shape_for(num_tokens, num_seqs, max_query_len or num_tokens) is not None
            and num_blocks <= self.block_tables.shape[2]
            and (ranges is None or self.key_ranges is not None)
        )  # (cross tables are never wider than `max_cross_blocks`)

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, meta, lora: bool = False):
        """Replay the smallest shape that holds this step, from the set `lora`; returns hidden
        `[num_tokens, hidden]` (a view of a static buffer: valid until the next replay)."""
        n, s = embeds.shape[0], meta.num_seqs
        shape = self.shape_for(n, s, meta.max_query_len)
        bucket = self.shapes[shape][0]
        self.runs += 1
        self.verify_runs += self.shapes[shape][1] > PREFILL_MAX_SEQS
        self.lora_runs += lora
        self.embeds[:n].copy_(embeds)
        self.positions[..., :n].copy_(positions)
        for g in range(self.block_tables.shape[1]):
            group = meta.group(g)
            self.slot_mapping[g, :n].copy_(group.slot_mapping)
            self.block_tables[:s, g, : group.block_tables.shape[1]].copy_(group.block_tables)
        self.slot_mapping[:, n:bucket].fill_(-1)
        groups = self.block_tables.shape[1]
        for c in range(self.cross_tables.shape[1]):
            group = meta.group(groups + c)
            self.cross_tables[:s, c, : group.block_tables.shape[1]].copy_(group.block_tables)
            if c == 0:  # the same rows and ranges in every cross group
                self.cross_lens[:s].copy_(group.seq_lens)
                self.cross_lens[s:].zero_()
                self.cross_ranges[:, :n].copy_(group.cross_ranges)
                self.cross_ranges[:, n:bucket].zero_()
        if self.key_ranges is not None:
            self._copy_ranges(meta.media_key_ranges, meta.media_key_ranges_cpu, n, bucket)
        self.query_start_loc[: s + 1].copy_(meta.query_start_loc)
        self.query_start_loc[s + 1 :].fill_(n)  # padding sequences: zero queries
        self.seq_lens[:s].copy_(meta.seq_lens)
        self.seq_lens[s:].zero_()
        if self.graphs:
            self.graphs[lora][shape].replay()
        else:  # not captured (CPU tests of the padding): the same padded forward, eagerly
            self._forward(shape)
        self.last_aux = [a[:n] for a in self.aux[shape]]
        return self.hidden[:n]

    def _copy_ranges(self, ranges, ranges_cpu, n: int, bucket: int) -> None:
        """The step's media key ranges into the static buffer ((0, 0): none, for a step
        without media and the padding tokens)."""
        if ranges is None:
            self.key_ranges[:, :bucket].zero_()
        else:
            self.key_ranges[0, :n].copy_(ranges[0])
            self.key_ranges[1, :n].copy_(ranges[1])
            self.key_ranges[:, n:bucket].zero_()
        if not self.graphs:  # eager: the torch backend reads host lists
            lows, highs = ranges_cpu if ranges_cpu is not None else ([0] * n, [0] * n)
            self.key_ranges_cpu = (lows + [0] * (bucket - n), highs + [0] * (bucket - n))
