"""Gemma-3-12B batch-1 decode (dummy bf16 weights, 256 tokens after 32) with the decode
attention's splits of one 32-key tile (`triton_backend.split_keys`, the default now) against
two chained tiles a split (64 keys, before). The twentieth session's profile: decode attention
10.5 us a call at a 32-80 token context, 48 calls a token. One engine per variant in this
process, the first again last (drift). Prints ms a token and % of the floor."""

import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.llm_core.attention import triton_backend

sys.path.insert(0, "scripts")
from bench_text_decode import variant_ms  # noqa: E402

one_tile = triton_backend.split_keys


def run(label, keys=None):
    triton_backend.split_keys = (lambda block_n: keys) if keys else one_tile
    variant_ms(label, model_dir, bw)


model_dir = resolve_bench_model("gemma-3-12b")
bw = measure_bandwidth()
run("64 keys a split (before)", 64)
run("one 32-key tile a split")
run("64 keys a split again", 64)
run("one 32-key tile a split again")
