"""Reading a torch profiler trace of engine calls: device events, busy time, the time charged
to each kernel, idle gaps between kernels, and what the launching thread ran inside the
largest gaps (`polymodal bench --profile`, `bench/profile.py`)."""

from __future__ import annotations

from collections import defaultdict


def device_events(prof, exclude=()) -> list:
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


def busy_seconds(prof, exclude=()) -> float:
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


def exclusive_ms(prof, calls: int, top: int, exclude=()) -> list[dict]:
    """Busy time charged to the kernel that ends it: in end order, each kernel gets the time
    from the previous kernel's end (or its own start, if later) to its own end. With kernels
    overlapping under PDL this is each kernel's marginal cost (rows sum to the busy time unless
    a kernel runs wholly inside another, e.g. on a second stream). `exclude`: our profiler
    ranges' names (a range's device span ends with its last kernel and took that kernel's
    charge)."""
    charged: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    last_end = float("-inf")
    for start, stop, name in sorted(_device_spans(prof, exclude), key=lambda span: span[1]):
        charged[name] += stop - max(start, last_end)
        launches[name] += 1
        last_end = stop
    rows = sorted(charged, key=lambda name: -charged[name])[:top]
    return [
        {"name": name[:90], "ms_per_step": charged[name] / 1e3 / calls,
         "calls_per_step": launches[name] / calls}
        for name in rows
    ]  # fmt: skip


def idle_gaps(prof, calls: int, top: int, exclude=()) -> list[dict]:
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
