"""Batch-1 decode A/B of the twenty-sixth session's two latency changes, one engine per
variant in this process (dummy bf16 weights, 256 tokens after 32, best of two), ms a token
and % of the floor at this process's copy rate:

- early: the sandwich-norm kernel reads the residual before its PDL wait
  (`triton_norm.RESIDUAL_BEFORE_WAIT`);
- merge: the decode kernel's split merge loads every split's LSE at once and the partials four
  at a time (`triton_decode.MERGE_UNROLL`; 1: one split a load).

(A third, the next block's pre-norm left to the GEMV after the sandwich kernel, measured no
gain on an H100 and was taken out: docs/performance.md, twenty-sixth session.)

Gemma-3-12B (issue 16's >= 85%): all on, each one off, all off, all on again; Qwen2.5-VL-7B:
the merge on and off (`python3 scripts/device/gemma_s26.py [gemma|qwen|both]`)."""

import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.llm_core.attention import triton_decode
from polymodal.llm_core.layers import triton_norm

sys.path.insert(0, "scripts")
from bench_text_decode import variant_ms  # noqa: E402

CHANGES = ("early", "merge")


def run(label, model, off=()):
    triton_norm.RESIDUAL_BEFORE_WAIT = "early" not in off
    triton_decode.MERGE_UNROLL = 1 if "merge" in off else 4
    variant_ms(label, model, bw)


which = sys.argv[1] if len(sys.argv) > 1 else "both"
bw = measure_bandwidth()
if which in ("gemma", "both"):
    gemma = resolve_bench_model("gemma-3-12b")
    run("gemma: both", gemma)
    run("gemma: none (before)", gemma, CHANGES)
    for change in CHANGES:
        run(f"gemma: all but {change}", gemma, (change,))
if which in ("qwen", "both"):
    qwen = resolve_bench_model("qwen2.5-vl-7b")
    run("qwen 7b: merge unroll 4", qwen)
    run("qwen 7b: merge unroll 1", qwen, ("merge",))
    run("qwen 7b: merge unroll 4 again", qwen)
