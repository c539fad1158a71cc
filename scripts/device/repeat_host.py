"""Twenty-eighth session: where a repeated 1080p image's TTFT goes on the host (issue 15's
<= 8 ms target). After a fresh 1080p call, eight repeats of the same image, each split into
`process_tokens` (the content hash and the input-cache hit), `stage_ahead`, the engine's
`add` and the steps until the first token; then a cProfile of three more.

    python3 scripts/device/repeat_host.py
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
kind, item = media("1080p", 7)
ids = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_start_token_id + 1]
ids += text_ids(TEXT_TOKENS, 7, ours.vocab)


def call():
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prompt = ours.processor.process_tokens(ids, [MediaRef(kind, item)])
    t1 = time.perf_counter()
    ours.model.stage_ahead(prompt.mm_items)
    t2 = time.perf_counter()
    rid = ours._add(prompt, 1)
    t3 = time.perf_counter()
    steps = 0
    while not any(o.request_id == rid for o in ours.engine.step()):
        steps += 1
    t4 = time.perf_counter()
    ours.engine.step()
    return [(b - a) * 1e3 for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t0, t4))], steps


print("fresh", call())
rows = [call() for _ in range(8)]
for name, i in (("process", 0), ("stage", 1), ("add", 2), ("steps", 3), ("total", 4)):
    vals = [r[0][i] for r in rows]
    print(
        f"repeat {name:8s} median {statistics.median(vals):6.2f} ms  "
        + " ".join(f"{v:.2f}" for v in vals)
    )
print("steps before the token:", [r[1] for r in rows])
prof = cProfile.Profile()
prof.enable()
for _ in range(3):
    call()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)
