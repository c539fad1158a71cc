"""Where a size's first request goes (host profile of the first 1080p image and the first
64-frame video after the 448 px warm-up), then fresh same-size calls timed, and a kernel table
of a 64-frame video's TTFT. Output: stdout and $OUT/first_calls.txt.
Argument: the engine's `sdpa_shapes` policy (second, first, exact; default second)."""

import cProfile
import io
import pstats
import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import MAX_MODEL_LEN, _first_token_ms, media, warm_up
from polymodal.bench.profile import calls_profile, print_calls_profile
from polymodal.bench.workloads import TEXT_TOKENS, OurSide, _max_positions, text_ids

model_dir = resolve_bench_model("qwen2.5-vl-7b")
ours = OurSide(
    model_dir,
    dummy_weights=True,
    max_model_len=min(MAX_MODEL_LEN, _max_positions(model_dir)),
    prefix_caching=True,
    sdpa_shapes=sys.argv[1] if len(sys.argv) > 1 else "second",
)
print(
    f"sdpa_shapes={ours.model.visual.attn_backend.shapes.policy}, "
    f"load-time warm-up {ours.engine.runner.warm_up_seconds:.2f} s",
    flush=True,
)
warm_up(ours)
cfg = ours.processor.config


def call(name, seed):
    kind, item = media(name, seed)
    token = cfg.image_token_id if kind == "image" else cfg.video_token_id
    ids = [cfg.vision_start_token_id, token, cfg.vision_start_token_id + 1] + text_ids(
        TEXT_TOKENS, seed, ours.vocab
    )
    return _first_token_ms(ours, ids, kind, item)


def host_profile(name, seed, top=28):
    prof = cProfile.Profile()
    prof.enable()
    ms = call(name, seed)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(top)
    text = "\n".join(line[:160] for line in s.getvalue().splitlines() if line.strip())
    print(f"=== {name} seed {seed}: {ms:.1f} ms\n{text}", flush=True)


host_profile("1080p", 11)
print("1080p again fresh:", [round(call("1080p", s), 1) for s in (12, 13)], flush=True)
host_profile("video64", 11)
print("video64 fresh:", [round(call("video64", s), 1) for s in (12,)], flush=True)
seeds = iter([13, 14])
prof = calls_profile(
    lambda: call("video64", next(seeds)),
    1,
    [(ours.model, "encode", "vision encoder"), (ours.model, "forward", "decoder")],
    top=14,
)
print_calls_profile("64-frame TTFT (fresh video, profiled)", prof)

# a repeated input (processed-input cache, encoder and prefix caches hit): host and GPU
for name, seed in (("1080p", 12), ("video64", 12)):
    call(name, seed)  # the same input as an earlier call: now a hit
    host_profile(name, seed, top=22)
    prof = calls_profile(
        lambda n=name, s=seed: call(n, s),
        2,
        [(ours.model, "encode", "vision encoder"), (ours.model, "forward", "decoder")],
        top=10,
    )
    print_calls_profile(f"{name} again (profiled)", prof)
