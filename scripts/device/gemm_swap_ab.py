"""Issue 18: a VL family's bench (`polymodal bench MODEL --dummy-weights --skip-hf`) with the
16-bit linears of ROWS rows computed as the swapped product `(W @ x^T)^T` (cuBLAS then tiles
the tokens as its m side; `F.linear` has them as n) or as `F.linear` (the default), one
variant a process. For Gemma 3's 287-row prefill GEMMs at ~70% of the roofline
(`scripts/bench_gemm_rows.py` times the linears alone).

    python3 scripts/device/gemm_swap_ab.py swapped|linear [MODEL] [LO-HI]
"""

import sys

import torch

from polymodal.cli import main
from polymodal.llm_core.layers import linear

variant = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "gemma-3-12b-it"
lo, hi = (int(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "129-1024").split("-"))
apply = linear.UnquantizedLinearMethod.apply


def swapped(self, layer, x, silu_mul=False, residual=None):
    rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else 0
    if not (lo <= rows <= hi and x.is_cuda) or self.uses_gemv(layer, x):
        return apply(self, layer, x, silu_mul=silu_mul, residual=residual)
    if silu_mul:
        x = linear.silu_and_mul(x)
    out = (layer.weight @ x.t()).t().contiguous()
    return out if layer.bias is None else out + layer.bias


if variant == "swapped":
    linear.UnquantizedLinearMethod.apply = swapped
print(f"== {variant} ({model}, rows {lo}-{hi})", flush=True)
main(["bench", model, "--dummy-weights", "--skip-hf", "--images", "32"])
