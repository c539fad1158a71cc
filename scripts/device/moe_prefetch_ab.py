"""Batch-1 decode of an MoE model with the routing launch asking L2 for the next layer's first
weight (`moe_route.L2_PREFETCH_BYTES`, MB given per variant; 0 = off; a trailing "last": at
L2's evict-last priority), one engine at a time in one process (each variant's graphs are
captured with its own setting).

    python3 scripts/device/moe_prefetch_ab.py qwen3-30b-a3b 0 16 0 16 8 24 16last
"""

import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.bench.text import variant_ms
from polymodal.llm_core.layers import moe_route

name = sys.argv[1]
model_dir = resolve_bench_model(name)
bandwidth = measure_bandwidth()
print(f"copy rate {bandwidth / 1e12:.2f} TB/s", flush=True)
for mb in sys.argv[2:]:
    moe_route.L2_PREFETCH_EVICT_LAST = mb.endswith("last")
    moe_route.L2_PREFETCH_BYTES = int(float(mb.removesuffix("last")) * (1 << 20))
    variant_ms(f"{name} prefetch {mb} MB", model_dir, bandwidth, max_model_len=4096,
               dummy_weights=True)  # fmt: skip
