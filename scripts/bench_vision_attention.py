"""Time the Triton varlen attention at vision-tower sizes: a head dim run in two power-of-2
parts (`triton_prefill.head_dim_split`, the default: 80 = 64 + 16) against the same kernel on
one part padded to a power of 2 (80 -> 128, as before the split) and dense SDPA.

    python scripts/bench_vision_attention.py            # CUDA: do_bench medians, bf16
    python scripts/bench_vision_attention.py --tiny     # tiny shapes; on CPU interpreted

Cases (16 heads): Qwen2.5-VL's 3840x2160 image (42,196 patches, one full-attention segment),
64-frame video segments of 4784 patches, 1024-patch images and their 64-patch windows; head
dims 80 (Qwen2-VL / 2.5-VL), 72 (SigLIP-so400m), 88 (Llama 4), 96.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--tiny" in sys.argv:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from bench_kernels import bench_ms  # noqa: E402

from polymodal.llm_core.attention import triton_prefill  # noqa: E402

CASES = [  # (name, segments, segment length, head_dim)
    ("3840x2160 full", 1, 42_196, 80),
    ("video frames", 8, 4784, 80),
    ("images 1024", 4, 1024, 80),
    ("windows 64", 64, 64, 80),
    ("windows 64 x660", 660, 64, 80),  # a 4K image's window layers
    ("segments 256", 64, 256, 80),
    ("segments 512", 32, 512, 80),
    ("siglip 4096", 4, 4096, 72),
    ("llama4 frames", 8, 4784, 88),
    ("d96 frames", 8, 4784, 96),
]
TINY = [("tiny full", 2, 40, 80), ("tiny windows", 5, 8, 80), ("tiny d72", 2, 33, 72)]


def flash_varlen():
    """torch's flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`), or None
    where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def bench_case(n_seg, seg, head_dim, heads, dtype, device):
    """(split ms, padded ms, sdpa ms, flash varlen ms or nan, max |split - padded|, max |flash -
    split|) over `n_seg` segments of `seg`; CUDA-graph replays on CUDA (no launch overhead)."""
    cu = torch.arange(0, n_seg * seg + 1, seg, device=device).int()
    q, k, v = (torch.randn(n_seg * seg, heads, head_dim, device=device, dtype=dtype) for _ in "qkv")
    graph = device == "cuda"

    def run():
        return triton_prefill.varlen_attention(q, k, v, cu, seg, head_dim**-0.5)

    split = triton_prefill.head_dim_split
    out, t_split = run(), bench_ms(run, graph)
    triton_prefill.head_dim_split = lambda d: (triton.next_power_of_2(d), 0)
    try:
        padded, t_pad = run(), bench_ms(run, graph)
    finally:
        triton_prefill.head_dim_split = split
    qb, kb, vb = (x.view(n_seg, seg, heads, head_dim).transpose(1, 2) for x in (q, k, v))
    t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb), graph)
    t_flash, flash_diff, varlen = float("nan"), float("nan"), flash_varlen()
    if varlen is not None and device == "cuda":

        def run_flash():
            return varlen(q, k, v, cu, cu, seg, seg, scale=head_dim**-0.5)

        flash_diff = (run_flash().float() - out.float()).abs().max().item()
        t_flash = bench_ms(run_flash, graph)
    diff = (out.float() - padded.float()).abs().max().item()
    return t_split, t_pad, t_sdpa, t_flash, diff, flash_diff


def main() -> None:
    tiny = "--tiny" in sys.argv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    heads = 2 if tiny else 16
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"# {name}, {dtype}, {heads} heads, median ms; TFLOP/s of useful work (d columns)")
    head = f"{'case':16} {'d':>4} {'parts':>7} {'split':>8} {'padded':>8} {'gain':>6} "
    print(head + f"{'sdpa':>8} {'flash':>8} {'TFLOP/s':>8} {'max diff':>9} {'flash diff':>10}")
    for case, n_seg, seg, head_dim in TINY if tiny else CASES:
        t, t_pad, t_sdpa, t_flash, diff, flash_diff = bench_case(
            n_seg, seg, head_dim, heads, dtype, device
        )
        parts = "+".join(str(p) for p in triton_prefill.head_dim_split(head_dim) if p)
        tflops = 4 * n_seg * seg * seg * heads * head_dim / t / 1e9
        row = f"{case:16} {head_dim:4d} {parts:>7} {t:8.3f} {t_pad:8.3f} {t_pad / t:5.2f}x "
        print(row + f"{t_sdpa:8.3f} {t_flash:8.3f} {tflops:8.1f} {diff:9.1e} {flash_diff:10.1e}")


if __name__ == "__main__":
    main()
