"""Gemma-3-12B batch-1 decode (dummy bf16 weights, 256 tokens after 32) under launch variants
of its two non-GEMV costs (the twentieth session's profile: decode attention 10.5 us a layer at
head_dim 256, the sandwich norm 4.2 us a call): the sandwich kernel's warps (16 by default: one
program of 4096 lanes) and the decode kernel's key tile (64). One engine per variant in this
process, the base first and last (drift). Prints ms a token and % of the floor."""

import functools
import sys
import time

import torch

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.bench.workloads import active_decoder_bytes
from polymodal.llm_core.attention import triton_backend
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.layers import triton_norm

sys.path.insert(0, "scripts")
from bench_text_decode import decode_ms, throughput  # noqa: E402

original = triton_norm.sandwich_norm


def sandwich_with(warps):
    return functools.partial(original, num_warps=warps)


def run(label, warps=None, block_n=64):
    triton_norm.sandwich_norm = sandwich_with(warps) if warps else original
    # triton_ops re-exports it: patch what fused_ops() hands out too
    from polymodal.llm_core.layers import triton_ops

    triton_ops.sandwich_norm = triton_norm.sandwich_norm
    triton_backend.decode_block_n = lambda head_dim: block_n  # pinned, whatever the head dim
    config = EngineConfig(dtype="bfloat16", dummy_weights=True, skip_tokenizer_init=True,
                          max_model_len=4096, gpu_memory_utilization=0.85,
                          enable_prefix_caching=False)  # fmt: skip
    engine = Engine(str(model_dir), config)
    vocab = engine.model_config.vocab_size
    floor_ms = active_decoder_bytes(engine.runner.model, 1) / bw * 1e3
    throughput(engine, vocab, 16, 8)  # warm-up
    ms = min(decode_ms(engine, vocab) for _ in range(2))
    print(f"{label:28s} {ms:.3f} ms  floor {floor_ms:.3f}  {100 * floor_ms / ms:.1f}%", flush=True)
    del engine
    torch.cuda.empty_cache()
    time.sleep(1)


model_dir = resolve_bench_model("gemma-3-12b")
bw = measure_bandwidth()
run("base (16 warps, 64 keys)")
run("sandwich 4 warps", warps=4)
run("sandwich 8 warps", warps=8)
run("decode 32-key tiles", block_n=32)
run("base again")
