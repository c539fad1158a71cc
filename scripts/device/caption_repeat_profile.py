"""Where the media workload's remaining time goes (issue 15), for the next changes: the kernel
table of 1080p captioning (16 images x 128 tokens, profiled: which kernels hold the GPU time
that keeps it at ~57% of the floor rate), then a repeated 1080p image right after its fresh
call (encoder output still cached): host cProfile and kernel table of the repeat."""

import cProfile
import io
import pstats

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import MAX_MODEL_LEN, _first_token_ms, media, photo, warm_up
from polymodal.bench.media_caption import SIZE
from polymodal.bench.profile import calls_profile, print_calls_profile
from polymodal.bench.workloads import TEXT_TOKENS, OurSide, _max_positions, text_ids

model_dir = resolve_bench_model("qwen2.5-vl-7b")
ours = OurSide(model_dir, dummy_weights=True, prefix_caching=True,
               max_model_len=min(MAX_MODEL_LEN, _max_positions(model_dir)))  # fmt: skip
warm_up(ours)
ours.caption([photo(SIZE, 300 + i) for i in range(4)], 4)
pics = iter([[photo(SIZE, 900 + 16 * k + i) for i in range(16)] for k in range(2)])
ours.caption(next(pics), 128)  # same shapes once more before the profiled run
prof = calls_profile(lambda: ours.caption(next(pics), 128), 1, top=24)
print_calls_profile("captioning 1080p, 16 images x 128 tokens (profiled)", prof)

cfg = ours.processor.config
kind, image = media("1080p", 77)
ids = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_start_token_id + 1]
ids += text_ids(TEXT_TOKENS, 77, ours.vocab)
print(
    "1080p fresh",
    round(_first_token_ms(ours, ids, kind, image), 1),
    "ms; again",
    [round(_first_token_ms(ours, ids, kind, image), 2) for _ in range(5)],
    flush=True,
)
host = cProfile.Profile()
host.enable()
ms = _first_token_ms(ours, ids, kind, image)
host.disable()
text = io.StringIO()
pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(25)
print(f"=== 1080p again (cProfile, by self time): {ms:.1f} ms")
print("\n".join(line[:150] for line in text.getvalue().splitlines() if line.strip()))
prof = calls_profile(lambda: _first_token_ms(ours, ids, kind, image), 3, top=14)
print_calls_profile("1080p again (profiled)", prof)
