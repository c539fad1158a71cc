"""A/B of TTFTs between two installs of polymodal (PYTHONPATH picks which): the media bench's
448 px warm-up, then 448 px and 1080p fresh calls (median) and a repeat. Prints one line."""

import statistics
import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import MAX_MODEL_LEN, ours_ttft
from polymodal.bench.workloads import OurSide, _max_positions

model_dir = resolve_bench_model("qwen2.5-vl-7b")
max_len = min(MAX_MODEL_LEN, _max_positions(model_dir))
ours = OurSide(model_dir, dummy_weights=True, max_model_len=max_len, prefix_caching=True)
ours_ttft(ours, "448px", [900, 901], again=False)
a = ours_ttft(ours, "448px", list(range(11, 21)), again=True)
b = ours_ttft(ours, "1080p", [11, 12, 13, 14, 15], again=True)
print(
    f"{sys.argv[1]}: 448 calls {[round(x, 1) for x in a['calls_ms']]} median "
    f"{statistics.median(a['calls_ms'][2:]):.1f} again {a['repeat_ttft_ms']:.1f} | 1080p calls "
    f"{[round(x, 1) for x in b['calls_ms']]} again {b['repeat_ttft_ms']:.1f}",
    flush=True,
)
