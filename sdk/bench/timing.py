"""CUDA-graph timing for the kernel benches (`scripts/bench_*.py`): the one way they time."""

from __future__ import annotations

import torch


def graph_ms(fn, rep: int = 100) -> float:
    """Median milliseconds of `fn()` replayed from a CUDA graph (`do_bench_cudagraph`).

    `do_bench_cudagraph` runs `fn` on a fresh stream that does not wait for the current one, so
    without the synchronize its first (eager) call races whatever was just queued: inputs made
    by `torch.randn`, or a `moe_decode.route` launch whose expert ids `experts` then reads
    unwritten (an illegal memory access in `bench_moe.py --sweep`, at Mixtral's first call
    after Qwen3's sweep, where stale ids from Qwen3's 128 experts meet Mixtral's 8), and two
    kernels sharing the arrival counters (`counters.py`) run at once."""
    import triton.testing

    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
