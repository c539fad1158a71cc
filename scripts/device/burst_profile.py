"""Thirty-seventh session (issue 13): what a fresh server's first burst does that its second
does not. `polymodal serve` (the serve bench's checkpoint: Qwen2.5-VL-7B's shape, random
weights) with `VLLM_TORCH_PROFILER_DIR`, warmed as the bench warms it, then two bursts of 256
fresh streamed image requests, each recorded by the engine process's torch profiler
(`/start_profile` .. `/stop_profile`); for each trace: the window, the GPU's busy share, the
CUDA runtime calls that only a first burst should make (allocations, graph captures, module
loads), the host ops with the most self time, and the kernels with the most time.

    python3 scripts/device/burst_profile.py [REQUESTS]
"""

import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

from polymodal.bench import resolve_bench_model
from polymodal.bench.paths import user_checkpoint, write_jpegs
from polymodal.bench.serve import burst, burst_from_processes, data_url, start_server, summarize

FIRST_ONLY = ("cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cudaGraph",
              "cuModule", "cuLibrary", "cudaStreamCreate", "cudaEventCreate", "cuMemCreate",
              "cuMemMap", "cudaHostRegister")  # fmt: skip


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1.0
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def summarize_trace(path: str, label: str) -> None:
    events = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    window = (end - start) / 1e3
    gpu = busy_ms([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    print(f"\n== {label}: window {window:.0f} ms, GPU busy {gpu:.0f} ms ({gpu / window:.0%})")
    runtime = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            runtime[e["name"]][0] += 1
            runtime[e["name"]][1] += e["dur"] / 1e3
    print("runtime calls (count, ms):")
    for name, (n, ms) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {name:40s} {n:7d} {ms:9.1f}")
    for name, (n, ms) in sorted(runtime.items()):
        if name.startswith(FIRST_ONLY):
            print(f"  first-only? {name:28s} {n:7d} {ms:9.1f}")
    ops = Counter()
    for e in events:
        if e.get("cat") == "cpu_op":
            ops[e["name"]] += e["dur"] / 1e3
    print("host ops by total ms (incl. children):")
    for name, ms in ops.most_common(12):
        print(f"  {name[:60]:60s} {ms:9.1f}")
    per_kernel = Counter()
    for e in kernels:
        per_kernel[e["name"][:60]] += e["dur"] / 1e3
    print("kernels by ms:")
    for name, ms in per_kernel.most_common(10):
        print(f"  {name:60s} {ms:9.1f}")
    threads = Counter()
    for e in events:
        if e.get("cat") == "cpu_op":
            threads[e.get("tid")] += e["dur"] / 1e3
    print("host op ms by thread:", ", ".join(f"{t}: {ms:.0f}" for t, ms in threads.most_common(6)))


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    traces = Path(os.environ.get("OUT", "/tmp")) / "traces"
    os.environ["VLLM_TORCH_PROFILER_DIR"] = str(traces)
    work = Path(tempfile.mkdtemp(prefix="burst-profile-"))
    ckpt, dummy = user_checkpoint(resolve_bench_model("qwen2.5-vl-7b"), work)
    port = 8123
    server = start_server(ckpt, True, port)
    base = f"http://127.0.0.1:{port}"
    try:
        warm = write_jpegs(work / "warm", 8, seed=8)
        asyncio.run(burst(port, [data_url(p) for p in warm], 8))
        paths = []
        for b in range(2):
            urls = [data_url(p) for p in write_jpegs(work / f"j{b}", requests, seed=7 + 10 * b)]
            httpx.post(f"{base}/start_profile", timeout=60).raise_for_status()
            started = time.perf_counter()
            runs = burst_from_processes(port, urls, 128, 8)
            wall = time.perf_counter() - started
            stop = httpx.post(f"{base}/stop_profile", timeout=600)
            stop.raise_for_status()
            s = summarize(runs)
            print(f"burst {b + 1}: {s['requests_s']:.1f} requests/s, TTFT p50 "
                  f"{s['ttft_p50_ms']:.0f} ms, p99 {s['ttft_p99_ms']:.0f}; wall {wall:.1f} s",
                  flush=True)  # fmt: skip
            paths.append(sorted(traces.glob("*.json"), key=os.path.getmtime)[-1])
    finally:
        server.terminate()
        server.wait(timeout=60)
    for b, path in enumerate(paths):
        summarize_trace(str(path), f"burst {b + 1}")
        path.unlink()


if __name__ == "__main__":
    main()
