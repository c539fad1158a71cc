"""Host timeline of one fresh-image TTFT (`polymodal bench MODEL`'s TTFT call, no profiler):
median microseconds between the engine's method boundaries over 12 calls, the device
synchronized only around each call. What precedes the first upload (`stage_ahead>`), what
sits between staging and the tower (`encode>`), what follows the token's read-back
(`<resolve`). Usage: python3 scripts/device/vl_host_timeline.py gemma-3-12b-it [pixtral-12b]"""

import collections
import functools
import sys
import time
from pathlib import Path

import torch

from polymodal import LLM, SamplingParams
from polymodal.bench import resolve_bench_model
from polymodal.bench.vl import chat, hf_config_max_positions, user_checkpoint
from polymodal.bench.workloads import images


def timeline(name: str) -> None:
    model_dir = user_checkpoint(Path(resolve_bench_model(name)))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a tiny checkpoint dir
    llm = LLM(
        str(model_dir), dtype="bfloat16", device=device, dummy_weights=True,
        max_model_len=min(4096, hf_config_max_positions(model_dir)),
        gpu_memory_utilization=0.85, enable_prefix_caching=False,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    marks: list[tuple[str, float]] = []

    def mark(obj, method: str) -> None:
        original = getattr(obj, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            marks.append((method + ">", time.perf_counter()))
            out = original(*args, **kwargs)
            marks.append(("<" + method, time.perf_counter()))
            return out

        setattr(obj, method, timed)

    engine, runner = llm.engine, llm.engine.runner
    for obj, method in [
        (llm, "process"), (runner.model, "stage_ahead"), (engine, "add_request"),
        (engine.scheduler, "schedule"), (runner, "launch"), (runner.model, "encode"),
        (runner, "host_batch"), (runner, "prepare"), (runner, "sample"), (runner, "resolve"),
        (engine.scheduler, "finish"),
    ]:  # fmt: skip
        mark(obj, method)
    if runner.prefill_graphs is not None:
        mark(runner.prefill_graphs, "run")
    gaps = collections.defaultdict(list)
    for i, image in enumerate(images(14, seed=8765)):
        if device == "cuda":
            torch.cuda.synchronize()
        marks.clear()
        start = time.perf_counter()
        llm.generate([{"messages": chat(image)}], params, use_tqdm=False)
        end = time.perf_counter()
        if i < 2:  # warm
            continue
        seq = [("call", start), *marks, ("return", end)]
        for (a, ta), (b, tb) in zip(seq, seq[1:]):
            gaps[f"{a:>13} -> {b:<13}"].append((tb - ta) * 1e6)
        gaps["total"].append((end - start) * 1e6)
    print(f"\n{name}: host timeline of one fresh-image TTFT (median us, 12 calls)")
    for key, values in gaps.items():
        print(f"  {key} {sorted(values)[len(values) // 2]:9.1f}")
    del llm
    if device == "cuda":
        torch.cuda.empty_cache()


for model in sys.argv[1:] or ["gemma-3-12b-it"]:
    timeline(model)
