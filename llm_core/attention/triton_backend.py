"""Triton attention backend: the CUDA fast path, same interface and semantics as `torch_ref`.

- `store_kv`: one kernel writes new k/v rows into their cache slots (slot -1 skipped).
- `paged_attention`: `meta.is_decode` -> GQA-grouped paged decode with split-KV
  (`triton_decode.py`); otherwise the flash-style paged prefill kernel (`triton_prefill.py`).
  Both take the layer's `AttentionSpec`: its mask kind and soft-cap are kernel constexprs.
- `rope_decode`: decode with the rotary and the KV store done inside the same kernel (one
  launch for the three).
- `sdpa_prefill`: one long causal prefill chunk alone in its step (fresh, or after cached
  context) through torch's SDPA (cuDNN / flash) instead of the paged kernel (`causal_sdpa.py`).
- `varlen_attention`: the same flash-style kernel over flat segments (encoders); segments all
  of one length (one image, same-sized tiles or crops) of >= `SDPA_MIN_SEGMENT` rows run as one
  batched `F.scaled_dot_product_attention` instead (`sdpa_segments`).
- Which shapes torch's cuDNN SDPA gets (both SDPA routes): `self.shapes` (`sdpa_shapes.py`).

Host-side reads (what a CUDA graph freezes): the decode path reads only tensor *shapes*
(`q.shape`, `kv_cache.shape`, `meta.block_tables.shape[1]`) and no meta host ints, so it never
syncs and its buffers are sized by shapes alone. The prefill path reads `meta.max_query_len` to
size its grid. Everything else (`seq_lens`, `query_start_loc`, `block_tables`) is read on device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton

from polymodal.llm_core.attention import causal_sdpa, triton_decode, triton_prefill, triton_store
from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.sdpa_shapes import SdpaShapes, cudnn_key
from polymodal.llm_core.attention.spec import AttentionSpec
from polymodal.llm_core.layers.norm import QKNorms

# Split-KV heuristic knobs: a split should cover at least this many keys, and never more
# than MAX_DECODE_SPLITS splits (bounds the partial buffer and the reduce kernel). One 64-key
# tile per split: batch-1 decode on an H200 (Qwen2.5-VL-7B, 256 tokens after 32) took 3.805 ms
# a token against 3.860 with 128 keys and 3.880 with 256 (1024 tokens: 3.866 / 3.898 / 3.950):
# the tiles of a split are a chain of dependent loads; splits run side by side.
MIN_KEYS_PER_SPLIT = 64
MAX_DECODE_SPLITS = 16
# Decode tiles of 64 keys, 4 warps: 128-key tiles ran store + decode alone 0.4-1.5 us faster
# per layer on an H200 but the whole batch-1 step 1% slower (260.5 -> 257.7 tok/s, same
# machine): the o_proj GEMV that prefetches its weights under the attention (PDL) had less room.
DECODE_BLOCK_N = 64
# Wider heads take fewer keys a tile, so a K / V tile stays at most 64 x 128 elements: at head
# dim 256 (Gemma 3) 32-key tiles ran batch-1 decode of Gemma-3-12B 6.600 ms a token against
# 6.749 with 64 (H200, dummy weights, 256 tokens after 32; 85.0% vs 83.1% of the floor).
DECODE_TILE_ELEMENTS = 64 * 128
DECODE_WARPS = 4
DECODE_STAGES = 3
# Equal-length segments of at least this many rows take torch's SDPA (cuDNN / flash on CUDA)
# over a [segments, heads, length, head_dim] view. H200, bf16, 16 heads, CUDA-graph replays (ms,
# SDPA vs our kernel): one 4K image's 42,196 patches d 80 23.7 vs 26.5, SigLIP 4 x 4096 d 72
# 0.89 vs 2.32, Llama 4 8 x 4784 d 88 2.72 vs 8.10, 64 x 256 d 80 0.081 vs 0.101; 64-row windows
# stay on the kernel (660 x 64: 0.228 vs 0.158).
SDPA_MIN_SEGMENT = 128
# Equal segments up to this many run as one SDPA call whatever their count (`segment_groups`)
WHOLE_SEGMENTS = 8


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # CPU / interpreter: a small stand-in so the heuristic still splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_block_n(head_dim: int) -> int:
    """Keys per decode tile on CUDA: `DECODE_BLOCK_N`, fewer for heads wider than 128."""
    block_d = triton.next_power_of_2(head_dim)
    return max(16, min(DECODE_BLOCK_N, DECODE_TILE_ELEMENTS // block_d))


def split_keys(block_n: int) -> int:
    """Keys a decode split takes at least (of a sequence's real context): one tile, as the
    64-key measurement above; a wide head's tile of 32 (`decode_block_n`) then has its own split
    too, rather than two chained in one (below 16 tiles every split is one tile, loaded before
    the PDL wait)."""
    return min(MIN_KEYS_PER_SPLIT, block_n)


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int, max_splits: int
) -> int:
    """How many KV splits a decode launch uses, from host ints fixed per CUDA-graph bucket.

    Split only when `num_seqs * num_kv_heads` programs leave SMs idle, and only as far as each
    split still gets `MIN_KEYS_PER_SPLIT` keys of the longest possible context.
    """
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(2 * num_sms, programs)  # ~2 waves of programs
    by_length = triton.cdiv(max_context, MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_length, max_splits))


class TritonAttentionBackend:
    """Paged attention and varlen attention in Triton (CUDA; or CPU under TRITON_INTERPRET=1).

    `decode_splits` pins the number of split-KV partitions of the decode kernel (tests, tuning);
    `None` picks it with `decode_num_splits` from the batch shape. `causal_sdpa`: whether
    `sdpa_prefill` takes SDPA; None: where it is faster (CUDA, 16-bit), True: wherever it is exact
    (any device or dtype: tests), False: never (the paged kernel; A/B checks). `sdpa_shapes`:
    which shapes cuDNN's SDPA gets (`sdpa_shapes.POLICIES`): bucketed lengths, and a new shape
    built on its first or second sight (the Triton kernel until then), or every exact shape.
    """

    name = "triton"

    def __init__(
        self,
        decode_splits: int | None = None,
        causal_sdpa: bool | None = None,
        sdpa_shapes: str = "second",
    ) -> None:
        self.decode_splits = decode_splits
        self.causal_sdpa = causal_sdpa
        self.shapes = SdpaShapes(sdpa_shapes)

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: tuple[float, float] | None = None,
    ) -> None:
        """Write new keys/values `[num_tokens, kv_heads, head_dim]` into their cache slots (an
        FP8 cache: divided by `kv_scales`, saturated)."""
        triton_store.store_kv(k, v, kv_cache, slot_mapping, kv_scales)

    def paged_attention(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        spec: AttentionSpec,
        kv_scales: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Attention of `q [num_tokens, heads, head_dim]` over each sequence's cache, masked and
        soft-capped as `spec` says (an FP8 cache's values times `kv_scales`)."""
        _check_spec(spec)
        if spec.is_cross:  # each query's encoder rows (cross group tables)
            ranges = (meta.cross_ranges[0], meta.cross_ranges[1])
            if meta.is_decode:
                return self._decode(q, kv_cache, meta, spec, kv_scales=kv_scales, ranges=ranges)
            return triton_prefill.paged_prefill(
                q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                meta.max_query_len, spec, kv_scales, ranges, meta.max_seq_len,
            )  # fmt: skip
        if meta.is_decode and spec.is_causal and meta.media_key_ranges is None:
            return self._decode(q, kv_cache, meta, spec, kv_scales=kv_scales)
        split = meta.decode_split() if spec.is_causal else None
        if split is not None:  # decode rows first, then the prompts' chunks
            head, tail = split
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            triton_prefill.paged_prefill(
                q, kv_cache, tail.query_start_loc, tail.seq_lens, tail.block_tables,
                tail.max_query_len, spec, kv_scales, None, tail.max_seq_len, out=out,
            )  # fmt: skip
            return self._decode_head(q, kv_cache, head, spec, kv_scales, out)
        return triton_prefill.paged_prefill(
            q,
            kv_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.max_query_len,
            spec,
            kv_scales,
            meta.media_key_ranges,
            meta.max_seq_len,
        )

    def sdpa_prefill(self, q, k, v, kv_cache, meta: AttentionMetadata, spec: AttentionSpec):
        """Causal attention of one long prefill chunk (the step's only sequence; fresh, or after
        cached context gathered from its pages) with SDPA, or None where that does not apply
        (`paged_attention` then reads the cache as usual; the keys are stored either way)."""
        if not self._takes_sdpa(q):
            return None
        split = meta.decode_split()
        if split is None:
            route = causal_sdpa.step_plan(q, k, kv_cache, meta, spec, self.shapes)
            return None if route is None else causal_sdpa.run(q, k, v, kv_cache, meta, spec, route)
        head, tail = split  # decode rows, then one long chunk: SDPA for the chunk alone
        d = head.num_seqs
        route = causal_sdpa.step_plan(q[d:], k[d:], kv_cache, tail, spec, self.shapes)
        if route is None:
            return None
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out[d:] = causal_sdpa.run(q[d:], k[d:], v[d:], kv_cache, tail, spec, route)
        return self._decode_head(q, kv_cache, head, spec, None, out)

    def fresh_prefill(self, q, k, v, rope, kv_cache, meta: AttentionMetadata,
                      spec: AttentionSpec):  # fmt: skip
        """`sdpa_prefill` of a fresh chunk (no cached context, the step's only sequence) from
        unrotated, unstored q / k / v: the rotary (`rope`: (cos, sin), or None), the KV store
        and SDPA's padded copies in one launch (`causal_sdpa.run_fresh`). None where the step is
        not that: the layer then rotates, stores and calls `sdpa_prefill` as before."""
        if not self._takes_sdpa(q) or meta.decode_split() is not None:
            return None
        route = causal_sdpa.step_plan(q, k, kv_cache, meta, spec, self.shapes)
        if route is None or route.context:
            return None
        return causal_sdpa.run_fresh(q, k, v, rope, kv_cache, meta.slot_mapping, spec, route)

    def _takes_sdpa(self, q: torch.Tensor) -> bool:
        """Whether a long causal chunk may take SDPA here (`causal_sdpa`)."""
        fast = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
        return self.causal_sdpa is True or (self.causal_sdpa is None and fast)

    def _decode_head(self, q, kv_cache, head: AttentionMetadata, spec: AttentionSpec,
                     kv_scales, out: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """`out` with its first rows (a mixed step's decode rows, one a sequence of `head`)
        attended by the decode kernel: it reads each sequence's keys once for all query heads
        of a key head, where the prefill kernel's programs (one a query head) read them once
        each, GQA-group times, with 1-row query tiles (`AttentionMetadata.decode_split`)."""
        d = head.num_seqs
        # one KV split: one kernel variant whatever the head's size (the split count is a
        # constexpr; decode graphs compiled theirs at capture, this unfused form is new)
        out[:d] = self._decode(q[:d], kv_cache, head, spec, kv_scales=kv_scales, splits=1)
        return out

    def fuses_rope_decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether `rope_decode` runs as one kernel here (the Triton decode on CUDA)."""
        return q.is_cuda

    def rope_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        spec: AttentionSpec,
        kv_scales: tuple[float, float] | None = None,
        norms: QKNorms | None = None,
    ) -> torch.Tensor:
        """Decode attention of unrotated `q, k, v` (one token per sequence): rotates q and k
        with `rope` = (cos, sin) `[num_seqs, rotary_dim / 2]` (neox style), stores k and v at
        `meta.slot_mapping` and attends, all in one kernel. Equals `triton_ops.rotary_embedding`
        + `store_kv` + `paged_attention` (with `norms`: `qk_rms_norm_` before them)."""
        _check_spec(spec)
        new = triton_decode.NewTokens(k, v, *rope, meta.slot_mapping, norms)
        return self._decode(q, kv_cache, meta, spec, new, kv_scales)

    def _decode(self, q, kv_cache, meta, spec: AttentionSpec, new=None, kv_scales=None,
                ranges=None, splits: int | None = None):  # fmt: skip
        """One token per sequence; reads shapes only (CUDA-graph safe). `splits` pins the KV
        splits (else `decode_splits`, else `decode_num_splits`)."""
        num_seqs, num_kv_heads, page_size = q.shape[0], kv_cache.shape[3], kv_cache.shape[2]
        max_context = meta.block_tables.shape[1] * page_size
        if spec.window is not None:  # a window or a chunk bounds the keys a query sees
            max_context = min(max_context, spec.window)
        num_splits = (
            splits
            or self.decode_splits
            or decode_num_splits(
                num_seqs, num_kv_heads, max_context, _num_sms(q.device), MAX_DECODE_SPLITS
            )
        )
        # A pinned split count is used as is; the heuristic's is a maximum that each sequence
        # scales down in-kernel to one tile a split of its real context (`split_keys`; the
        # interpreter's 16-key tiles keep 64 keys a split).
        block_n = decode_block_n(q.shape[-1]) if q.is_cuda else 16
        min_keys = split_keys(block_n) if q.is_cuda else MIN_KEYS_PER_SPLIT
        min_keys = 1 if self.decode_splits else min_keys
        return triton_decode.paged_decode(
            q if q.stride(-1) == 1 else q.contiguous(),
            kv_cache,
            meta.block_tables,
            meta.seq_lens,
            spec,
            num_splits,
            block_n,
            num_warps=DECODE_WARPS,
            num_stages=DECODE_STAGES,
            min_split_keys=min_keys,
            new=new,
            kv_scales=kv_scales,
            key_ranges=ranges,
        )

    def varlen_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        scale: float,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attention within each segment `cu_seqlens[i]:cu_seqlens[i+1]` (encoders, prefill).
        Equal segments run as batched SDPAs of the counts `segment_groups` gives, each on the
        kernel instead while it would be a cuDNN shape that `self.shapes` keeps off for now
        (its length cannot be padded without a mask)."""
        segments = sdpa_segments(q, k, v, cu_seqlens, max_seqlen)
        if not segments:
            return triton_prefill.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal)
        outs, first = [], 0
        for count in segment_groups(segments):
            rows = slice(first * max_seqlen, (first + count) * max_seqlen)
            outs.append(self._segments(q[rows], k[rows], v[rows], cu_seqlens[: count + 1],
                                       max_seqlen, scale, causal))  # fmt: skip
            first += count
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _segments(self, q, k, v, cu_seqlens, length: int, scale: float, causal: bool):
        """`len(cu_seqlens) - 1` segments of `length` rows: one batched SDPA, or the kernel."""
        view = [cu_seqlens.shape[0] - 1, length, q.shape[1], q.shape[2]]
        qb, kb, vb = (x.view(view).transpose(1, 2) for x in (q, k, v))
        key = cudnn_key(qb, kb, vb, causal)
        if key is None or self.shapes.admit(("segments", key)):
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=scale)
            return out.transpose(1, 2).reshape(q.shape)
        return triton_prefill.varlen_attention(q, k, v, cu_seqlens, length, scale, causal)


def segment_groups(segments: int) -> list[int]:
    """Equal segments -> the counts one SDPA call each takes: up to `WHOLE_SEGMENTS` in one
    call (one image's views or crops: no split, no concatenation), more as power-of-2 counts of
    at least that many, largest first, then the rest in one (25 -> 16, 8, 1; 13 -> 8, 5).
    cuDNN builds a plan for each new batch size (~35-40 ms on an H100 / H200): a server's steps
    batch every count of 448 px images from 1 to ~25, and a fresh server built a plan for each
    mid-burst; now at most `WHOLE_SEGMENTS` plus one a power of 2 (10 below 32 images)."""
    if segments <= WHOLE_SEGMENTS:
        return [segments]
    groups = [1 << b for b in reversed(range(segments.bit_length())) if segments >> b & 1]
    large = [g for g in groups if g >= WHOLE_SEGMENTS]
    rest = segments - sum(large)
    return large + [rest] if rest else large


def sdpa_segments(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int) -> int:
    """How many segments a varlen call runs as one batched SDPA: all when they are of one
    length (`total == segments x max_seqlen`: read from shapes and the host int, no sync) of
    >= `SDPA_MIN_SEGMENT` rows, on CUDA in 16-bit with as many key heads as query heads and
    row-major [total, heads, head_dim] views; else 0 (the Triton kernel)."""
    segments = cu_seqlens.shape[0] - 1
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return 0
    if segments < 1 or max_seqlen < SDPA_MIN_SEGMENT or q.shape[0] != segments * max_seqlen:
        return 0
    if k.shape[1] != q.shape[1] or any(x.stride(-1) != 1 for x in (q, k, v)):
        return 0
    return segments


def _check_spec(spec: AttentionSpec) -> None:
    """The kernels read keys and values of one head size from the `[2, ...]` cache."""
    if spec.value_dim != spec.head_dim:
        raise NotImplementedError(
            f"attention with value head dim {spec.value_dim} != q/k head dim {spec.head_dim} "
            "needs a split K/V cache layout (MLA), not implemented yet"
        )
