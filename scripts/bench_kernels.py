"""Time the Triton kernels against torch references on realistic shapes.

    python scripts/bench_kernels.py            # CUDA: triton.testing.do_bench medians
    python scripts/bench_kernels.py --tiny     # tiny shapes; on CPU runs under TRITON_INTERPRET=1

Decode rows report achieved GB/s = bytes of K/V read / time (the roofline of decode).
Shapes follow Qwen2.5-VL-7B: decoder 28 q heads / 4 kv heads, head_dim 128; vision tower
16 heads, head_dim 80.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test, CPU ok)")
ARGS.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])

if __name__ == "__main__" and "--tiny" in sys.argv:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from polymodal.llm_core.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from polymodal.llm_core.layers import triton_ops  # noqa: E402


def bench_ms(fn, graph: bool = False) -> float:
    """Median milliseconds of `fn()`: do_bench on CUDA (replayed from a CUDA graph when `graph`,
    as the engine runs decode: no Python launch overhead), a few wall-clock runs elsewhere."""
    if torch.cuda.is_available():
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def paged_batch(q_lens, seq_lens, heads, kv_heads, head_dim, dtype, device, page=16):
    """Random paged cache with shuffled blocks + metadata + queries."""
    pages = [-(-s // page) for s in seq_lens]
    num_blocks = sum(pages)
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, device=device).int()
    tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=device)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used : used + n]
        used += n
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *q_lens], device=device).cumsum(0).int(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables,
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64, device=device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        is_decode=all(n == 1 for n in q_lens),
        query_lens_cpu=list(q_lens),
        seq_lens_cpu=list(seq_lens),
    )
    q = torch.randn(sum(q_lens), heads, head_dim, device=device, dtype=dtype)
    return q, cache, meta


def bench_decode(batch, ctx, shape, dtype, device):
    """Paged Triton decode vs the paged torch reference and dense (unpaged) SDPA."""
    heads, kv_heads, head_dim = shape
    q, cache, meta = paged_batch([1] * batch, [ctx] * batch, *shape, dtype, device)
    scale = head_dim**-0.5
    backend = TritonAttentionBackend()
    t = bench_ms(lambda: backend.paged_attention(q, cache, meta, scale), graph=True)
    t_ref = bench_ms(lambda: TorchAttentionBackend().paged_attention(q, cache, meta, scale))
    k, v = (torch.randn(batch, kv_heads, ctx, head_dim, device=device, dtype=dtype) for _ in "kv")
    qd = q.view(batch, heads, 1, head_dim)
    t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True), True)
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * cache.element_size()
    gbs = f"{kv_bytes / t / 1e6:7.1f} GB/s (sdpa {kv_bytes / t_sdpa / 1e6:.1f})"
    name = f"decode b{batch} ctx{ctx} (graph)"
    return [(name, t, "dense sdpa", t_sdpa, gbs), (name, t, "torch ref", t_ref, "")]


def bench_prefill(n_seq, length, shape, dtype, device):
    """Paged Triton prefill of fresh sequences vs dense causal SDPA."""
    heads, kv_heads, head_dim = shape
    q, cache, meta = paged_batch([length] * n_seq, [length] * n_seq, *shape, dtype, device)
    t = bench_ms(lambda: TritonAttentionBackend().paged_attention(q, cache, meta, head_dim**-0.5))
    qd = q.view(n_seq, length, heads, head_dim).transpose(1, 2)
    kd, vd = (
        torch.randn(n_seq, kv_heads, length, head_dim, device=device, dtype=dtype) for _ in "kv"
    )
    t_sdpa = bench_ms(
        lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
    )
    flops = 4 * n_seq * heads * head_dim * length * length / 2  # causal: half the matrix
    return [
        (f"prefill {n_seq}x{length}", t, "dense sdpa", t_sdpa, f"{flops / t / 1e9:.1f} TFLOP/s")
    ]


def bench_varlen(n_img, patches, seg, heads, head_dim, dtype, device):
    """Encoder varlen attention over equal segments vs batched dense SDPA."""
    cu = torch.arange(0, n_img * patches + 1, seg, device=device).int()
    q, k, v = (
        torch.randn(n_img * patches, heads, head_dim, device=device, dtype=dtype) for _ in range(3)
    )
    t = bench_ms(lambda: TritonAttentionBackend().varlen_attention(q, k, v, cu, seg, 0.1))
    qb, kb, vb = (x.view(-1, seg, heads, head_dim).transpose(1, 2) for x in (q, k, v))
    t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb))
    return [(f"varlen {n_img}x{patches} seg{seg} d{head_dim}", t, "dense sdpa", t_sdpa, "")]


def bench_ops(tokens, hidden, inter, shape, dtype, device):
    """Fused elementwise kernels vs their torch references."""
    heads, kv_heads, head_dim = shape
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    res, w = torch.randn_like(x), torch.randn(hidden, device=device, dtype=dtype)
    gate_up = torch.randn(tokens, 2 * inter, device=device, dtype=dtype)
    q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype)
    angles = torch.randn(tokens, head_dim // 2, device=device)
    cos, sin = angles.cos(), angles.sin()
    pairs = {
        "rms_norm+residual": (triton_ops.rms_norm, triton_ops.rms_norm_ref, (x, w, 1e-6, res)),
        "silu_and_mul": (triton_ops.silu_and_mul, triton_ops.silu_and_mul_ref, (gate_up,)),
        "rotary (q, k)": (
            triton_ops.rotary_embedding,
            triton_ops.rotary_embedding_ref,
            (q, k, cos, sin),
        ),
    }
    return [
        (name, bench_ms(lambda: fast(*a)), "torch ref", bench_ms(lambda: ref(*a)), "")  # noqa: B023
        for name, (fast, ref, a) in pairs.items()
    ]


def main() -> None:
    args = ARGS.parse_args()
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny
    shape = (4, 2, 32) if tiny else (28, 4, 128)  # q heads, kv heads, head_dim
    rows = []  # (name, triton ms, baseline name, baseline ms, note)
    for batch, ctx in (
        [(1, 40), (2, 70)] if tiny else [(1, 1024), (1, 4096), (32, 1024), (32, 4096)]
    ):
        rows += bench_decode(batch, ctx, shape, dtype, device)
    rows += bench_prefill(*((2, 33) if tiny else (32, 512)), shape, dtype, device)
    n_img, patches, window = (2, 40, 8) if tiny else (4, 1024, 64)
    for seg in (patches, window):  # full attention per image, then window attention
        rows += bench_varlen(n_img, patches, seg, 2 if tiny else 16, 80, dtype, device)
    rows += bench_ops(*((7, 48, 64) if tiny else (4096, 3584, 18944)), shape, dtype, device)

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"# {device_name}, {args.dtype}, median ms")
    print(f"{'kernel':32} {'triton':>9} {'baseline':>12} {'base ms':>9} {'speedup':>8}  note")
    for name, t, base, t_base, note in rows:
        print(f"{name:32} {t:9.3f} {base:>12} {t_base:9.3f} {t_base / t:7.2f}x  {note}")


if __name__ == "__main__":
    main()
