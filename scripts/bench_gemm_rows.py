"""Time a decoder's linears at one prefill's row count (a single image's prompt: Gemma 3's 287,
Qwen2.5-VL's 290, Pixtral's 827) where the product sits near the roofline's ridge, against
the larger of FLOPs at the measured matrix rate and the weights at the copy rate: cuBLAS's
pick (`F.linear`), the swapped product (`(W @ x^T)^T`, the weights as the long side of the
tile), and the rows padded to a multiple of 64 / 128 (what a tile pays for a partial last row
block). Weights rotate over more copies than L2 holds, as a prefill reads each once.

    python scripts/bench_gemm_rows.py                       # gemma-3-12b at 287 rows
    python scripts/bench_gemm_rows.py --model qwen2.5-vl-7b --rows 290,2725
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from polymodal.bench.engine import measure_bandwidth
from polymodal.bench.media import matmul_tflops
from polymodal.bench.timing import graph_ms

MODELS = {  # decoder linears (N, K)
    "gemma-3-12b": {
        "qkv": (8192, 3840),
        "o": (3840, 4096),
        "gate_up": (30720, 3840),
        "down": (3840, 15360),
    },  # fmt: skip
    "qwen2.5-vl-7b": {
        "qkv": (4608, 3584),
        "o": (3584, 3584),
        "gate_up": (37888, 3584),
        "down": (3584, 18944),
    },  # fmt: skip
    "pixtral-12b": {
        "qkv": (6144, 5120),
        "o": (5120, 4096),
        "gate_up": (28672, 5120),
        "down": (5120, 14336),
    },  # fmt: skip
}
ROTATE_BYTES = 256 << 20  # > L2 (50-60 MB) several times


def time_shape(m: int, n: int, k: int) -> list[float]:
    """us of F.linear, the swapped product, the rows padded to 64 and to 128."""
    copies = max(1, -(-ROTATE_BYTES // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    # outputs ~ sqrt(K) in size: bf16 rounds them by up to ~sqrt(K) / 128
    torch.testing.assert_close((weights[0] @ x.t()).t(), F.linear(x, weights[0]), rtol=2e-2,
                               atol=0.02 * k**0.5)  # fmt: skip
    turn = itertools.count()

    def timed(fn) -> float:  # fn(weight), a different copy each call of the graph
        return graph_ms(lambda: fn(weights[next(turn) % copies]), rep=50) * 1e3

    cols = [timed(lambda w: F.linear(x, w)), timed(lambda w: (w @ x.t()).t().contiguous())]
    for pad in (64, 128):
        xp = torch.randn(-(-m // pad) * pad, k, device="cuda", dtype=torch.bfloat16)
        cols.append(timed(lambda w, xp=xp: F.linear(xp, w)))
    return cols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="gemma-3-12b")
    parser.add_argument("--rows", default="287")
    args = parser.parse_args()
    peak, bandwidth = matmul_tflops() * 1e12, measure_bandwidth()
    print(f"bf16 GEMM {peak / 1e12:.0f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s")
    print(f"{'linear':<8} {'rows':>5} {'floor us':>9} {'F.linear':>9} {'swapped':>9} "
          f"{'pad 64':>9} {'pad 128':>9}  (us; the floor's share of F.linear)")  # fmt: skip
    for m in (int(r) for r in args.rows.split(",")):
        layer = [0.0] * 5
        for name, (n, k) in MODELS[args.model].items():
            floor = max(2 * m * n * k / peak, n * k * 2 / bandwidth) * 1e6
            row = [floor, *time_shape(m, n, k)]
            layer = [a + b for a, b in zip(layer, row)]
            print(f"{name:<8} {m:>5} " + " ".join(f"{c:9.1f}" for c in row)
                  + f"  {100 * floor / row[1]:.0f}%")  # fmt: skip
        print(f"{'layer':<8} {m:>5} " + " ".join(f"{c:9.1f}" for c in layer)
              + f"  {100 * layer[0] / layer[1]:.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
