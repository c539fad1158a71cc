"""`polymodal bench --profile`: where the time goes (phase timers and a kernel table).

Phase timers synchronize the device around each wrapped call, so a profiled run is a little
slower than the timed run; the shares, not the totals, are the point.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


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
    events = _kernels(prof)
    busy = _busy_seconds(prof)
    return {
        "wall_ms_per_step": wall / steps * 1e3,
        "gpu_busy_ms_per_step": busy / steps * 1e3,
        "kernel_sum_ms_per_step": sum(e.self_device_time_total for e in events) / 1e3 / steps,
        "gpu_idle_share": 1 - busy / wall,
        "exclusive_kernels": _exclusive_ms(prof, steps, top),
        "idle_gaps": _idle_gaps(prof, steps, 8),
        "top_kernels": [
            {
                "name": e.key[:90],
                "ms_per_step": e.self_device_time_total / 1e3 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in events[:top]
        ],
    }


def _kernels(prof, exclude=()) -> list:
    """Device-side events only (kernels, copies, memsets), longest first: host ops such as
    `aten::mm` also carry their kernels' time and would count it twice."""
    from torch.autograd import DeviceType

    events = [
        e
        for e in prof.key_averages()
        if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
        and e.key not in exclude
    ]  # fmt: skip
    return sorted(events, key=lambda e: -e.self_device_time_total)


def _device_spans(prof, exclude=()) -> list[tuple[float, float, str]]:
    """(start, end, name) in microseconds of every kernel, copy and memset."""
    from torch.autograd import DeviceType

    return [
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
        and e.name not in exclude
    ]  # fmt: skip


def _busy_seconds(prof, exclude=()) -> float:
    """Time at least one kernel, copy or memset ran: the union of their intervals. Under
    programmatic dependent launch consecutive kernels overlap (the next one waits inside), so
    the sum of kernel times overstates the busy time."""
    busy, end = 0.0, float("-inf")
    for start, stop, _ in sorted(_device_spans(prof, exclude)):
        if start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    return busy / 1e6  # microseconds -> s


def _exclusive_ms(prof, calls: int, top: int) -> list[dict]:
    """Busy time charged to the kernel that ends it: in end order, each kernel gets the time
    from the previous kernel's end (or its own start, if later) to its own end. With kernels
    overlapping under PDL this is each kernel's marginal cost (rows sum to the busy time unless
    a kernel runs wholly inside another, e.g. on a second stream)."""
    charged: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    last_end = float("-inf")
    for start, stop, name in sorted(_device_spans(prof), key=lambda span: span[1]):
        charged[name] += stop - max(start, last_end)
        launches[name] += 1
        last_end = stop
    rows = sorted(charged, key=lambda name: -charged[name])[:top]
    return [
        {"name": name[:90], "ms_per_step": charged[name] / 1e3 / calls,
         "calls_per_step": launches[name] / calls}
        for name in rows
    ]  # fmt: skip


def _idle_gaps(prof, calls: int, top: int, exclude=()) -> list[dict]:
    """Where the device idles: each gap between busy intervals, charged to the pair (the
    kernel whose end opened it -> the kernel whose start closed it), largest total first.
    `exclude`: our profiler ranges' names (their device-side spans would cover the gaps)."""
    gaps: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for start, stop, pair in _gaps(prof, exclude):
        gaps[pair] += stop - start
        counts[pair] += 1
    rows = sorted(gaps, key=lambda pair: -gaps[pair])[:top]
    return [
        {"name": pair, "ms_per_step": gaps[pair] / 1e3 / calls,
         "calls_per_step": counts[pair] / calls}
        for pair in rows
    ]  # fmt: skip


def _gaps(prof, exclude=()) -> list[tuple[float, float, str]]:
    """Every idle interval of the device: (start, end) in microseconds and the pair (the kernel
    whose end opened it -> the one whose start closed it), as `_idle_gaps` names them."""
    out, end, last = [], float("-inf"), ""
    for start, stop, name in sorted(_device_spans(prof, exclude)):
        if start > end and last:
            out.append((end, start, f"{last[:40]} -> {name[:40]}"))
        if stop > end:
            end, last = stop, name
    return out


def _launch_thread_events(prof) -> list:
    """CPU events of the thread that launched the most kernels (the engine's), by start time."""
    from collections import Counter

    from torch.autograd import DeviceType

    cpu = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    launches = Counter(e.thread for e in cpu if "LaunchKernel" in e.name)
    thread = (launches or Counter(e.thread for e in cpu)).most_common(1)[0][0]
    return sorted((e for e in cpu if e.thread == thread), key=lambda e: e.time_range.start)


def _host_in(events, starts, gap_start: float, gap_end: float, open_events: list):
    """What the launch thread ran in [gap_start, gap_end): {name: self-overlap in us} (an
    event's overlap less its children's: where the host time went) and the names of the
    events open at the gap's start, outermost first (the ranges it fell in)."""
    from bisect import bisect_left

    inside = events[bisect_left(starts, gap_start) : bisect_left(starts, gap_end)]
    candidates = {id(e): e for e in open_events + inside}
    own: dict[int, float] = {}
    for key, e in candidates.items():
        overlap = min(e.time_range.end, gap_end) - max(e.time_range.start, gap_start)
        own[key] = own.get(key, 0.0) + overlap
        parent = getattr(e, "cpu_parent", None)
        if parent is not None and id(parent) in candidates:
            own[id(parent)] = own.get(id(parent), 0.0) - overlap
    names: dict[str, float] = defaultdict(float)
    for key, us in own.items():
        names[candidates[key].name] += max(us, 0.0)
    return names, [e.name for e in open_events]


def gap_hosts(prof, exclude=(), pairs: int = 4, ops: int = 8) -> list[dict]:
    """Host attribution of the idle gaps: for the `pairs` pairs with the most idle time, the
    CPU ops and profiler ranges (our `record_function` labels) the launch thread ran while the
    device idled (self time summed over the pair's gaps, top `ops`), the enclosing ranges of
    its largest gap and that gap's length. A gap the host caused shows its work here (Python
    ranges, aten ops, allocator or copy calls, a sync); a gap full of `cudaStreamSynchronize`
    or `cudaEventSynchronize` is a wait, not work."""
    gaps = _gaps(prof, exclude)
    total: dict[str, float] = defaultdict(float)
    for start, stop, pair in gaps:
        total[pair] += stop - start
    chosen = sorted(total, key=lambda pair: -total[pair])[:pairs]
    events = _launch_thread_events(prof)
    starts = [e.time_range.start for e in events]
    rows = {pair: {"pair": pair, "gaps": 0, "idle_ms": total[pair] / 1e3, "largest_ms": 0.0,
                   "host_ms": defaultdict(float), "ranges": []} for pair in chosen}  # fmt: skip
    stack: list = []
    index = 0
    for start, stop, pair in gaps:  # in time order, as the events: one sweep keeps the stack
        while index < len(events) and starts[index] <= start:
            stack.append(events[index])
            index += 1
        stack = [e for e in stack if e.time_range.end > start]
        if pair not in rows:
            continue
        row = rows[pair]
        names, ranges = _host_in(events, starts, start, stop, stack)
        row["gaps"] += 1
        for name, us in names.items():
            row["host_ms"][name] += us / 1e3
        if (stop - start) / 1e3 > row["largest_ms"]:
            row["largest_ms"], row["ranges"] = (stop - start) / 1e3, ranges
    out = []
    for pair in chosen:
        row = rows[pair]
        top = sorted(row["host_ms"].items(), key=lambda kv: -kv[1])[:ops]
        row["host_ms"] = [{"name": name[:80], "ms": ms} for name, ms in top]
        out.append(row)
    return out


def print_gap_hosts(rows: list[dict]) -> None:
    """`gap_hosts` as text: a pair, its gaps, what the host ran meanwhile."""
    for row in rows:
        inside = " > ".join(name[:40] for name in row["ranges"])
        print(f"  {row['idle_ms']:7.3f} ms in {row['gaps']} gaps  {row['pair']}  (largest "
              f"{row['largest_ms']:.3f} ms, inside: {inside})")  # fmt: skip
        for op in row["host_ms"]:
            print(f"      host {op['ms']:7.3f} ms  {op['name']}")


def _kernel_table(prof, calls: int, top: int, exclude=()) -> list[dict]:
    events = _kernels(prof, exclude)
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
    kernels = _kernels(prof, exclude=names)
    return {
        "gpu_busy_ms": _busy_seconds(prof, exclude=names) * 1e3 / runs,
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
    busy = _busy_seconds(prof, exclude=names)
    out = {
        "wall_ms": wall / calls * 1e3,
        "gpu_busy_ms": busy / calls * 1e3,
        "gpu_idle_share": 1 - busy / wall,
        **{f"{label} gpu_span_ms": spans[label] for label in sorted(names)},
        "exclusive_kernels": _exclusive_ms(prof, calls, top),
        "idle_gaps": _idle_gaps(prof, calls, 8, names),
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


def profile_all(ours, pics) -> dict:
    """Kernel tables of decode, TTFT and the vision tower; phase tables of TTFT and
    captioning."""
    return {
        "decode_kernels": decode_kernels(ours),
        "ttft_kernels": ttft_kernels(ours),
        "encoder_kernels": encoder_kernels(ours, pics[:16]),
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
    for name in ("ttft_phases", "caption_phases"):
        print(f"{name}: total {prof[name]['total_seconds']:.2f}s")
        for phase, v in prof[name]["phases"].items():
            print(f"  {v['share']:6.1%} {v['seconds']:7.3f}s  {phase}")
