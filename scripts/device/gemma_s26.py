"""Batch-1 decode A/B of the twenty-sixth session's two latency changes, one engine per
variant in this process (dummy bf16 weights, 256 tokens after 32, best of two; the first
variant again last for drift), ms a token and % of the floor at this process's copy rate:

- the sandwich-norm kernel reads the residual before its PDL wait
  (`triton_norm.RESIDUAL_BEFORE_WAIT`);
- the decode kernel's split merge loads every split's LSE at once and the partials four at a
  time (`triton_decode.MERGE_UNROLL`; 1: one split a load).

Gemma-3-12B (issue 16's >= 85%) with all four combinations; Qwen2.5-VL-7B with the merge on
and off (`python3 scripts/device/gemma_s26.py [gemma|qwen|both]`)."""

import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.llm_core.attention import triton_decode
from polymodal.llm_core.layers import triton_norm

sys.path.insert(0, "scripts")
from bench_text_decode import variant_ms  # noqa: E402


def run(label, model, early=True, unroll=4):
    triton_norm.RESIDUAL_BEFORE_WAIT = early
    triton_decode.MERGE_UNROLL = unroll
    variant_ms(label, model, bw)


which = sys.argv[1] if len(sys.argv) > 1 else "both"
bw = measure_bandwidth()
if which in ("gemma", "both"):
    gemma = resolve_bench_model("gemma-3-12b")
    run("gemma: both (new)", gemma)
    run("gemma: neither (before)", gemma, early=False, unroll=1)
    run("gemma: early residual only", gemma, unroll=1)
    run("gemma: merge unroll only", gemma, early=False)
    run("gemma: both again", gemma)
if which in ("qwen", "both"):
    qwen = resolve_bench_model("qwen2.5-vl-7b")
    run("qwen 7b: merge unroll 4", qwen)
    run("qwen 7b: merge unroll 1", qwen, unroll=1)
    run("qwen 7b: merge unroll 4 again", qwen)
