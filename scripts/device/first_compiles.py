"""Which Triton kernels compile in a process's first 1080p image and first 64-frame video after
the load-time warm-up and the 448 px calls (issue 13 item 3): each compile's kernel, its
specialization and seconds, timed by Triton's JIT hooks. Output: stdout.
Argument: the engine's `sdpa_shapes` policy (default second)."""

import sys
import time

from triton import knobs

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import MAX_MODEL_LEN, _first_token_ms, media, warm_up
from polymodal.bench.workloads import TEXT_TOKENS, OurSide, _max_positions, text_ids

compiles = []
started = {}


def before(**kw):
    started[kw["key"]] = time.perf_counter()
    return False  # compile as usual


def after(**kw):
    seconds = time.perf_counter() - started.pop(kw["key"], time.perf_counter())
    compiles.append((seconds, kw["repr"]))


knobs.runtime.jit_cache_hook = before
knobs.runtime.jit_post_compile_hook = after

model_dir = resolve_bench_model("qwen2.5-vl-7b")
ours = OurSide(
    model_dir,
    dummy_weights=True,
    max_model_len=min(MAX_MODEL_LEN, _max_positions(model_dir)),
    prefix_caching=True,
    sdpa_shapes=sys.argv[1] if len(sys.argv) > 1 else "second",
)
print(
    f"load: {len(compiles)} compiles, {sum(s for s, _ in compiles):.2f} s; "
    f"load-time warm-up {ours.engine.runner.warm_up_seconds:.2f} s",
    flush=True,
)
compiles.clear()
warm_up(ours)
print(f"warm-up calls (448 px x 2, 500x333): {len(compiles)} compiles", flush=True)
compiles.clear()
cfg = ours.processor.config


def call(name, seed):
    kind, item = media(name, seed)
    token = cfg.image_token_id if kind == "image" else cfg.video_token_id
    ids = [cfg.vision_start_token_id, token, cfg.vision_start_token_id + 1] + text_ids(
        TEXT_TOKENS, seed, ours.vocab
    )
    return _first_token_ms(ours, ids, kind, item)


for name, seed in (
    ("1080p", 11),
    ("1080p", 12),
    ("1080p", 13),
    ("4k", 11),
    ("video16", 11),
    ("video64", 11),
    ("video64", 12),
):
    ms = call(name, seed)
    print(
        f"=== {name} seed {seed}: {ms:.1f} ms, {len(compiles)} compiles "
        f"{sum(s for s, _ in compiles):.2f} s",
        flush=True,
    )
    for seconds, text in compiles:
        print(f"  {seconds:6.3f} s  {text[:400]}", flush=True)
    compiles.clear()
