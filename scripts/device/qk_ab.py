"""Twenty-seventh session: Qwen3-30B-A3B batch-1 decode with the q and k RMSNorms as two
kernels (before) and as one (`norm.qk_norm`, now), one engine at a time in one process."""

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.bench.text import variant_ms
from polymodal.llm_core.models import llama

model_dir = resolve_bench_model("qwen3-30b-a3b")
bandwidth = measure_bandwidth()
fused = llama.qk_norm
for label in ("two norm kernels (before)", "one qk_norm kernel (now)"):
    llama.qk_norm = fused if "now" in label else (lambda qn, kn, q, k: (qn(q), kn(k)))
    variant_ms(label, model_dir, bandwidth, max_model_len=4096, dummy_weights=True)
