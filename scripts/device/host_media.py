"""Twenty-seventh session: the host's share of a fresh large input's TTFT (issue 15).

The media bench's profile (H100) showed the GPU idle 10-22% of a fresh 1080p / 4K / 64-frame
TTFT, mostly before its first kernel: the processor's host work (decoding to arrays, content
hashes, the upload). This times `process_tokens` + `stage_ahead` of fresh inputs with
Pillow's pixels read in place and copied (`hashing.USE_PIXEL_VIEWS`), cProfiles one of each,
then times the fresh and repeated TTFTs (views on).

    python3 scripts/device/host_media.py
"""

import cProfile
import pstats
import statistics
import time

import torch

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import (
    MAX_MODEL_LEN,
    input_flops,
    matmul_tflops,
    media,
    ours_ttft,
    warm_up,
)
from polymodal.bench.workloads import TEXT_TOKENS, OurSide, _max_positions, text_ids
from polymodal.processors import hashing
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


for run, views in enumerate((False, True, False, True)):  # read in place, or copied
    hashing.USE_PIXEL_VIEWS = views
    for name in ("1080p", "4k", "video64"):
        runs = [host(name, 100 * run + 50 + i) for i in range(3)]  # fresh: no cache hits
        print(
            f"views {views!s:5s} {name:8s} process_tokens "
            f"{statistics.median(r[0] for r in runs):7.1f} ms, + stage_ahead + sync "
            f"{statistics.median(r[1] for r in runs):7.1f} ms",
            flush=True,
        )
for name in ("4k", "video64"):
    prof = cProfile.Profile()
    host(name, 80, prof)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(8)
rate = matmul_tflops()
for name, seeds in (("1080p", [91, 92, 93, 94, 95]), ("4k", [91, 92, 93, 94, 95]),
                    ("video64", [91, 92, 93])):  # fmt: skip
    row = ours_ttft(ours, name, seeds, again=True)
    floor = input_flops(ours.model, row["grid_thw"], row["prompt_tokens"]) / rate / 1e9
    print(
        f"TTFT {name:8s} {row['ttft_ms']:7.1f} ms, floor {floor:.1f} ms = "
        f"{100 * floor / row['ttft_ms']:.0f}% (calls {[round(t, 1) for t in row['calls_ms']]}"
        f"), again {row['repeat_ttft_ms']:.1f} ms",
        flush=True,
    )
