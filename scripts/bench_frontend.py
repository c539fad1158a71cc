"""The server's frontend alone, on the CPU: `polymodal serve`'s real stack with a fake model step.

What runs is the real server (`scripts/frontend_server.py`, a subprocess): the API process
(FastAPI on uvicorn, `create_app`, the same `serve_app` as `polymodal serve`), the engine
process (`EngineProcess`: feeder workers, engine thread, scheduler, sampler, detokenizer, the
output wire) and the pipe between them.
Only the model is fake, installed through `AsyncEngine(engine_setup=...)` in the engine
process: the decoder's forward returns its input embeddings and the vision tower returns
zeros (nothing is computed), and each engine step is paced to take `--period-ms` (27 ms: an
H200's decode step at ~250 rows of Qwen2.5-VL-7B), with the host's work inside that window as
when it overlaps the GPU. So every running request gets one token per period, and the ideal
rate is `streams / period` tokens/s once the batch is full. The engine's own host work per
step (scheduler, sampler, detokenizer: ~2 ms at 256 rows on a fast host) still runs, at this
machine's speed; `--engine synthetic` replaces it too (one token per request per step, the
outputs built as the engine builds them), leaving only the frontend's own work.

The burst: `--streams` streamed chat completions sent at once from `--clients` client
processes (plain asyncio protocols: they count SSE events without parsing JSON, so they cost
little of this machine), each asking `--tokens` tokens (temperature 0, `ignore_eos`), with a
small JPEG as a data: URL (`--kind image`) or text only (`--kind text`), `--repeats` times.

    python scripts/bench_frontend.py                        # both kinds, 256 streams, 3 repeats
    python scripts/bench_frontend.py --kind text --repeats 5 --json out.json
    python scripts/bench_frontend.py --engine synthetic     # no engine host work at all
    python scripts/bench_frontend.py --profile prof/        # + py-spy of both processes (on PATH)

Reported per burst (and the median over repeats): requests/s and tokens/s against the ideal
(the share: the ideal burst's wall time, every request in the first step, over the real one),
the steady share (events the clients got while every stream ran, over one per stream per
period: below 100% the frontend merged steps, it fell behind), the engine's step period,
TTFT p50/p99 (request sent to its first event), inter-event p50/p99, CPU seconds (and % of the
burst) of the API process, the engine process and the clients, CPU microseconds per token of
the server's two processes, and the engine's step record: steps that ended late (the host
took longer than the period: the engine waited for something), the engine thread's time
between steps (emit and commands), the median rows per step and when the batch was full.
Where the time to first token went, as means: the client's, the server's (its handler's
start to the first token: `/metrics`), and of that the engine's queue and prefill (the rest
is the pipe, the media workers and the engine thread's pick-up). With `--profile`, py-spy
samples both processes during the last burst (raw stacks per thread, for flame graphs) and
the share of time each thread ran is printed (`--profile-gil`: held the GIL).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from frontend_clients import bodies, client_process, http_request  # scripts/


# ---- measuring ------------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def step_record(step_log: Path, start: float, end: float, period_ms: float) -> dict:
    """The engine's steps inside [start, end]: late ones, time between steps, rows."""
    steps, running = [], []
    for line in step_log.read_text().splitlines():
        entered, worked, due, left, tokens, rows = line.split()
        if start <= float(entered) <= end:
            steps.append((float(entered), float(worked), float(due), float(left), int(tokens)))
            running.append(int(rows))
    if len(steps) < 2:
        return {}
    most = max(running)
    all_in = next(s[0] for s, r in zip(steps, running) if r == most)
    late = [w - d for _, w, d, _, _ in steps if w > d + 1e-3]
    between = [b[0] - a[3] for a, b in zip(steps, steps[1:])]
    full = [s for s in steps if s[4] >= 0.9 * max(s[4] for s in steps)]
    return {
        "steps": len(steps),
        "late_steps": len(late),
        "late_ms_max": max(late, default=0.0) * 1e3,
        "host_ms_p50": statistics.median(w - e for e, w, _, _, _ in steps) * 1e3,
        "host_ms_max": max(w - e for e, w, _, _, _ in steps) * 1e3,
        "between_steps_ms_p50": statistics.median(between) * 1e3,
        "between_steps_ms_max": max(between) * 1e3,
        "rows_p50": statistics.median(s[4] for s in steps),
        "max_running": most,
        "all_running_after_ms": (all_in - start) * 1e3,  # burst start to the full batch
        "all_running_at": all_in,
        "full_step_period_ms": statistics.median(b[0] - a[0] for a, b in zip(full, full[1:]))
        * 1e3 if len(full) > 1 else float("nan"),
    }  # fmt: skip


def summarize(runs: list[dict], args, cpu: dict, seconds: float) -> dict:
    start, end = min(r["sent"] for r in runs), max(r["done"] for r in runs)
    wall = end - start
    ttft = [(r["times"][0] - r["sent"]) * 1e3 for r in runs if r["times"]]
    gaps = []
    for r in runs:
        for i, (t, n) in enumerate(zip(r["times"], r["counts"])):
            if i:
                gaps.append((t - r["times"][i - 1]) * 1e3)
            gaps.extend([0.0] * (n - 1))
    tokens = sum(r["tokens"] for r in runs)
    ideal_tokens_s = args.streams / (args.period_ms / 1e3)
    # the ideal burst: every request in the first step, one token a step each
    ideal_wall = (args.tokens + 1) * args.period_ms / 1e3
    server_cpu = cpu["api"] + cpu["engine"]
    return {
        "ok": sum(r["ok"] for r in runs),
        "requests_s": len(runs) / wall,
        "tokens_s": tokens / wall,
        "share_of_ideal": ideal_wall / wall,
        "ideal_tokens_s": ideal_tokens_s,
        "ttft_p50_ms": statistics.median(ttft) if ttft else float("nan"),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "gap_p50_ms": statistics.median(gaps) if gaps else float("nan"),
        "gap_p99_ms": percentile(gaps, 0.99),
        "events_per_request": statistics.mean(sum(r["counts"]) for r in runs),
        "cpu_api_pct": 100 * cpu["api"] / seconds,
        "cpu_engine_pct": 100 * cpu["engine"] / seconds,
        "cpu_clients_pct": 100 * cpu["clients"] / seconds,
        "server_cpu_us_per_token": 1e6 * server_cpu / max(1, tokens),
        "api_cpu_us_per_token": 1e6 * cpu["api"] / max(1, tokens),
        "engine_cpu_us_per_token": 1e6 * cpu["engine"] / max(1, tokens),
    }


SERVER_PHASES = {  # /metrics histograms: where a request's time to first token went
    "server_ttft": "polymodal:time_to_first_token_seconds",  # HTTP handler start -> 1st token
    "engine_queue": "polymodal:request_queue_time_seconds",  # engine.add_request -> 1st step
    "engine_prefill": "polymodal:request_prefill_time_seconds",  # 1st step -> 1st token
}


def phase_sums(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of each `SERVER_PHASES` histogram."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out = {}
    for key, name in SERVER_PHASES.items():
        total = re.search(rf"^{re.escape(name)}_sum (\S+)$", text, re.M)
        count = re.search(rf"^{re.escape(name)}_count (\S+)$", text, re.M)
        out[key] = (float(total.group(1)), float(count.group(1))) if total and count else (0, 0)
    return out


def one_burst(args, server, engine_pid, requests, step_log, profile_dir=None) -> dict:
    import psutil

    phases = phase_sums(args.port)
    pool = multiprocessing.get_context("spawn").Pool(args.clients)
    shares = [requests[i :: args.clients] for i in range(args.clients)]
    client_pids = [p.pid for p in pool._pool]  # noqa: SLF001 - only to read their CPU time
    start_at = time.monotonic() + 2.0  # every client up and waiting by then
    jobs = pool.starmap_async(client_process, [(args.port, s, start_at) for s in shares])
    time.sleep(max(0.0, start_at - time.monotonic() - 0.05))
    pids = {"api": [server.pid], "engine": [engine_pid], "clients": client_pids}
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    spies = []
    if profile_dir is not None:
        spies = start_py_spy(profile_dir, {"api": server.pid, "engine": engine_pid}, args)
    parts = jobs.get(timeout=600)
    t1 = time.monotonic()
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    pool.close()
    pool.join()
    for spy in spies:
        spy.wait(timeout=60)
    runs = [r for part in parts for r in part]
    cpu = {k: after[k] - before[k] for k in before}
    result = summarize(runs, args, cpu, t1 - t0)
    result.update(step_record(step_log, start_at, t1, args.period_ms))
    for key, (total, count) in phase_sums(args.port).items():
        n = count - phases[key][1]
        result[f"{key}_mean_ms"] = 1e3 * (total - phases[key][0]) / n if n else float("nan")
    if "all_running_at" in result:  # the steady state: every stream running, none done yet
        a = result.pop("all_running_at") + 2 * args.period_ms / 1e3
        b = min(r["done"] for r in runs)
        events = sum(n for r in runs for t, n in zip(r["times"], r["counts"]) if a <= t < b)
        expected = len(runs) * (b - a) / (args.period_ms / 1e3)
        result["steady_events_share"] = events / expected if b > a else float("nan")
    result["client_ttft_mean_ms"] = statistics.mean(
        (r["times"][0] - r["sent"]) * 1e3 for r in runs if r["times"]
    )
    result["connect_mean_ms"] = statistics.mean((r["connected"] - r["sent"]) * 1e3 for r in runs)
    del psutil
    return result


def start_py_spy(out: Path, pids: dict[str, int], args) -> list[subprocess.Popen]:
    """py-spy on both processes for `--profile-seconds`, from `--profile-delay` s into the
    burst (0: its admission)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    time.sleep(args.profile_delay)
    spies = []
    for name, pid in pids.items():
        cmd = [exe, "record", "--pid", str(pid), "--threads", "--nonblocking",
               "-r", "100", "-d", str(args.profile_seconds), "-f", "raw",
               "-o", str(out / f"{name}.txt")]  # fmt: skip
        cmd += ["--gil"] if args.profile_gil else []
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def gil_shares(path: Path, seconds: float, rate: int = 100) -> dict[str, float]:
    """Share of the time each thread held the GIL (py-spy --gil --threads raw output), or
    without --gil, was running."""
    held: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread = stack.split(";", 1)[0]
        name = re.sub(r"\s*\(0x[0-9a-fA-F]+\)", "", thread).strip() or thread
        held[name] = held.get(name, 0) + int(count)
    return {k: v / (seconds * rate) for k, v in sorted(held.items(), key=lambda kv: -kv[1])}


# ---- the run --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, work: Path) -> tuple[subprocess.Popen, int, Path]:
    import httpx
    import psutil

    step_log = work / "steps.txt"
    script = Path(__file__).with_name("frontend_server.py")
    cmd = [sys.executable, str(script), "--checkpoint", str(args.checkpoint),
           "--port", str(args.port), "--period-ms", str(args.period_ms),
           "--step-log", str(step_log), "--streams", str(args.streams),
           "--tokens", str(args.tokens), "--engine", args.engine]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        server.kill()
        raise SystemExit("the server did not answer /health")
    # the engine process (the other child is multiprocessing's resource tracker)
    (engine,) = [c for c in psutil.Process(server.pid).children()
                 if "resource_tracker" not in " ".join(c.cmdline())]  # fmt: skip
    return server, engine.pid, step_log


def warm_up(args, kind: str) -> None:
    requests = [http_request(args.port, b) for b in bodies(kind, 8, 8, args.image_size, 999)]
    results = client_process(args.port, requests, 0.0)
    assert all(r["ok"] for r in results), "warm-up requests failed"


def print_row(kind: str, r: dict) -> None:
    print(
        f"{kind:5s} ok {r['ok']:3.0f}  {r['requests_s']:6.1f} req/s  {r['tokens_s']:6.0f} tok/s "
        f"({r['share_of_ideal']:.1%} of ideal {r['ideal_tokens_s']:.0f}; steady "
        f"{r.get('steady_events_share', float('nan')):.1%}, engine period "
        f"{r.get('full_step_period_ms', float('nan')):.1f} ms)  TTFT p50/p99 "
        f"{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} ms  gap p50/p99 {r['gap_p50_ms']:.1f}/"
        f"{r['gap_p99_ms']:.1f} ms  CPU api/engine/clients {r['cpu_api_pct']:.0f}/"
        f"{r['cpu_engine_pct']:.0f}/{r['cpu_clients_pct']:.0f}%  server "
        f"{r['server_cpu_us_per_token']:.0f}"
        f" us/tok (api {r['api_cpu_us_per_token']:.0f}, engine {r['engine_cpu_us_per_token']:.0f})"
        f"  steps {r.get('steps', 0)} late {r.get('late_steps', 0)} (max "
        f"{r.get('late_ms_max', 0):.1f} ms) host p50 {r.get('host_ms_p50', 0):.1f} ms, between "
        f"{r.get('between_steps_ms_p50', 0):.2f}/{r.get('between_steps_ms_max', 0):.1f} ms, "
        f"{r.get('max_running', 0):.0f} running after {r.get('all_running_after_ms', 0):.0f} ms"
        f"; TTFT means: client {r['client_ttft_mean_ms']:.0f} (connect "
        f"{r['connect_mean_ms']:.0f}), server {r['server_ttft_mean_ms']:.0f}"
        f", engine queue {r['engine_queue_mean_ms']:.0f} + prefill "
        f"{r['engine_prefill_mean_ms']:.0f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--period-ms", type=float, default=27.0)
    parser.add_argument("--kind", choices=["image", "text", "both"], default="both")
    parser.add_argument(
        "--engine", choices=["model", "synthetic"], default="model",
        help="model: the real engine with a fake model; synthetic: no scheduler, sampler or "
        "detokenizer either (only the frontend's own work is left)",
    )  # fmt: skip
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--json", help="write every burst and the medians here")
    parser.add_argument("--profile", type=Path, help="py-spy both processes into this folder")
    parser.add_argument("--profile-seconds", type=int, default=3)
    parser.add_argument("--profile-delay", type=float, default=1.0)
    parser.add_argument(
        "--profile-gil", action="store_true",
        help="sample only the thread holding the GIL (else every thread on a CPU)",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    from polymodal.demo_model import write_demo_checkpoint

    work = Path(tempfile.mkdtemp(prefix="polymodal-frontend-"))
    args.checkpoint = write_demo_checkpoint(work / "ckpt", "qwen2_5_vl")
    args.port = args.port or free_port()
    server, engine_pid, step_log = start_server(args, work)
    kinds = ["image", "text"] if args.kind == "both" else [args.kind]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for kind in kinds:
            warm_up(args, kind)
        for repeat in range(args.repeats):
            for kind in kinds:
                b = bodies(kind, args.streams, args.tokens, args.image_size, repeat)
                requests = [http_request(args.port, body) for body in b]
                profile = None
                if args.profile is not None and repeat == args.repeats - 1:
                    profile = args.profile / kind
                r = one_burst(args, server, engine_pid, requests, step_log, profile)
                results[kind].append(r)
                print_row(kind, r)
                if profile is not None:
                    for name in ("api", "engine"):
                        shares = gil_shares(profile / f"{name}.txt", args.profile_seconds)
                        top = ", ".join(f"{k} {v:.0%}" for k, v in list(shares.items())[:6])
                        what = "GIL held" if args.profile_gil else "on a CPU"
                        print(f"  {what}, {name} process: {top}")
                time.sleep(1.0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    medians = {
        kind: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k in rs[-1]}
        for kind, rs in results.items()
    }
    print("medians:")
    for kind, m in medians.items():
        print_row(kind, m)
    if args.json:
        Path(args.json).write_text(json.dumps({"bursts": results, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
