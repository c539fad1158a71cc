"""Causal prefill of one long chunk through torch's SDPA (cuDNN / flash) instead of the paged
Triton kernel (`TritonAttentionBackend.sdpa_prefill`).

It applies to one sequence alone in its step whose chunk has >= `SDPA_MIN_CAUSAL` queries, with a
plain causal mask (no window, soft-cap or media key ranges), value dim == head dim and a KV cache
in q's dtype (`context_len`, host ints only). Query i of a chunk after `context` cached tokens
(absolute position context + i) sees keys 0 .. context + i:

- fresh (context 0): one SDPA over the step's own k / v with `is_causal=True`;
- with context: two SDPA calls, chunk vs the cached context gathered from its pages (no mask)
  and chunk vs itself (causal, square: the alignment question does not arise), each from the
  fused op that returns its log-sum-exp; `merge_partials` weighs the two by their LSE (exact).

Lengths go through the backend's `SdpaShapes` (`sdpa_shapes.py`): padded to buckets, so that
cuDNN builds a plan per bucket instead of per prompt length, and a shape not yet built in this
thread may be kept off cuDNN (`attend` returns None: the paged kernel).

Why not one call with `torch.nn.attention.bias.causal_lower_right`: torch sends a lower-right
`CausalBias` to flash (FA2) or the efficient kernel only (else it materializes the [chunk,
context + chunk] mask for the math path); it never reaches cuDNN, whose `is_causal` is
upper-left. The fresh route's measured rate (38k tokens at 28 / 4 heads, d 128: 17.3 ms, ~610
TFLOP/s on an H200) is cuDNN's; FA2 on Hopper runs ~350 (FlashAttention-3's paper), below our
kernel's ~470. A [chunk,
context + chunk] bias would make cuDNN compute the whole rectangle (a third more for a 16k chunk
after 16k) and read the mask. Both cuDNN and flash take GQA as it is (no repeat of the KV heads).

Extra memory for a chunk with context, freed with the layer: the context's K/V gathered by
whole pages, 2 x context x kv_heads x head_dim (32k x 4 x 128 bf16: 64 MiB); q / k / v made
contiguous where they are views of the fused qkv (cuDNN's layout rule; q 16k x 28 x 128: 117
MiB); two partial outputs (117 MiB each) and their fp32 LSEs (1.8 MiB each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.sdpa_pack import rope_store_pack
from polymodal.llm_core.attention.sdpa_shapes import SdpaShapes, cudnn_key
from polymodal.llm_core.attention.spec import AttentionSpec, Mask

# A causal chunk of at least this many queries takes SDPA. Set from `.gpu/flash_causal.py`
# (fresh prompts, SDPA vs our kernel at decoder sizes, H200, ms): Qwen2.5-7B heads 1k 0.033 vs
# 0.056, 3k 0.144 vs 0.205, 10.6k 1.46 vs 1.88, 38k 17.3 vs 22.5; Gemma 3 d 256 2k 0.093 vs
# 0.161, 8k 0.95 vs 1.71 (shorter prompts not measured). Chunks with context: not yet measured
# (`scripts/bench_causal_sdpa.py`).
SDPA_MIN_CAUSAL = 1024
MERGE_BLOCK_T = 32  # tokens per merge program


def context_len(q, k, kv_cache, meta: AttentionMetadata, spec: AttentionSpec) -> int | None:
    """The number of cached tokens before this step's chunk (0: a fresh prompt) when the SDPA
    route applies, else None. Reads host ints and shapes only."""
    if k is None or meta.is_decode or kv_cache.dtype != q.dtype:
        return None
    lens, seqs = meta.query_lens_cpu, meta.seq_lens_cpu
    if lens is None or seqs is None or len(lens) != 1:
        return None
    if lens[0] < SDPA_MIN_CAUSAL or q.shape[0] != lens[0]:
        return None
    if spec.mask != Mask.CAUSAL or spec.softcap is not None or spec.value_dim != spec.head_dim:
        return None
    if meta.media_key_ranges is not None:
        return None
    context = seqs[0] - lens[0]
    # The fused ops called directly need 8-aligned head dims (F.sdpa pads, they do not).
    if context and spec.head_dim % 8:
        return None
    return context


@dataclass(frozen=True)
class SdpaPlan:
    """How one step's chunk runs on SDPA, decided once a step (`step_plan`) for all its layers
    of one shape: the lengths, the fused ops torch picked, and that `shapes` admitted them."""

    context: int  # cached tokens before the chunk
    rows: int  # fresh: the padded chunk; with context: the chunk's own causal call
    base: int  # cached keys of the context call (0: no context call)
    chunk_rows: int = 0  # the context call's padded queries (when `base`)
    own: object = None  # with context: the fused op of the own call (`_lse_attention`) ...
    old: object = None  # ... and of the context call (when `base`)


def step_plan(q, k, kv_cache, meta: AttentionMetadata, spec: AttentionSpec, shapes: SdpaShapes):
    """`plan` of this step for a layer like this one, or None (the paged kernel): decided at the
    step's first such layer and kept in `meta.sdpa_plans`, so that the other layers neither
    repeat torch's backend choice, the bucket math and the admission, nor pad anything for a
    shape `shapes` keeps off. Layers differ only where the key does (spec, head counts,
    dtypes)."""
    key = (spec, q.dtype, q.shape[1:], None if k is None else k.shape[1:], kv_cache.dtype,
           id(shapes))  # fmt: skip
    plans = meta.sdpa_plans
    if key not in plans:
        context = context_len(q, k, kv_cache, meta, spec)
        plans[key] = None if context is None else plan(q, k, spec, context, shapes)
    return plans[key]


def plan(q, k, spec: AttentionSpec, context: int, shapes: SdpaShapes) -> SdpaPlan | None:
    """The route of the chunk `q, k` after `context` cached tokens: its padded lengths, the ops
    torch picks for them (asked on empty tensors of the padded layout: no copy yet), or None
    where torch would not run them on cuDNN or flash, or where `shapes` keeps a cuDNN shape off
    (counted one sight)."""
    n, heads, kv_heads = q.shape[0], q.shape[1], k.shape[1]
    gqa = kv_heads != heads
    if context == 0:
        rows = shapes.up(n)
        key = cudnn_key(_empty(q, rows), _empty(k, rows), _empty(k, rows), True, gqa)
        if key is not None and not shapes.admit(("fresh", key)):
            return None
        return SdpaPlan(context, rows, 0)
    base = shapes.down(context)  # cached keys of the context call
    rows = shapes.up(context - base + n)
    qo, ko = _empty(q, rows), _empty(k, rows)
    own, old = _lse_attention(qo, ko, ko, causal=True), None
    calls = [("own", cudnn_key(qo, ko, ko, True, gqa))]
    chunk_rows = shapes.up(n) if base else 0
    if base:
        qc, kc = _empty(q, chunk_rows), _empty(k, base)
        old = _lse_attention(qc, kc, kc, causal=False)
        calls.append(("context", cudnn_key(qc, kc, kc, False, gqa)))
    if own is None or (base and old is None):
        return None
    if any(key is not None for _, key in calls) and not shapes.admit(tuple(calls)):
        return None
    return SdpaPlan(context, rows, base, chunk_rows, own, old)


def attend(q, k, v, kv_cache, meta: AttentionMetadata, spec: AttentionSpec, context: int,
           shapes: SdpaShapes):  # fmt: skip
    """`run` with a `plan` made for this call alone (benchmarks, tests), or None where the plan
    is None."""
    route = plan(q, k, spec, context, shapes)
    return None if route is None else run(q, k, v, kv_cache, meta, spec, route)


def run(q, k, v, kv_cache, meta: AttentionMetadata, spec: AttentionSpec, route: SdpaPlan):
    """`[tokens, heads, head_dim]` attention of the chunk `q, k, v` (k / v already stored in the
    cache) after `route.context` cached tokens of the step's only sequence, as `route` says.

    The chunk is padded at the end to `route.rows` (causal: no real query sees a padded key);
    the context call takes the first `route.base` cached keys, and the rest `r` of the context
    leads the chunk's own causal call as `r` dummy query rows, so that query i of the chunk
    (row r + i) sees those r keys and the chunk's keys 0..i: the same keys as unpadded."""
    n, heads = q.shape[0], q.shape[1]
    context, base, rows = route.context, route.base, route.rows
    if context == 0:
        return _fresh(*(_rows([(0, x)], rows) for x in (q, k, v)), n, spec)
    rest = context - base  # cached keys that lead the chunk's own call
    k_old, v_old = gather_context(kv_cache, meta.block_tables[0], context)
    qo = _rows([(rest, q)], rows)
    ko = _rows([(0, k_old[base:]), (rest, k)], rows)
    vo = _rows([(0, v_old[base:]), (rest, v)], rows)
    out_own, lse_own = route.own(qo, ko, vo, True, spec.scale)[:2]
    # outputs [1, heads, rows, d] -> [tokens, heads, d]; LSEs [1, heads, rows(, 1)]
    out_own = out_own[0, :, rest : rest + n].transpose(0, 1)
    lse_own = lse_own.reshape(heads, rows)[:, rest : rest + n]
    if not base:
        return out_own
    qc = _rows([(0, q)], route.chunk_rows)
    kc, vc = (x[:base][None].transpose(1, 2) for x in (k_old, v_old))
    out_old, lse_old = route.old(qc, kc, vc, False, spec.scale)[:2]
    out_old = out_old[0, :, :n].transpose(0, 1)
    return merge_partials(out_old, lse_old.reshape(heads, -1)[:, :n], out_own, lse_own)


def run_fresh(q, k, v, rope, kv_cache, slot_mapping, spec: AttentionSpec, route: SdpaPlan):
    """`run` of a fresh chunk (`route.context == 0`) from unrotated, unstored q / k / v: the
    rotary (`rope`: (cos, sin), or None), the KV store and the padded copies in one launch
    (`sdpa_pack.rope_store_pack`), then the causal SDPA."""
    padded = rope_store_pack(q, k, v, rope, kv_cache, slot_mapping, route.rows)
    return _fresh(*(x[None].transpose(1, 2) for x in padded), q.shape[0], spec)


def _fresh(qb, kb, vb, n: int, spec: AttentionSpec) -> torch.Tensor:
    """Causal SDPA over `[1, heads, rows, d]` padded q / k / v -> the first `n` rows'
    `[n, heads, d]`."""
    out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=spec.scale,
                                         enable_gqa=kb.shape[1] != qb.shape[1])  # fmt: skip
    return out[0, :, :n].transpose(0, 1)


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, context: int):
    """Keys and values of positions [0, context) of one sequence, `[context, kv_heads, d]` each,
    copied out of `kv_cache [2, blocks, page, kv_heads, d]` by whole pages: one index op on the
    block table row (a view), so no slot list is built, per step or per layer."""
    page = kv_cache.shape[2]
    pages = kv_cache[:, block_table[: -(-context // page)]]  # [2, pages, page, kv_heads, d]
    kv = pages.flatten(1, 2)[:, :context]  # [2, context, kv_heads, d], contiguous rows
    return kv[0], kv[1]


def merge_partials(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """Attention over two disjoint key sets joined: `out_a, out_b [tokens, heads, d]` (any
    strides, d contiguous), `lse_a, lse_b [heads, tokens]` fp32 (natural-log sum of exp of the
    scaled logits); out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b), in fp32."""
    tokens, heads, head_dim = out_a.shape
    out = torch.empty(tokens, heads, head_dim, dtype=out_a.dtype, device=out_a.device)
    grid = (triton.cdiv(tokens, MERGE_BLOCK_T), heads)
    _merge_kernel[grid](
        out_a, out_b, lse_a, lse_b, out, tokens,
        out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1),
        lse_a.stride(0), lse_a.stride(1), lse_b.stride(0), lse_b.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_T=MERGE_BLOCK_T, BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
    return out


def _rows(parts, total: int) -> torch.Tensor:
    """A `[1, heads, total, d]` view of a new contiguous `[total, heads, d]` tensor holding each
    `(offset, x [rows, heads, d])` of `parts` (in order, not overlapping) at its rows and zeros
    elsewhere: torch gives cuDNN only q / k / v whose strides are those of one contiguous
    [tokens, heads, d] each (views of the fused qkv projection are not); one part filling
    `total` rows is that contiguous copy."""
    first = parts[0][1]
    out = first.new_empty(total, first.shape[1], first.shape[2])
    end = 0
    for offset, x in parts:
        out[end:offset].zero_()
        out[offset : offset + x.shape[0]] = x
        end = offset + x.shape[0]
    out[end:].zero_()
    return out[None].transpose(1, 2)


def _empty(x, rows: int) -> torch.Tensor:
    """An uninitialized `[1, heads, rows, d]` tensor laid out as `_rows` makes it: what torch's
    backend choice and the cuDNN plan key look at (shapes, strides, dtype, device)."""
    return x.new_empty(rows, x.shape[1], x.shape[2])[None].transpose(1, 2)


def _lse_attention(q, k, v, causal: bool):
    """The fused op torch's SDPA would pick for these tensors, as `op(q, k, v, causal, scale)
    -> (out [1, heads, tokens, d], lse, ...)`, when it is cuDNN or flash (both return the LSE and
    take fewer KV heads as they are), else None."""
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, causal, enable_gqa=True)
    if choice == SDPBackend.CUDNN_ATTENTION.value:
        return _cudnn
    if choice == SDPBackend.FLASH_ATTENTION.value:
        return _flash_cuda if q.is_cuda else _flash_cpu
    return None


def _cudnn(q, k, v, causal, scale):
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    return op(q, k, v, None, True, 0.0, causal, False, scale=scale)


def _flash_cuda(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)


def _flash_cpu(q, k, v, causal, scale):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return op(q, k, v, 0.0, causal, scale=scale)


# Nothing that varies with the lengths is specialized on (Triton compiles a variant per "divisible
# by 16 or not" of each int and per 16-byte alignment of each pointer): the token count, the LSE
# strides (padded lengths) and the LSE pointers (a slice from row `rest`). A first chunk of the
# other kind compiled a second variant in the middle of a request (0.19 s on an H200).
@triton.jit(do_not_specialize=["num_tokens", "lse_a_ptr", "lse_b_ptr", "stride_lah", "stride_lat",
                               "stride_lbh", "stride_lbt"])  # fmt: skip
def _merge_kernel(
    a_ptr, b_ptr, lse_a_ptr, lse_b_ptr, out_ptr, num_tokens,
    stride_at, stride_ah, stride_bt, stride_bh,
    stride_lah, stride_lat, stride_lbh, stride_lbt,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_T tokens of one head."""
    head = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    rows = tokens < num_tokens
    mask = rows[:, None] & (dims[None, :] < HEAD_DIM)
    lse_a = tl.load(lse_a_ptr + head * stride_lah + tokens * stride_lat, mask=rows, other=0.0)
    lse_b = tl.load(lse_b_ptr + head * stride_lbh + tokens * stride_lbt, mask=rows, other=0.0)
    # a's share of the joint softmax, e^a / (e^a + e^b), with exp of -|difference| only
    diff = lse_b - lse_a
    e = tl.exp(-tl.abs(diff))
    share_a = tl.where(diff > 0, e, 1.0) / (1.0 + e)
    a_off = tokens[:, None] * stride_at + head * stride_ah + dims[None, :]
    b_off = tokens[:, None] * stride_bt + head * stride_bh + dims[None, :]
    a = tl.load(a_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
    out = b + share_a[:, None] * (a - b)
    o_off = tokens[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)
