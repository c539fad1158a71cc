"""Fused elementwise Triton kernels for the decoder: RMSNorm (+ residual add), SiLU-and-mul,
neox rotary embedding and its M-RoPE cos/sin gather (`mrope_cos_sin`), the decode graphs' id
lookup (`resolve_ids`) and logits cast + greedy argmax (`logits_argmax`). Each has a torch
reference with the same semantics (`*_ref` here; the torch paths of `RotaryEmbedding.cos_sin`,
`cuda_graph.resolve_ids` and `LlamaForCausalLM.compute_logits`), used by tests and as the
definition of what the kernel computes.

All math is fp32 inside the kernels; results are cast back to the input dtype. Gemma 3's fused
norms (`sandwich_norm`, `qk_rms_norm_`) and the towers' `add_layer_norm` live in
`triton_norm.py` and are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.triton_norm import (  # noqa: F401
    add_layer_norm,
    qk_rms_norm_,
    sandwich_norm,
)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    hidden,
    eps,
    stride_x,
    stride_r,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
    UNIT_OFFSET: tl.constexpr = False,
):
    """One program per row: h = x (+ residual); out = w * (h * rsqrt(mean(h^2) + eps)).
    UNIT_OFFSET (Gemma): out = (h * rsqrt(...)) * (1 + w) in fp32, rounded once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # static: before the wait
    pdl.wait(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + r
        tl.store(new_res_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden + eps)
    if UNIT_OFFSET:  # Gemma scales in fp32 and casts once
        out = (h * rstd) * (1.0 + w)
    else:
        normed = (h * rstd).to(x.dtype).to(tl.float32)  # HF casts before scaling by the weight
        out = w * normed
    tl.store(out_ptr + row * hidden + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (add +) RMSNorm over the last dim. Returns `(out, new_residual)`.

    With `residual`, `h = x + residual` and `new_residual = h`; without, `new_residual = x`.
    `out` has dtype `promote(x, weight)`, like HF's `weight * h.to(dtype)`; with `unit_offset`
    (Gemma's norm) `(h * rstd * (1 + weight)).to(x.dtype)`.
    """
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # [rows, hidden]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        new_res = torch.empty_like(x2, memory_format=torch.contiguous_format)
    else:
        r2 = new_res = x2  # unused by the kernel
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, new_res, hidden, eps, x2.stride(0), r2.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
            USE_PDL=pdl.use_pdl(x2), UNIT_OFFSET=unit_offset, launch_pdl=pdl.use_pdl(x2),
        )  # fmt: skip
    new_residual = new_res.view(x.shape) if residual is not None else x
    return out.view(x.shape), new_residual


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rms_norm` (HF LlamaRMSNorm, with the residual add before it)."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
                         GELU_TANH: tl.constexpr = False):  # fmt: skip
    """Program (row, chunk): out[row, c] = silu(x[row, c]) * x[row, d + c] (GELU_TANH:
    gelu_tanh(x) = x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), the same function)."""
    pdl.wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        inner = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)  # 2 sqrt(2/pi) (..)
        out = gate * tl.sigmoid(inner) * up
    else:
        out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * d + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
    """`x [..., 2d] = [gate | up]` -> `silu(gate) * up` (`gelu_tanh`: GELU with the tanh
    approximation instead of SiLU) of shape `[..., d]`."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)  # [rows, 2d]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), BLOCK=block, num_warps=4,
            USE_PDL=pdl.use_pdl(x2), GELU_TANH=gelu_tanh, launch_pdl=pdl.use_pdl(x2),
        )  # fmt: skip
    return out.view(*x.shape[:-1], d)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference of `silu_and_mul` (fp32 math, one rounding)."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@triton.jit
def _rotate_heads(x_ptr, cos, sin, num_heads, stride_h, col_mask, cols, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, PAIRS: tl.constexpr = False):  # fmt: skip
    """Rotate `x_ptr[:num_heads, :2*HALF]` (one token's heads) in place: feature i with
    i + HALF (neox), or with `PAIRS` each 2i with 2i + 1 (interleaved pairs)."""
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < num_heads) & col_mask[None, :]
    if PAIRS:
        ptr1 = x_ptr + heads[:, None] * stride_h + 2 * cols[None, :]  # even features
        ptr2 = ptr1 + 1
    else:
        ptr1 = x_ptr + heads[:, None] * stride_h + cols[None, :]  # first half
        ptr2 = ptr1 + HALF
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr2, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # Explicit fma: the rounding is fixed, so decode attention's in-kernel rotary (triton_decode
    # `_rotate`, the same two ops) gives the same bits whatever the compiler would contract.
    c, s = cos[None, :], sin[None, :]
    tl.store(ptr1, tl.fma(a, c, -(b * s)).to(x1.dtype), mask=mask)
    tl.store(ptr2, tl.fma(b, c, a * s).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, num_q_heads, num_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
    HALF: tl.constexpr,  # rotary_dim // 2
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,  # 0: no k
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
    PAIRS: tl.constexpr = False,  # interleaved pairs instead of halves
):  # fmt: skip
    """One program per token: rotate q[t] and k[t] of every head in place.

    cos/sin (built once per forward, before the layers) load ahead of the PDL wait."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(cos_ptr + token * stride_ct + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_st + cols, mask=col_mask, other=0.0).to(tl.float32)
    pdl.wait(USE_PDL)
    q_row = q_ptr + token * stride_qt
    _rotate_heads(q_row, cos, sin, num_q_heads, stride_qh, col_mask, cols, HALF, BLOCK_QH, PAIRS)
    if BLOCK_KH > 0:
        k_row = k_ptr + token * stride_kt
        _rotate_heads(k_row, cos, sin, num_k_heads, stride_kh, col_mask, cols, HALF, BLOCK_KH,
                      PAIRS)  # fmt: skip


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary embedding applied in place to `q [T, heads, D]` and `k [T, kv_heads, D]`
    (`pairs`: each feature 2i turns with 2i + 1, as a complex multiply; Llama 4's vision tower).

    `cos, sin`: `[T, rotary_dim / 2]`, already gathered per token (M-RoPE sections merged by the
    caller). Only the first `rotary_dim` features rotate. Views (e.g. slices of a packed qkv)
    are fine as long as the last dim has unit stride. `k` may have no tokens (q alone is
    rotated); otherwise one launch rotates both. Returns `(q, k)`. Under PDL cos/sin are read
    before waiting on the kernel launched just before: that one must not be what wrote them.
    """
    half = cos.shape[-1]
    assert 2 * half <= q.shape[-1] and cos.shape == sin.shape
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1, "cos/sin need a unit last stride"
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "rotary works in place: unit last stride"
    has_k = k.shape[0] > 0
    assert not has_k or k.shape[0] == q.shape[0], "q and k need the same tokens"
    if q.shape[0] == 0:
        return q, k
    flag = pdl.use_pdl(q)
    _rotary_kernel[(q.shape[0],)](
        q, k if has_k else q, cos, sin, q.shape[1], k.shape[1], q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        HALF=half, BLOCK_QH=triton.next_power_of_2(q.shape[1]),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]) if has_k else 0,
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, USE_PDL=flag, PAIRS=pairs,
        launch_pdl=flag,
    )  # fmt: skip
    return q, k


def rotary_embedding_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rotary_embedding` (returns new tensors; fp32 math, one rounding)."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = cos.shape[-1]
        c, s = cos.float()[:, None, :], sin.float()[:, None, :]  # broadcast over heads
        x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
        rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
        return torch.cat([rot, x[..., 2 * half :]], dim=-1)

    return rotate(q), rotate(k)


@triton.jit
def _resolve_ids_kernel(ids_ptr, src_ptr, tokens_ptr, out_ptr, n, BLOCK: tl.constexpr,
                        USE_PDL: tl.constexpr):  # fmt: skip
    """out[r] = tokens[src[r]] where src[r] >= 0, else ids[r]."""
    pdl.wait(USE_PDL)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n
    src = tl.load(src_ptr + rows, mask=mask, other=-1)
    ids = tl.load(ids_ptr + rows, mask=mask, other=0)
    sampled = tl.load(tokens_ptr + src, mask=mask & (src >= 0), other=0)
    tl.store(out_ptr + rows, tl.where(src >= 0, sampled, ids), mask=mask)


def resolve_ids(ids: torch.Tensor, src: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Input ids of a decode step whose rows may still wait on the step before: row r takes
    `tokens[src[r]]` (an id sampled on the device) where `src[r] >= 0`, else `ids[r]`.
    ids, src: int64 `[n]`; tokens: int64 `[m]`. Returns a new `[n]` tensor."""
    out = torch.empty_like(ids)
    if ids.numel():
        block = min(1024, triton.next_power_of_2(ids.numel()))
        flag = pdl.use_pdl(ids)
        _resolve_ids_kernel[(triton.cdiv(ids.numel(), block),)](
            ids, src, tokens, out, ids.numel(), BLOCK=block, USE_PDL=flag, launch_pdl=flag
        )
    return out


@triton.jit
def _unpack_tables_kernel(packed_ptr, width_ptr, out_ptr, groups, max_blocks, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr):  # fmt: skip
    """Program (row, group, chunk): out[row, group, :width] = the packed [rows, groups, width]
    table's (row, group) entries; `width` is read from the device (a graph replays any)."""
    pdl.wait(USE_PDL)
    row, group, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    width = tl.load(width_ptr)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    table = row * groups + group
    vals = tl.load(packed_ptr + table * width + cols, mask=mask)
    tl.store(out_ptr + table * max_blocks + cols, vals, mask=mask)


def unpack_tables(packed: torch.Tensor, width: torch.Tensor, out: torch.Tensor, rows: int) -> None:
    """Fill `out[:rows, g, :width]` (int32 `[n, groups, max_blocks]`) from `packed` (flat int32,
    rows x groups tables of `width` entries each; `width` an int32 `[1]` on the device)."""
    groups, max_blocks = out.shape[1], out.shape[2]
    block = min(1024, triton.next_power_of_2(max_blocks))
    flag = pdl.use_pdl(out)
    _unpack_tables_kernel[(rows, groups, triton.cdiv(max_blocks, block))](
        packed, width, out, groups, max_blocks, BLOCK=block, USE_PDL=flag, launch_pdl=flag
    )


@triton.jit
def _logits_argmax_kernel(raw_ptr, out_ptr, val_ptr, idx_ptr, counter_ptr, tokens_ptr, vocab,
                          chunks, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                          USE_PDL: tl.constexpr):  # fmt: skip
    """Program (row, chunk): out = raw as fp32 and the chunk's (max, first index of it); the
    last chunk of a row to arrive (arrival counter) picks the first chunk holding the row's
    max, so the token is the first index of the maximum, as torch.argmax gives."""
    pdl.wait(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    x = tl.load(raw_ptr + row.to(tl.int64) * vocab + cols, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * vocab + cols, x, mask=mask)
    # NaN ranks as +inf (torch.argmax ranks it highest): a row that overflowed still picks an
    # id inside the vocab, never the masked tail's (an index past the vocab)
    key = tl.where(x != x, float("inf"), x)
    best, at = tl.max(key, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * chunks + chunk, best)
    tl.store(idx_ptr + row * chunks + chunk, chunk * BLOCK + at)
    tl.debug_barrier()  # the partial is written before the counter moves
    if tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu") == chunks - 1:
        offs = tl.arange(0, BLOCK_C)
        vals = tl.load(val_ptr + row * chunks + offs, mask=offs < chunks, other=float("-inf"),
                       cache_modifier=".cg")  # fmt: skip
        idxs = tl.load(idx_ptr + row * chunks + offs, mask=offs < chunks, other=0,
                       cache_modifier=".cg")  # fmt: skip
        _, first = tl.max(vals, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(tokens_ptr + row, tl.sum(tl.where(offs == first, idxs, 0), 0))
        tl.atomic_xchg(counter_ptr + row, 0, sem="relaxed", scope="gpu")


def logits_argmax(raw: torch.Tensor, out: torch.Tensor, tokens: torch.Tensor) -> None:
    """One kernel: `out` (fp32 `[M, vocab]`) = raw logits `[M, vocab]` cast, and `tokens[m]`
    (int64) = the first index of row m's maximum (torch.argmax's answer; NaN ranks as +inf, so
    a row of NaN gives its first index)."""
    rows, vocab = raw.shape
    if rows == 0:
        return
    block = 4096
    chunks = triton.cdiv(vocab, block)
    vals = torch.empty((rows, chunks), dtype=torch.float32, device=raw.device)
    idxs = torch.empty((rows, chunks), dtype=torch.int64, device=raw.device)
    flag = pdl.use_pdl(raw)
    _logits_argmax_kernel[(rows, chunks)](
        raw, out, vals, idxs, arrival_counters(raw.device, rows), tokens, vocab, chunks,
        BLOCK=block, BLOCK_C=triton.next_power_of_2(chunks), USE_PDL=flag, launch_pdl=flag,
        num_warps=8,
    )  # fmt: skip


@triton.jit(do_not_specialize=["tokens"])  # one variant for every step size
def _mrope_cos_sin_kernel(cache_ptr, pos_ptr, cos_ptr, sin_ptr, tokens, stride_cache,
                          HALF: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    """Program per token: cos/sin column c comes from the position of axis 0, 1 or 2 by
    the M-RoPE section c falls in (sections S0, S1, the rest)."""
    pdl.wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    axis = (cols >= S0).to(tl.int64) + (cols >= S0 + S1).to(tl.int64)
    pos = tl.load(pos_ptr + axis * tokens + t, mask=mask, other=0)
    row = cache_ptr + pos * stride_cache
    cos = tl.load(row + cols, mask=mask, other=0.0)
    sin = tl.load(row + HALF + cols, mask=mask, other=0.0)
    tl.store(cos_ptr + t * HALF + cols, cos, mask=mask)
    tl.store(sin_ptr + t * HALF + cols, sin, mask=mask)


def mrope_cos_sin(
    cache: torch.Tensor, positions: torch.Tensor, sections: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE cos, sin `[T, half]` from the `[max_positions, 2 * half]` cos|sin cache and
    `[3, T]` positions: column c takes axis i's position, i the section c is in (one gather
    kernel instead of an index and two concatenations)."""
    half = cache.shape[1] // 2
    tokens = positions.shape[1]
    positions = positions.contiguous()
    cos = torch.empty((tokens, half), dtype=cache.dtype, device=cache.device)
    sin = torch.empty_like(cos)
    if tokens:
        flag = pdl.use_pdl(cache)
        _mrope_cos_sin_kernel[(tokens,)](
            cache, positions, cos, sin, tokens, cache.stride(0), HALF=half, S0=sections[0],
            S1=sections[1], BLOCK=triton.next_power_of_2(half), USE_PDL=flag, launch_pdl=flag,
        )  # fmt: skip
    return cos, sin
