"""Time a long causal prefill chunk after cached context: our paged Triton kernel vs the SDPA
route (`causal_sdpa.attend`), at Qwen2.5-VL-7B's decoder heads (28 q / 4 kv, head dim 128).

    python scripts/bench_causal_sdpa.py                       # CUDA, bf16, the cases below
    python scripts/bench_causal_sdpa.py --cases 16384:16384,32768:5538   # context:chunk
    python scripts/bench_causal_sdpa.py --tiny                # smoke test (CPU: interpreted)

Per case: kernel and route ms (do_bench medians), the route's parts (gather of the context's
K/V from the pages, chunk vs context SDPA, chunk vs itself SDPA, LSE merge; the copies of the
fused-qkv views to contiguous are the rest), the route's first call (cold: cuDNN builds a graph
for each new shape), TFLOP/s of the causal work, the fused backends torch picked and
max |route - kernel|. A 64-frame 720p video (38306 tokens) prefills as 16384 fresh,
16384 after 16384 and 5538 after 32768.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test, CPU ok)")
ARGS.add_argument("--cases", help="context:chunk pairs, comma-separated")
CASES = "0:16384,16384:16384,16384:6144,32768:16384,32768:6144,32768:5538"
TINY_CASES = "0:24,37:24,64:40"

if __name__ == "__main__" and "--tiny" in sys.argv:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from bench_kernels import bench_ms, paged_batch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from polymodal.llm_core.attention import causal_sdpa  # noqa: E402
from polymodal.llm_core.attention.sdpa_shapes import SdpaShapes  # noqa: E402
from polymodal.llm_core.attention.spec import AttentionSpec  # noqa: E402
from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend  # noqa: E402


def bench_case(context: int, chunk: int, shape, dtype, device) -> str:
    heads, kv_heads, head_dim = shape
    q, cache, meta = paged_batch([chunk], [context + chunk], *shape, dtype, device)
    page, table = cache.shape[2], meta.block_tables[0]
    pos = torch.arange(context, context + chunk, device=device)
    meta.slot_mapping = table[pos // page].long() * page + pos % page
    # q / k / v as the decoder gives them: views of one fused projection
    qkv = torch.randn(chunk, heads + 2 * kv_heads, head_dim, device=device, dtype=dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], 1)
    backend = TritonAttentionBackend()
    backend.store_kv(k, v, cache, meta.slot_mapping)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5)

    def route():
        return causal_sdpa.attend(q, k, v, cache, meta, spec, context, SdpaShapes("exact"))

    def kernel():
        return backend.paged_attention(q, cache, meta, spec)

    start = time.perf_counter()
    out = route()  # cold: cuDNN builds a graph per (chunk, context) shape; Triton compiles once
    if device == "cuda":
        torch.cuda.synchronize()
    t_first = (time.perf_counter() - start) * 1e3
    if out is None:
        return f"{context:6d} {chunk:6d}  not routed: torch picks neither cuDNN nor flash here"
    diff = (out.float() - kernel().float()).abs().max().item()
    t_kernel, t_route = bench_ms(kernel), bench_ms(route)
    qb, kb, vb = (_contiguous(x) for x in (q, k, v))
    own = causal_sdpa._lse_attention(qb, kb, vb, causal=True)
    names, parts = [backend_name(qb, kb, vb, True)], ""
    if context:
        k_old, v_old = causal_sdpa.gather_context(cache, table, context)
        kob, vob = _contiguous(k_old), _contiguous(v_old)
        old = causal_sdpa._lse_attention(qb, kob, vob, causal=False)
        o_old, l_old = old(qb, kob, vob, False, spec.scale)[:2]
        o_new, l_new = own(qb, kb, vb, True, spec.scale)[:2]
        merge_args = (
            o_old[0].transpose(0, 1),
            l_old.reshape(heads, chunk),
            o_new[0].transpose(0, 1),
            l_new.reshape(heads, chunk),
        )
        times = [
            bench_ms(lambda: causal_sdpa.gather_context(cache, table, context)),
            bench_ms(lambda: old(qb, kob, vob, False, spec.scale)),
            bench_ms(lambda: own(qb, kb, vb, True, spec.scale)),
            bench_ms(lambda: causal_sdpa.merge_partials(*merge_args)),
        ]
        parts = " ".join(f"{t:7.3f}" for t in times)
        names.insert(0, backend_name(qb, kob, vob, False))
    flops = 4 * heads * head_dim * (chunk * context + chunk * chunk / 2)
    return (
        f"{context:6d} {chunk:6d} {t_kernel:9.3f} {t_route:9.3f} {t_kernel / t_route:7.2f}x"
        f" {t_first:9.1f}"
        f" {flops / t_kernel / 1e9:7.1f} {flops / t_route / 1e9:7.1f}  {'/'.join(names):>22}"
        f" {diff:8.1e}  {parts}"
    )


def _contiguous(x):
    return causal_sdpa._rows([(0, x)], x.shape[0])


def backend_name(q, k, v, causal: bool) -> str:
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, causal, enable_gqa=True)
    return SDPBackend(choice).name.removesuffix("_ATTENTION").lower()


def main() -> None:
    args = ARGS.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = (4, 2, 32) if args.tiny else (28, 4, 128)  # q heads, kv heads, head_dim
    cases = args.cases or (TINY_CASES if args.tiny else CASES)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"# {device_name}, {dtype}, heads {shape}, torch {torch.__version__}, median ms")
    print(
        f"{'ctx':>6} {'chunk':>6} {'kernel':>9} {'route':>9} {'speedup':>8} {'1st call':>9}"
        f" {'TF/s k':>7}"
        f" {'TF/s r':>7}  {'sdpa (ctx/own)':>22} {'max diff':>8}  gather ctx-sdpa own-sdpa merge"
    )
    for pair in cases.split(","):
        context, chunk = (int(x) for x in pair.split(":"))
        print(bench_case(context, chunk, shape, dtype, device), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
