"""Gemma-3-12B batch-1 decode (dummy bf16 weights, 256 tokens after 32) with the decode
attention's splits of one 32-key tile (`triton_backend.split_keys`, the default now) against
two chained tiles a split (64 keys, before). The twentieth session's profile: decode attention
10.5 us a call at a 32-80 token context, 48 calls a token. One engine per variant in this
process, the first again last (drift). Prints ms a token and % of the floor."""

import sys
import time

import torch

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.bench.workloads import active_decoder_bytes
from polymodal.llm_core.attention import triton_backend
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig

sys.path.insert(0, "scripts")
from bench_text_decode import decode_ms, throughput  # noqa: E402

one_tile = triton_backend.split_keys


def run(label, keys=None):
    triton_backend.split_keys = (lambda block_n: keys) if keys else one_tile
    config = EngineConfig(dtype="bfloat16", dummy_weights=True, skip_tokenizer_init=True,
                          gpu_memory_utilization=0.85, enable_prefix_caching=False)  # fmt: skip
    engine = Engine(str(model_dir), config)
    vocab = engine.model_config.vocab_size
    floor_ms = active_decoder_bytes(engine.runner.model, 1) / bw * 1e3
    throughput(engine, vocab, 16, 8)  # warm-up
    ms = min(decode_ms(engine, vocab) for _ in range(2))
    print(f"{label:30s} {ms:.3f} ms  floor {floor_ms:.3f}  {100 * floor_ms / ms:.1f}%", flush=True)
    del engine
    torch.cuda.empty_cache()
    time.sleep(1)


model_dir = resolve_bench_model("gemma-3-12b")
bw = measure_bandwidth()
run("64 keys a split (before)", 64)
run("one 32-key tile a split")
run("64 keys a split again", 64)
run("one 32-key tile a split again")
