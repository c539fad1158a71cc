"""`polymodal bench --profile`: where the time goes (phase timers and a kernel table).

Phase timers synchronize the device around each wrapped call, so a profiled run is a little
slower than the timed run; the shares, not the totals, are the point.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from polymodal.bench.trace import (
    busy_seconds,
    device_events,
    exclusive_ms,
    gap_hosts,
    idle_gaps,
)


class PhaseTimer:
    """Wraps engine/runner methods to accumulate synchronized wall time per phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo = []

    def wrap(self, obj, name: str, phase: str) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start
            self.calls[phase] += 1
            return out

        setattr(obj, name, timed)
        self._undo.append((obj, name, original))

    def restore(self) -> None:
        for obj, name, original in reversed(self._undo):
            setattr(obj, name, original)
        self._undo.clear()

    def table(self, total: float) -> dict:
        return {
            phase: {"seconds": s, "share": s / total, "calls": self.calls[phase]}
            for phase, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])
        }


@contextmanager
def phases(engine, encoder: str = "vision encoder"):
    """Time schedule / prepare / encoder / forward (graph or eager) / sample of `engine`."""
    timer = PhaseTimer()
    runner = engine.runner
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(runner, "host_batch", "batch inputs (host lists)")
    timer.wrap(runner, "prepare", "device inputs (eager steps)")
    timer.wrap(runner.model, "encode", encoder)
    timer.wrap(runner, "sample", "logits + sample")
    if runner.graphs is not None:
        timer.wrap(runner.graphs, "run", "decode (graph replay)")
    if runner.prefill_graphs is not None:
        timer.wrap(runner.prefill_graphs, "run", "prefill (graph replay)")
    timer.wrap(runner.model, "forward", "decoder forward (eager)")
    try:
        yield timer
    finally:
        timer.restore()


def profile_run(engine, fn, encoder: str = "vision encoder") -> dict:
    """Run `fn()` once with phase timers; returns the phase table and the total."""
    with phases(engine, encoder) as timer:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    table = timer.table(total)
    table["other (python: engine, detok, scheduling glue)"] = {
        "seconds": total - sum(v["seconds"] for v in table.values()),
        "share": 1 - sum(v["share"] for v in table.values()),
    }
    return {"total_seconds": total, "phases": table}


def decode_kernels(ours, steps: int = 32, top: int = 12) -> dict:
    """Kernel table of batch-1 decode steps and the GPU-busy share of their wall time."""
    from torch.profiler import ProfilerActivity, profile

    from polymodal.bench.workloads import TEXT_TOKENS, text_ids

    p = ours.processor.process_tokens(text_ids(TEXT_TOKENS, 7, ours.vocab), [])
    ours._add(p, steps + 8)
    for _ in range(4):  # prefill + warm decode steps
        ours.engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            ours.engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    while ours.engine.has_unfinished():
        ours.engine.step()
    events = device_events(prof)
    busy = busy_seconds(prof)
    return {
        "wall_ms_per_step": wall / steps * 1e3,
        "gpu_busy_ms_per_step": busy / steps * 1e3,
        "kernel_sum_ms_per_step": sum(e.self_device_time_total for e in events) / 1e3 / steps,
        "gpu_idle_share": 1 - busy / wall,
        "exclusive_kernels": exclusive_ms(prof, steps, top),
        "idle_gaps": idle_gaps(prof, steps, 8),
        "top_kernels": [
            {
                "name": e.key[:90],
                "ms_per_step": e.self_device_time_total / 1e3 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in events[:top]
        ],
    }


def _kernel_table(prof, calls: int, top: int, exclude=()) -> list[dict]:
    events = device_events(prof, exclude)
    return [
        {"name": e.key[:90], "ms_per_call": e.self_device_time_total / 1e3 / calls,
         "launches": e.count / calls}
        for e in events[:top]
    ]  # fmt: skip


@torch.inference_mode()
def encoder_kernels(ours, pics, top: int = 12) -> dict:
    """Vision tower: wall ms for 1 image and for a batch, and the batch's kernel table."""
    from torch.profiler import ProfilerActivity, profile

    items = [ours._prompt(img, i).mm_items[0] for i, img in enumerate(pics)]
    model = ours.model
    out = {}
    for label, batch in (("one_image_ms", items[:1]), ("batch_ms", items)):
        model.encode(batch)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.encode(batch)
        torch.cuda.synchronize()
        out[label] = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.encode(items)
        torch.cuda.synchronize()
    out["batch_images"] = len(items)
    out["top_kernels"] = _kernel_table(prof, 1, top)
    return out


@contextmanager
def _annotated(methods: list[tuple]):
    """Wrap `(obj, method name, label)` methods in profiler ranges, so their kernels' time can
    be told apart."""
    from torch.profiler import record_function

    for obj, name, label in methods:
        original = getattr(obj, name)

        def ranged(*args, _original=original, _label=label, **kwargs):
            with record_function(_label):
                return _original(*args, **kwargs)

        setattr(obj, name, ranged)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for obj, name, _ in methods:
            delattr(obj, name)


def engine_ranges(engine) -> list[tuple]:
    """`(obj, method name, label)` of an engine's step phases, for `calls_profile`'s ranges:
    the step, scheduling, host lists, device inputs, encoder, decoder forward (eager) and graph
    replays, the attention routes (per layer), sampling and the read-back. `gap_hosts` then
    names the phase a gap fell in."""
    from polymodal.llm_core.attention.layer import AttentionLayer

    runner = engine.runner
    methods = [
        (engine, "step", "engine.step"),
        (engine.scheduler, "schedule", "schedule"),
        (runner, "host_batch", "host_batch"),
        (runner, "prepare", "prepare (device inputs)"),
        (runner.model, "encode", "encode"),
        (runner.model, "forward", "decoder forward (eager)"),
        (runner, "sample", "sample"),
        (runner, "resolve", "resolve (read back)"),
    ]
    if runner.graphs is not None:
        methods.append((runner.graphs, "run", "decode graph"))
    if runner.prefill_graphs is not None:
        methods.append((runner.prefill_graphs, "run", "prefill graph"))
    modules = list(runner.model.modules())
    layers = [m for m in modules if isinstance(m, AttentionLayer)]
    for backend in {id(m.backend): m.backend for m in layers}.values():
        methods.append((backend, "sdpa_prefill", "attention: causal sdpa route"))
        methods.append((backend, "paged_attention", "attention: paged kernel"))
    towers = [m.attn_backend for m in modules if getattr(m, "attn_backend", None) is not None]
    for backend in {id(b): b for b in towers}.values():
        methods.append((backend, "varlen_attention", "attention: encoder segments"))
    unique = {(id(obj), name): (obj, name, label) for obj, name, label in methods}
    return [m for m in unique.values() if hasattr(m[0], m[1])]


def _spans(prof, names: set[str], calls: int) -> dict[str, float]:
    """GPU span (first to last kernel, ms a call) of each profiler range named in `names`."""
    spans: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.key in names:
            spans[e.key] = max(spans[e.key], e.device_time_total / 1e3 / calls)
    return spans


def ttft_kernels(ours, runs: int = 3, top: int = 10) -> dict:
    """GPU time of one TTFT (image + 32 tokens): kernel busy time, and the GPU span of the
    vision tower and of the decoder forward (first to last kernel, launch gaps included).

    The profiler slows the host, not the kernels: busy time per TTFT against the timed TTFT
    says how much of it is GPU work and how much host work (preprocessing, launches, glue).
    """
    from torch.profiler import ProfilerActivity, profile

    runner = ours.engine.runner
    methods = [(ours.model, "encode", "vision encoder"), (ours.model, "forward", "decoder")]
    if runner.prefill_graphs is not None:
        methods.append((runner.prefill_graphs, "run", "decoder"))
    names = {label for _, _, label in methods}
    with _annotated(methods):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ours.ttft_ms(None, repeats=runs - 1)
            torch.cuda.synchronize()
    spans = _spans(prof, names, runs)
    kernels = device_events(prof, exclude=names)
    return {
        "gpu_busy_ms": busy_seconds(prof, exclude=names) * 1e3 / runs,
        "kernel_sum_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / runs,
        **{f"{label} gpu_span_ms": spans[label] for label in sorted(names)},
        "top_kernels": _kernel_table(prof, runs, top, exclude=names),
    }


def calls_profile(fn, calls: int, methods: list[tuple] = (), top: int = 16,
                  host_pairs: int = 0) -> dict:  # fmt: skip
    """Kernels of `calls` calls of `fn()` (a decode step, a TTFT, ...): wall and GPU-busy ms a
    call, the busy time charged to the kernel that ends it (marginal cost under PDL), the idle
    gaps, and the GPU span of each `(obj, method name, label)` in `methods`. For the families
    without the engine workload (`polymodal bench VL-MODEL --profile`, `bench_text_decode.py
    --profile`). `host_pairs` > 0: also `gap_hosts` of that many gap pairs ("gap_hosts")."""
    from torch.profiler import ProfilerActivity, profile

    names = {label for _, _, label in methods}
    with _annotated(list(methods)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    spans = _spans(prof, names, calls)
    busy = busy_seconds(prof, exclude=names)
    out = {
        "wall_ms": wall / calls * 1e3,
        "gpu_busy_ms": busy / calls * 1e3,
        "gpu_idle_share": 1 - busy / wall,
        **{f"{label} gpu_span_ms": spans[label] for label in sorted(names)},
        "exclusive_kernels": exclusive_ms(prof, calls, top, exclude=names),
        "idle_gaps": idle_gaps(prof, calls, 8, names),
    }
    if host_pairs:
        out["gap_hosts"] = gap_hosts(prof, names, host_pairs)
    return out


def print_calls_profile(title: str, prof: dict) -> None:
    spans = ", ".join(f"{k[:-12]} {v:.2f} ms" for k, v in prof.items() if k.endswith("gpu_span_ms"))
    print(
        f"\n{title}: {prof['wall_ms']:.2f} ms wall (profiled), {prof['gpu_busy_ms']:.2f} ms GPU "
        f"busy, idle {prof['gpu_idle_share']:.1%}" + (f"; GPU spans: {spans}" if spans else "")
    )
    print("  busy time charged to the kernel that ends it:")
    _print_kernels(prof["exclusive_kernels"], "ms_per_step", "calls_per_step")
    print("  idle gaps (the kernel that ended -> the one that started):")
    _print_kernels(prof["idle_gaps"], "ms_per_step", "calls_per_step")


CAPTION_PROFILED = 32  # images of the profiled captioning job (its kernel table)


def profile_all(ours, pics) -> dict:
    """Kernel tables of decode, TTFT, the vision tower and a captioning job of
    `CAPTION_PROFILED` images; phase tables of TTFT and captioning."""
    job = pics[:CAPTION_PROFILED]
    return {
        "decode_kernels": decode_kernels(ours),
        "ttft_kernels": ttft_kernels(ours),
        "encoder_kernels": encoder_kernels(ours, pics[:16]),
        "caption_kernels": calls_profile(lambda: ours.caption(job, 128), 1, top=20),
        "ttft_phases": profile_run(ours.engine, lambda: ours.ttft_ms(None, repeats=2)),
        "caption_phases": profile_run(ours.engine, lambda: ours.caption(pics, 128)),
    }


def _print_kernels(rows: list[dict], ms: str, count: str) -> None:
    for k in rows:
        print(f"  {k[ms]:7.3f} ms x{k[count]:5.0f}  {k['name']}")


def print_profile(prof: dict) -> None:
    dk = prof["decode_kernels"]
    print(
        f"\nbatch-1 decode: {dk['wall_ms_per_step']:.2f} ms/step wall, "
        f"{dk['gpu_busy_ms_per_step']:.2f} ms GPU busy, idle {dk['gpu_idle_share']:.1%}"
    )
    print("  busy time charged to the kernel that ends it (marginal cost under PDL):")
    _print_kernels(dk["exclusive_kernels"], "ms_per_step", "calls_per_step")
    print("  idle gaps (the kernel that ended -> the one that started):")
    _print_kernels(dk["idle_gaps"], "ms_per_step", "calls_per_step")
    tk = prof["ttft_kernels"]
    print(
        f"TTFT GPU busy {tk['gpu_busy_ms']:.1f} ms; GPU spans: vision "
        f"{tk['vision encoder gpu_span_ms']:.1f} ms, decoder {tk['decoder gpu_span_ms']:.1f} ms"
    )
    _print_kernels(tk["top_kernels"], "ms_per_call", "launches")
    ek = prof["encoder_kernels"]
    print(
        f"vision tower: 1 image {ek['one_image_ms']:.1f} ms, {ek['batch_images']} images "
        f"{ek['batch_ms']:.1f} ms"
    )
    _print_kernels(ek["top_kernels"], "ms_per_call", "launches")
    print_calls_profile(f"captioning {CAPTION_PROFILED} images x 128 tokens",
                        prof["caption_kernels"])  # fmt: skip
    for name in ("ttft_phases", "caption_phases"):
        print(f"{name}: total {prof[name]['total_seconds']:.2f}s")
        for phase, v in prof[name]["phases"].items():
            print(f"  {v['share']:6.1%} {v['seconds']:7.3f}s  {phase}")
