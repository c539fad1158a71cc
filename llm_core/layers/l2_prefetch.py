"""Hopper's bulk L2 prefetch (`cp.async.bulk.prefetch.L2`) from inside a Triton kernel: a
kernel whose critical path is a chain of latencies, not bytes, asks L2 for weights a later
kernel will stream, so HBM works while the chain runs.

Batch-1 MoE decode has such a chain each layer: `moe_decode.route` (router logits, an arrival
counter, the last program's top-k) and the first loads of the expert GEMVs, which cannot start
before they know their experts. HBM idles there for ~5 us a layer (docs/performance.md), while
the next layer's qkv weights (static) could be on their way to L2. The prefetch is a hint: it
moves no value, so results are bit-identical with and without it; only timing changes.

`supported(device)` says whether a launch may pass `PREFETCH=True` (sm_90+ CUDA, not the
interpreter: the instruction is PTX inline assembly).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=8)
def supported(device: torch.device) -> bool:
    """Whether kernels on `device` can issue `cp.async.bulk.prefetch.L2` (sm_90 and newer)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def prefetchable(tensor: torch.Tensor | None) -> bool:
    """Whether `tensor`'s bytes can be bulk-prefetched: a contiguous CUDA tensor at a 16-byte
    aligned address whose size is a multiple of 16 bytes (the instruction's rule)."""
    if tensor is None or not tensor.is_cuda or not tensor.is_contiguous():
        return False
    nbytes = tensor.numel() * tensor.element_size()
    return nbytes > 0 and nbytes % 16 == 0 and tensor.data_ptr() % 16 == 0


@triton.jit
def prefetch_l2(ptr, nbytes, part, parts, EVICT_LAST: tl.constexpr = False):
    """Ask L2 for part `part` of `parts` of the `nbytes` bytes at `ptr` (16-byte aligned, nbytes
    a multiple of 16): one bulk request a warp (a uniform instruction: per-thread addresses
    would make the compiler loop over the lanes), for a 16-byte multiple. Returns at once (the
    lines arrive while the program goes on). EVICT_LAST: the lines carry L2's evict-last
    priority (streams loaded evict-first pass them by)."""
    piece = tl.cdiv(tl.cdiv(nbytes, parts), 16) * 16  # bytes a program asks for
    start = part.to(tl.int64) * piece
    size = tl.minimum(tl.maximum(nbytes - start, 0), piece).to(tl.int32)
    addr = ptr.to(tl.pointer_type(tl.int8)) + start
    if EVICT_LAST:  # (the assembly must be a literal at each call)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 policy; setp.gt.s32 p, $2, 0; "
            "createpolicy.fractional.L2::evict_last.b64 policy, 1.0; "
            "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, policy; "
            "mov.b32 $0, 0; }",
            "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
