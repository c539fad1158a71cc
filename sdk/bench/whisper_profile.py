"""`polymodal bench whisper-large-v3 --profile`: where a transcription's time goes, on the
engine of the timed run, after it.

- the clips/s run again, its steps logged (no sync added): how many replayed a decode graph,
  how many admitted clips (each such step runs eagerly: it writes their encoder rows) and how
  many clips each admitted, rows per step;
- the same run with synchronizing phase timers (`profile.phases`: shares, not totals);
- kernels of decode steps at one clip and with every clip of the run in flight
  (`calls_profile`: wall and GPU-busy ms a step, marginal cost per kernel, idle gaps);
- the log-mel features of one clip on the host and on the device.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from polymodal.bench.profile import calls_profile, print_calls_profile, profile_run

RATE = 16_000


@contextmanager
def step_log(runner):
    """Record each launched step as (rows, clips whose encoder rows it writes, whether it
    replayed a decode graph); adds no sync."""
    log: list[tuple[int, int, bool]] = []
    launch = runner.launch

    def logged(sched, *args, **kwargs):
        writes = sum(r.cross_pending for r in sched.requests)
        before = runner.graphs.runs if runner.graphs is not None else 0
        flight = launch(sched, *args, **kwargs)
        replayed = runner.graphs is not None and runner.graphs.runs > before
        log.append((len(sched.requests), writes, replayed))
        return flight

    runner.launch = logged  # the instance attribute shadows the method
    try:
        yield log
    finally:
        del runner.launch


def step_summary(log: list[tuple[int, int, bool]]) -> dict:
    """Counts of a `step_log`."""
    admitting = [w for _, w, _ in log if w]
    return {
        "steps": len(log),
        "graph_steps": sum(g for *_, g in log),
        "admitting_steps": len(admitting),
        "clips_per_admitting_step": statistics.mean(admitting) if admitting else 0.0,
        "max_clips_in_a_step": max(admitting, default=0),
        "rows_per_step": statistics.mean(r for r, *_ in log) if log else 0.0,
    }


def feature_ms(processor, wave, device: str, repeats: int = 5) -> dict:
    """Median ms of one clip's features (decoded, hashed) made on the host and on `device`."""
    out = {}
    for name, where in (("host", None), ("device", torch.device(device))):
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            processor.features((wave, RATE), device=where)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times) * 1e3
    return out


def decode_steps(llm, waves: list, calls: int) -> dict:
    """`calls_profile` of `calls` engine steps with `waves` in flight, all admitted first."""
    engine = llm.engine
    # up to the context (aborted after): admitting many clips takes steps of its own
    params = llm.get_default_sampling_params().model_copy(
        update={"temperature": 0.0, "max_tokens": None, "ignore_eos": True}
    )
    ids = []
    for wave in waves:
        prompt = {"prompt": "", "multi_modal_data": {"audio": (wave, RATE)},
                  "mm_processor_kwargs": {"language": "en"}}  # fmt: skip
        ids.append(llm.submit(prompt, params))
    while engine.scheduler.waiting or any(r.cross_pending for r in engine.scheduler.running):
        engine.step()
    for _ in range(2):  # every clip decoding
        engine.step()
    runner = engine.runner
    methods = [(runner.model, "forward", "eager forward")]
    if runner.graphs is not None:
        methods.append((runner.graphs, "run", "graph replay"))
    prof = calls_profile(engine.step, calls, methods)
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    return prof


def profile_whisper(pipe, ours, count: int, seconds: float, tokens: int, device: str) -> dict:
    """The tables above; `ours(waves, tokens)` is the timed side's call. Each part runs on
    `count` clips of its own (`seconds` long): clips seen before would hit the encoder cache."""
    from polymodal.bench.workloads import clips

    engine = pipe.llm.engine
    torch.cuda.synchronize()
    start = time.perf_counter()
    with step_log(engine.runner) as log:
        ours(clips(count, seconds, RATE, seed=101), tokens)
    torch.cuda.synchronize()
    steps = {"seconds": time.perf_counter() - start, **step_summary(log)}
    waves = clips(count, seconds, RATE, seed=102)
    phases = profile_run(engine, lambda: ours(waves, tokens), "audio encoder")
    return {
        "steps": steps,
        "phases": phases,
        "features_ms": feature_ms(pipe.llm.processor, waves[0], device),
        "decode_one_clip": decode_steps(pipe.llm, clips(1, seconds, RATE, seed=103), 32),
        "decode_all_clips": decode_steps(pipe.llm, clips(count, seconds, RATE, seed=104), 16),
    }


def print_profile(prof: dict, clips: int) -> None:
    s = prof["steps"]
    print(
        f"\n{clips} clips again, steps logged: {s['seconds']:.2f} s, {s['steps']} steps "
        f"({s['graph_steps']} decode-graph replays), {s['admitting_steps']} admitted clips "
        f"(eager; {s['clips_per_admitting_step']:.1f} clips each, at most "
        f"{s['max_clips_in_a_step']}), {s['rows_per_step']:.1f} rows a step"
    )
    f = prof["features_ms"]
    print(f"log-mel features of one clip: host {f['host']:.1f} ms, device {f['device']:.1f} ms")
    p = prof["phases"]
    print(f"phases (synchronized timers), total {p['total_seconds']:.2f} s:")
    for phase, v in p["phases"].items():
        calls = f" x{v['calls']}" if "calls" in v else ""
        print(f"  {v['share']:6.1%} {v['seconds']:7.3f}s  {phase}{calls}")
    print_calls_profile("decode step, one clip", prof["decode_one_clip"])
    print_calls_profile(f"decode step, {clips} clips", prof["decode_all_clips"])
