"""Vision towers' full attention at odd head dims (issue 18's TTFTs): torch SDPA per backend
at the head dim as is and zero-padded to 80 / 96 / 128 (zero q / k columns leave q.k alone;
zero v columns give zero outputs, sliced off), so the fastest is known before the towers pad.
Prints one row a shape: us and TFLOP/s per (backend, padded dim); "-" where a backend refuses.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from polymodal.bench.timing import graph_ms

SHAPES = {  # (batch, heads, tokens, head dim)
    "gemma3 siglip 896px": (1, 16, 4096, 72),
    "llama4 vision 5 tiles": (5, 16, 577, 88),
    "qwen2.5-vl 1080p full": (1, 16, 10472, 80),
    "qwen2.5-vl 4K full": (1, 16, 42336, 80),
    "pixtral 448px": (1, 16, 784, 64),
}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip


def padded(t: torch.Tensor, d: int) -> torch.Tensor:
    return t if t.shape[-1] == d else F.pad(t, (0, d - t.shape[-1]))


for name, (b, h, s, d) in SHAPES.items():
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * b * h * s * s * d
    scale = d**-0.5  # the unpadded head's
    cells = []
    for dim in sorted({d} | {x for x in (80, 96, 128) if x > d}):
        qp, kp, vp = (padded(t, dim) for t in (q, k, v))
        for label, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(qp, kp, vp, scale=scale)[..., :d]
                    err = (out.float() - ref).abs().max().item()
                    ms = graph_ms(partial(F.scaled_dot_product_attention, qp, kp, vp, scale=scale))
                cells.append(f"{label}/{dim} {ms * 1e3:.0f}us {flops / ms / 1e9:.0f}TF e{err:.0e}")
            except RuntimeError:
                cells.append(f"{label}/{dim} -")
    print(f"sdpa {name} {b}x{h}x{s}x{d}: " + " | ".join(cells))
