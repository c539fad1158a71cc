"""Thirty-seventh session (issue 13): what a fresh server's first burst does that its second
does not. `polymodal serve` (the serve bench's checkpoint: Qwen2.5-VL-7B's shape, random
weights) with `VLLM_TORCH_PROFILER_DIR`, warmed as the bench warms it, then two bursts of 256
fresh streamed image requests, each recorded by the engine process's torch profiler
(`/start_profile` .. `/stop_profile`); for each trace: the window, the GPU's busy share, the
CUDA runtime calls that only a first burst should make (allocations, graph captures, module
loads), the host ops with the most self time, and the kernels with the most time.

With `spy`, py-spy (carried in .whl) samples the server's processes instead, and the
functions whose samples grew most from the second burst to the first are printed.

    python3 scripts/device/burst_profile.py torch|spy|spyn|spygil [REQUESTS]

(spyn: py-spy --native; spygil: only the thread holding the GIL is sampled)
"""

import asyncio
import json
import os
import re
import subprocess
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
    longest = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: -e["dur"])
    print("longest single host ops (ms, ms into the window):")
    for e in longest[:8]:
        print(f"  {e['name'][:60]:60s} {e['dur'] / 1e3:8.1f} {(e['ts'] - start) / 1e3:8.0f}")
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


def spy_samples(path: Path) -> tuple[Counter, Counter]:
    """py-spy's raw stacks -> samples by leaf frame, and by function anywhere in the stack."""
    leaf, inclusive = Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        leaf[frames[-1][:100]] += int(n)
        for name in {re.sub(r" \(.*", "", f)[:80] for f in frames}:
            inclusive[name] += int(n)
    return leaf, inclusive


def print_spy_diff(first: Path, second: Path) -> None:
    (leaf1, inc1), (leaf2, inc2) = spy_samples(first), spy_samples(second)
    for label, a, b, n in (("leaf", leaf1, leaf2, 30), ("inclusive", inc1, inc2, 45)):
        print(f"\n== py-spy samples by {label} frame: burst 1, burst 2 (most grown first)")
        for name, count in sorted(a.items(), key=lambda kv: kv[1] - b.get(kv[0], 0))[::-1][:n]:
            print(f"  {count:6d} {b.get(name, 0):6d}  {name}")
    print("\n== py-spy samples by function anywhere in the stack: burst 1, burst 2 (most first)")
    for name, count in inc1.most_common(50):
        print(f"  {count:6d} {inc2.get(name, 0):6d}  {name}")


def main() -> None:
    mode = sys.argv[1]
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    traces = Path(os.environ.get("OUT", "/tmp")) / "traces"
    traces.mkdir(parents=True, exist_ok=True)
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
            out = traces / f"spy{b + 1}.txt"
            if mode == "torch":
                httpx.post(f"{base}/start_profile", timeout=60).raise_for_status()
            else:
                spy = subprocess.Popen(["py-spy", "record", "-p", str(server.pid), "--subprocesses",
                                        "-r", "250", "-d", "9", "--format", "raw", "-o", str(out),
                                        *{"spyn": ["--native"], "spygil": ["--gil"]}.get(mode, [])],
                                       stdout=subprocess.DEVNULL)  # fmt: skip
            started = time.perf_counter()
            runs = burst_from_processes(port, urls, 128, 8)
            wall = time.perf_counter() - started
            if mode == "torch":
                httpx.post(f"{base}/stop_profile", timeout=600).raise_for_status()
                paths.append(sorted(traces.glob("*.json"), key=os.path.getmtime)[-1])
            else:
                spy.wait()
                paths.append(out)
            s = summarize(runs)
            print(f"burst {b + 1}: {s['requests_s']:.1f} requests/s, TTFT p50 "
                  f"{s['ttft_p50_ms']:.0f} ms, p99 {s['ttft_p99_ms']:.0f}; wall {wall:.1f} s",
                  flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
    if mode != "torch":
        print_spy_diff(*paths)
        return
    for b, path in enumerate(paths):
        summarize_trace(str(path), f"burst {b + 1}")
        path.unlink()


if __name__ == "__main__":
    main()
