"""Twenty-seventh session: the host's share of a fresh large input's TTFT (issue 15).

The media bench's profile (H100) showed the GPU idle 10-22% of a fresh 1080p / 4K / 64-frame
TTFT, mostly before its first kernel: the processor's host work (decoding to arrays, content
hashes, the upload). This times `process_tokens` + `stage_ahead` of fresh inputs, then
cProfiles one of each (top functions by own time).

    python3 scripts/device/host_media.py
"""

import cProfile
import pstats
import statistics
import time

import torch

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import MAX_MODEL_LEN, media, warm_up
from polymodal.bench.workloads import TEXT_TOKENS, OurSide, _max_positions, text_ids
from polymodal.processors.chat import MediaRef

model_dir = resolve_bench_model("qwen2.5-vl-7b")
ours = OurSide(model_dir, dummy_weights=True, prefix_caching=True,
               max_model_len=min(MAX_MODEL_LEN, _max_positions(model_dir)))  # fmt: skip
warm_up(ours)
cfg = ours.processor.config


def host(name, seed, profiler=None):
    kind, item = media(name, seed)
    token = cfg.image_token_id if kind == "image" else cfg.video_token_id
    ids = [cfg.vision_start_token_id, token, cfg.vision_start_token_id + 1]
    ids += text_ids(TEXT_TOKENS, seed, ours.vocab)
    torch.cuda.synchronize()
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    prompt = ours.processor.process_tokens(ids, [MediaRef(kind, item)])
    processed = time.perf_counter()
    ours.model.stage_ahead(prompt.mm_items)
    for it in prompt.mm_items:  # the staged pixels: what the tower would wait for
        staged = getattr(it, "staged", None)
        if staged is not None and hasattr(staged, "result"):
            staged.result()
    torch.cuda.synchronize()
    if profiler:
        profiler.disable()
    end = time.perf_counter()
    return (processed - start) * 1e3, (end - start) * 1e3


for name in ("1080p", "4k", "video64"):
    runs = [host(name, 50 + i) for i in range(3)]
    print(f"{name:8s} process_tokens {statistics.median(r[0] for r in runs):7.1f} ms, "
          f"+ stage_ahead + sync {statistics.median(r[1] for r in runs):7.1f} ms", flush=True)
    prof = cProfile.Profile()
    host(name, 60, prof)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(10)
