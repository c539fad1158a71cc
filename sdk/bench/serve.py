"""`polymodal bench --workload serve`: the real server under a burst of streamed requests.

One run: N 448x448 JPEGs as data: URLs, each asked for `--output-tokens` tokens (temperature 0,
`ignore_eos`). First the offline rate of exactly those requests (`LLM.generate` in this
process), then `polymodal serve` started as a user starts it (a subprocess), warmed with a few
requests, and the N requests sent at once as streamed `/v1/chat/completions` over HTTP by 8 client
processes (one would be the bottleneck itself); with `--bursts B`, B such bursts one after
another, each of its own fresh images (the first pays what a new server process pays once:
cuDNN plans and tower graphs of new batch compositions; later ones show a warm server).
Reported (per burst; the first is the headline): requests/s and output tokens/s (first
request sent to last response done), TTFT (request sent to first content chunk)
percentiles and deciles, inter-chunk latency percentiles, the server's rate as a share of
the offline one, and where the server says the TTFT went (its `/metrics`: arrival to first
token, queued in the engine, first step to first token).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from polymodal.bench.paths import in_child, user_checkpoint, write_jpegs

PROMPT = "Describe this image in detail."
CLIENT_PROCESSES = 8  # the client's own share of the host: 8 processes x 32 streams


def data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def messages(url: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    return [{"role": "user", "content": content}]


def offline_rate(ckpt: Path, dummy: bool, urls: list[str], tokens: int) -> dict:
    """The same requests through `LLM.generate` (processing overlapped, a full batch)."""
    import torch

    from polymodal.llm import LLM
    from polymodal.llm_core.sampling_params import SamplingParams

    llm = LLM(str(ckpt), dummy_weights=dummy)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate([messages(u) for u in urls[:8]], params)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate([messages(u) for u in urls], params)
    seconds = time.perf_counter() - start
    generated = sum(o.usage.completion_tokens for o in outs)
    return {"requests_s": len(urls) / seconds, "output_tokens_s": generated / seconds}


async def one_request(client, url: str, tokens: int) -> dict:
    """Send one streamed chat request; the times of its chunks."""
    body = {
        "model": "bench",
        "messages": messages(url),
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    chunk_times, usage = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"in-band error: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            if any(c["delta"].get("content") for c in event.get("choices", [])):
                chunk_times.append(time.monotonic())
    return {"sent": sent, "chunks": chunk_times, "done": time.monotonic(), "usage": usage}


async def burst(port: int, urls: list[str], tokens: int, start_at: float = 0.0) -> list[dict]:
    """Send every request at once (at `start_at` on the monotonic clock, if given)."""
    import httpx

    limits = httpx.Limits(max_connections=len(urls) + 8)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=600) as client:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        return await asyncio.gather(*(one_request(client, u, tokens) for u in urls))


def _client_process(port: int, urls: list[str], tokens: int, start_at: float) -> list[dict]:
    return asyncio.run(burst(port, urls, tokens, start_at))


def burst_from_processes(port: int, urls: list[str], tokens: int, processes: int) -> list[dict]:
    """The burst sent by `processes` client processes together: one Python client parsing
    every stream's events itself falls behind the server at a few hundred streams (its own
    event loop then delays the chunk times it records)."""
    import multiprocessing

    shares = [urls[i::processes] for i in range(processes)]
    start_at = time.monotonic() + 3.0  # every client connected and waiting by then
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.starmap(_client_process, [(port, s, tokens, start_at) for s in shares])
    return [run for part in parts for run in part]


def start_server(ckpt: Path, dummy: bool, port: int, extra: str = "") -> subprocess.Popen:
    """`polymodal serve` as a user starts it (plus the options in `extra`, shell-split);
    returns once /health answers."""
    import httpx

    cmd = [sys.executable, "-m", "polymodal.cli", "serve", str(ckpt), "--port", str(port)]
    cmd += ["--served-model-name", "bench", "--log-level", "warning"]
    cmd += ["--load-format", "dummy"] if dummy else []
    cmd += shlex.split(extra)
    server = subprocess.Popen(cmd)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"polymodal serve exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("polymodal serve did not answer /health within 900 s")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def histogram_buckets(metrics_text: str, name: str) -> list[tuple[float, float]]:
    """A Prometheus histogram's cumulative buckets in `/metrics` text: (upper edge, count)."""
    buckets = []
    prefix = f"{name}_bucket{{"
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            labels, value = line[len(prefix) :].rsplit("} ", 1)
            le = dict(kv.split("=", 1) for kv in labels.split(","))["le"].strip('"')
            buckets.append((float(le), float(value)))
    return sorted(buckets)


def histogram_quantiles(
    metrics_text: str, name: str, qs=(0.1, 0.5, 0.9), since: str | None = None
) -> dict | None:
    """Quantiles (seconds) of a Prometheus histogram in `/metrics` text, interpolated linearly
    inside the bucket each falls in (as PromQL's histogram_quantile); None if it is empty.
    `since`: an earlier `/metrics` text, whose counts are taken off (what happened between)."""
    buckets = histogram_buckets(metrics_text, name)
    if since is not None:
        before = dict(histogram_buckets(since, name))
        buckets = [(le, count - before.get(le, 0.0)) for le, count in buckets]
    if not buckets or buckets[-1][1] == 0:
        return None
    total, out = buckets[-1][1], {}
    for q in qs:
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                share = (rank - below) / (count - below) if count > below else 1.0
                out[f"p{round(q * 100)}"] = lower + share * (upper - lower)
                break
            lower, below = upper, count
    return out


def metrics_text(port: int) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text


def server_phases(port: int, since: str | None = None) -> dict:
    """Where the server says a request's time went (its `/metrics` histograms; since the
    `/metrics` text `since`, if given): arrival to first token, and its four parts: arrival to
    queued in the engine (parsing, media, hand-off), queued, first step to first token, first
    token to the handler."""
    text = metrics_text(port)
    names = {"ttft": "time_to_first_token_seconds",
             "preprocess": "request_preprocess_time_seconds",
             "queue": "request_queue_time_seconds", "prefill": "request_prefill_time_seconds",
             "delivery": "request_first_token_delivery_seconds"}  # fmt: skip
    return {
        key: histogram_quantiles(text, f"polymodal:{name}", since=since)
        for key, name in names.items()
    }


def summarize(runs: list[dict]) -> dict:
    start, end = min(r["sent"] for r in runs), max(r["done"] for r in runs)
    ttft = [(r["chunks"][0] - r["sent"]) * 1e3 for r in runs if r["chunks"]]
    gaps = [(b - a) * 1e3 for r in runs for a, b in zip(r["chunks"], r["chunks"][1:])]
    generated = sum((r["usage"] or {}).get("completion_tokens", 0) for r in runs)
    return {
        "requests_s": len(runs) / (end - start),
        "output_tokens_s": generated / (end - start),
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "ttft_deciles_ms": [percentile(ttft, q / 10) for q in range(1, 10)],
        "itl_p50_ms": statistics.median(gaps) if gaps else float("nan"),
        "itl_p99_ms": percentile(gaps, 0.99),
        "chunks_per_request": statistics.mean(len(r["chunks"]) for r in runs),
    }


def run_bench(args) -> dict:
    import torch

    from polymodal.bench import resolve_bench_model

    if not torch.cuda.is_available():
        raise SystemExit("polymodal bench needs a CUDA device")
    if args.bursts < 1:
        raise SystemExit(f"polymodal bench: --bursts must be at least 1, got {args.bursts}")
    work = Path(tempfile.mkdtemp(prefix="polymodal-bench-"))
    ckpt, dummy = user_checkpoint(resolve_bench_model(args.model), work)
    dummy = dummy or args.dummy_weights
    bursts = [
        [data_url(p) for p in write_jpegs(work / f"jpegs{b}", args.requests, seed=7 + 10 * b)]
        for b in range(args.bursts)
    ]
    urls = bursts[0]
    results = {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "model": str(args.model),
        "workload": "serve",
        "requests": args.requests,
        "output_tokens": args.output_tokens,
        "server_args": args.server_args,
        "bursts": args.bursts,
    }
    results["offline"] = in_child(offline_rate, ckpt, dummy, urls, args.output_tokens)
    server = start_server(ckpt, dummy, args.port, args.server_args)
    try:
        warm = write_jpegs(work / "warm", 8, seed=8)
        asyncio.run(burst(args.port, [data_url(p) for p in warm], 8))
        each, phases = [], []
        for burst_urls in bursts:
            before = metrics_text(args.port)
            runs = burst_from_processes(args.port, burst_urls, args.output_tokens, CLIENT_PROCESSES)
            each.append(summarize(runs))
            phases.append(server_phases(args.port, since=before))
        results["server"], results["server_phases_s"] = each[0], phases[0]
        results["server_bursts"], results["server_bursts_phases_s"] = each, phases
        results["client_processes"] = CLIENT_PROCESSES
    finally:
        server.terminate()
        server.wait(timeout=60)
    offline = results["offline"]["requests_s"]
    results["server_share_of_offline"] = results["server"]["requests_s"] / offline
    results["server_bursts_share_of_offline"] = [b["requests_s"] / offline for b in each]
    return results


def print_table(r: dict) -> None:
    s, o = r["server"], r["offline"]
    print(f"\n{r['card']}  {r['date']}  {r['model']}  (serve: {r['requests']} streamed requests)")
    print(f"{'':24s} {'server':>9s} {'offline':>9s}")
    print(f"{'requests/s':24s} {s['requests_s']:9.2f} {o['requests_s']:9.2f}")
    print(f"{'output tokens/s':24s} {s['output_tokens_s']:9.0f} {o['output_tokens_s']:9.0f}")
    print(f"server / offline: {r['server_share_of_offline']:.1%}")
    print(f"TTFT p50 {s['ttft_p50_ms']:.0f} ms, p99 {s['ttft_p99_ms']:.0f} ms")
    print("TTFT deciles (ms):", " ".join(f"{v:.0f}" for v in s["ttft_deciles_ms"]))
    for phase, q in (r.get("server_phases_s") or {}).items():
        if q:  # the server's own view: arrival -> first token, queued, first step -> token
            print(f"server {phase:8s} " + " ".join(f"{k} {v * 1e3:.0f} ms" for k, v in q.items()))
    print(f"inter-chunk p50 {s['itl_p50_ms']:.1f} ms, p99 {s['itl_p99_ms']:.1f} ms")
    bursts = r.get("server_bursts") or []
    if len(bursts) > 1:  # the same workload again on the warm server, fresh images each time
        print("each burst:  requests/s  vs offline  TTFT p50 / p99 ms  server queue p50 ms")
        for i, (b, share) in enumerate(zip(bursts, r["server_bursts_share_of_offline"])):
            queue = (r["server_bursts_phases_s"][i].get("queue") or {}).get("p50", float("nan"))
            ttft = f"{b['ttft_p50_ms']:7.0f} / {b['ttft_p99_ms']:5.0f}"
            rate = f"{b['requests_s']:10.2f}  {share:9.1%}"
            print(f"  burst {i + 1}  {rate}  {ttft}  {queue * 1e3:10.0f}")
