"""What a NEW attention shape costs: the first and the second call (synchronized wall ms) of
cuDNN SDPA, torch's flash backend and our Triton kernel at lengths none of them has seen in
this process, after one warm-up call of each (its one-time costs shown on the first line).

    python scripts/bench_sdpa_shapes.py            # CUDA, bf16 (about a minute)
    python scripts/bench_sdpa_shapes.py --tiny     # smoke test (CPU: interpreted, n/a for cuDNN)

Cases (Qwen2.5-VL-7B sizes): the decoder's fresh causal prefill (28 / 4 heads, d 128); a chunk
after cached context (`causal_sdpa.attend`: gather, chunk vs context, chunk vs itself, merge;
flash and cuDNN as torch picks them under `sdpa_kernel`, Triton the paged kernel); the tower's
full attention (16 heads, d 80, segments of one image's or a frame pair's patches). Columns
"bucket": the route as the engine runs it (`SdpaShapes("first")`: lengths padded to buckets,
a plan built on a bucket's first sight): a length whose bucket an earlier row built costs no
build (2950 after 2900; the tower's non-causal shapes are never padded: not timed).
A first call far above its second is a per-shape build; equal calls mean no per-shape cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test, CPU ok)")

if __name__ == "__main__" and "--tiny" in sys.argv:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import paged_batch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from polymodal.llm_core.attention import causal_sdpa, triton_prefill  # noqa: E402
from polymodal.llm_core.attention.sdpa_shapes import SdpaShapes  # noqa: E402
from polymodal.llm_core.attention.spec import AttentionSpec  # noqa: E402
from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DECODER = (28, 4, 128)  # q heads, kv heads, head dim
TOWER = (16, 16, 80)
CAUSAL = [1100, 1500, 2900, 2950, 5000, 9000]  # fresh prompt lengths
CONTEXT = [(3000, 4096), (7000, 4096), (12000, 2500)]  # (cached context, chunk)
SEGMENTS = [(1, 4356), (1, 8040), (1, 10764), (2, 4784), (1, 14400)]  # (segments, patches)
TINY = ([40, 56, 57], [(37, 24), (70, 17)], [(1, 48), (2, 40)])
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def wall_ms(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def twice(fn) -> str:
    """'first / second' ms of `fn`, or n/a where it cannot run (no such backend here)."""
    try:
        return f"{wall_ms(fn):8.1f} /{wall_ms(fn):7.2f}"
    except RuntimeError as exc:  # sdpa_kernel: "No available kernel"
        return f"{'n/a':>17}" if "kernel" in str(exc).lower() else f"{'error':>17}"


def pinned(backend, fn):
    """`fn` with torch's SDPA limited to one backend."""

    def run():
        with sdpa_kernel([backend]):
            return fn()

    return run


def fresh_case(n: int, shape, dtype, device) -> dict:
    heads, kv_heads, d = shape
    q, k, v = (
        torch.randn(n, h, d, device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads)
    )
    qb, kb, vb = (x[None].transpose(1, 2) for x in (q, k, v))  # contiguous [t, h, d] rows

    def sdpa():
        return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)

    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    spec = AttentionSpec(heads, kv_heads, d, d**-0.5)
    row = {name: twice(pinned(b, sdpa)) for name, b in BACKENDS.items()}
    row["triton"] = twice(lambda: triton_prefill.varlen_attention(q, k, v, cu, n, d**-0.5, True))
    # a fresh chunk reads neither the cache nor the metadata
    row["bucket"] = twice(lambda: causal_sdpa.attend(q, k, v, None, None, spec, 0, BUCKETED))
    return row


def context_case(context: int, chunk: int, shape, dtype, device) -> dict:
    heads, kv_heads, d = shape
    q, cache, meta = paged_batch([chunk], [context + chunk], *shape, dtype, device)
    k, v = (torch.randn(chunk, kv_heads, d, device=device, dtype=dtype) for _ in "kv")
    spec = AttentionSpec(heads, kv_heads, d, d**-0.5)
    exact = SdpaShapes("exact")

    def route():
        out = causal_sdpa.attend(q, k, v, cache, meta, spec, context, exact)
        if out is None:
            raise RuntimeError("no available kernel: torch picks neither cuDNN nor flash")
        return out

    row = {name: twice(pinned(b, route)) for name, b in BACKENDS.items()}
    kernel = TritonAttentionBackend(causal_sdpa=False)
    row["triton"] = twice(lambda: kernel.paged_attention(q, cache, meta, spec))
    row["bucket"] = twice(lambda: causal_sdpa.attend(q, k, v, cache, meta, spec, context, BUCKETED))
    return row


def segments_case(segments: int, patches: int, shape, dtype, device) -> dict:
    heads, _, d = shape
    total = segments * patches
    q, k, v = torch.randn(total, 3, heads, d, device=device, dtype=dtype).unbind(1)
    view = [segments, patches, heads, d]
    qb, kb, vb = (x.view(view).transpose(1, 2) for x in (q, k, v))  # as varlen_attention

    def sdpa():
        return F.scaled_dot_product_attention(qb, kb, vb, scale=d**-0.5)

    cu = torch.arange(segments + 1, device=device, dtype=torch.int32) * patches
    row = {name: twice(pinned(b, sdpa)) for name, b in BACKENDS.items()}
    row["triton"] = twice(lambda: triton_prefill.varlen_attention(q, k, v, cu, patches, d**-0.5))
    row["bucket"] = f"{'-':>17}"
    return row


BUCKETED = SdpaShapes("first")


def main() -> None:
    args = ARGS.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    causal, context, segments = TINY if args.tiny else (CAUSAL, CONTEXT, SEGMENTS)
    decoder, tower = ((4, 2, 32), (4, 4, 80)) if args.tiny else (DECODER, TOWER)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    version = torch.backends.cudnn.version() if device == "cuda" else None
    print(f"# {name}, {dtype}, torch {torch.__version__}, cuDNN {version}")
    print("# synchronized wall ms, first / second call of each new shape")
    head = f"{'case':28s} {'cudnn':>17} {'flash':>17} {'triton':>17} {'bucket (route)':>17}"
    print(head)
    # one warm-up call of each at shapes of their own: one-time costs (libraries, compiles)
    first = 30 if args.tiny else 1030
    _print(f"warm-up causal {first}", fresh_case(first, decoder, dtype, device))
    _print(f"warm-up chunk {first} after 700", context_case(700, first, decoder, dtype, device))
    _print(f"warm-up tower 1x{first + 20}", segments_case(1, first + 20, tower, dtype, device))
    for n in causal:
        _print(f"causal {n}", fresh_case(n, decoder, dtype, device))
    for c, n in context:
        _print(f"chunk {n} after {c}", context_case(c, n, decoder, dtype, device))
    for s, p in segments:
        _print(f"tower {s}x{p} d{tower[2]}", segments_case(s, p, tower, dtype, device))


def _print(title: str, row: dict) -> None:
    print(f"{title:28s} {row['cudnn']} {row['flash']} {row['triton']} {row['bucket']}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
