"""Batch-1 decode of a decoder with q/k head norms (Qwen3-30B-A3B, Gemma-3-12B) with the norms
as two kernels, as one (`norm.qk_norm`) and folded into the decode kernel (`QKNorms`, the
default), one engine at a time in one process.

    python3 scripts/device/qk_ab.py [qwen3-30b-a3b|gemma-3-12b] [variant ...]
"""

import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.bench.text import variant_ms
from polymodal.llm_core.attention import layer

VARIANTS = ("two kernels", "one kernel", "folded")
name = sys.argv[1] if len(sys.argv) > 1 else "qwen3-30b-a3b"
model_dir = resolve_bench_model(name)
bandwidth = measure_bandwidth()
fold, qk_norm = layer.foldable_qk_norms, layer.qk_norm
# Gemma's norms were one kernel already before the fold
for variant in sys.argv[2:] or (VARIANTS[1:] if "gemma" in name else VARIANTS):
    layer.foldable_qk_norms = fold if variant == "folded" else (lambda *args: None)
    layer.qk_norm = ((lambda qn, kn, q, k: (qn(q), kn(k))) if variant == "two kernels"
                     else qk_norm)  # fmt: skip
    variant_ms(f"{name} {variant}", model_dir, bandwidth, max_model_len=4096, dummy_weights=True)
