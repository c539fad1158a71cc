"""A/B of the media workload's captioning row between two installs of polymodal (PYTHONPATH
picks which): `caption_1080p` (N fresh 1080p images x 128 tokens against the floor rate, then
16 more profiled for the GPU idle share). Argument: a label; optional N (default 256)."""

import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import MAX_MODEL_LEN, matmul_tflops, warm_up
from polymodal.bench.media_caption import caption_1080p, print_row
from polymodal.bench.workloads import OurSide, _max_positions

model_dir = resolve_bench_model("qwen2.5-vl-7b")
ours = OurSide(model_dir, dummy_weights=True, prefix_caching=True,
               max_model_len=min(MAX_MODEL_LEN, _max_positions(model_dir)))  # fmt: skip
warm_up(ours)
count = int(sys.argv[2]) if len(sys.argv) > 2 else 256
row = caption_1080p(ours, count, 128, matmul_tflops())
row["caption_images"] = count
print(f"== {sys.argv[1]}", flush=True)
print_row(row)
