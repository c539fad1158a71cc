"""Time the MoE and MLA Triton kernels on CUDA and report the bandwidth they reach.

    python scripts/bench_moe.py                  # bf16, the shipped models' shapes
    python scripts/bench_moe.py --tokens 1,8,64,512

MoE rows: `fused_experts` for one layer; GB/s = bytes of the distinct experts the tokens chose
(what the step must read) / time; against the dense per-expert loop (transformers' algorithm)
timed the same way. MLA rows: `mla_decode` (absorbed form) over a paged latent cache; GB/s =
latent bytes of every sequence's context / time (the cache read once per step is the floor).
Timings are CUDA-graph replays (`triton.testing.do_bench_cudagraph`, median).
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from polymodal.llm_core.attention.triton_mla import mla_decode
from polymodal.llm_core.layers.moe import experts_reference
from polymodal.llm_core.layers.triton_moe import fused_experts

MOE_SHAPES = {  # name: (experts, top_k, hidden, expert intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "deepseek-v3": (256, 8, 7168, 2048),
}


def graph_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def bench_moe(name: str, tokens: int) -> None:
    experts, top_k, hidden, inter = MOE_SHAPES[name]
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    down = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weights, ids = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1)
    chosen = ids.unique().numel()
    nbytes = chosen * 3 * hidden * inter * 2
    ms = graph_ms(lambda: fused_experts(x, gate_up, down, weights, ids))
    line = f"moe {name:14s} tokens {tokens:5d} experts read {chosen:4d}  {ms * 1e3:9.1f} us "
    line += f"{nbytes / ms / 1e6:7.0f} GB/s"
    if tokens <= 64:  # the dense loop syncs per expert: timed eagerly, small batches only
        ref = triton.testing.do_bench(
            lambda: experts_reference(x, gate_up, down, weights, ids), return_mode="median"
        )
        line += f"   dense loop {ref * 1e3:9.1f} us"
    print(line)


def bench_mla(batch: int, context: int, page: int = 16) -> None:
    heads, rank, rope = 128, 512, 64
    blocks = batch * -(-context // page)
    cache = torch.randn(blocks, page, 1, rank + rope, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, rank + rope, device="cuda", dtype=torch.bfloat16)
    ms = graph_ms(lambda: mla_decode(q, cache, tables, seq_lens, rank, 192**-0.5))
    nbytes = batch * context * (rank + rope) * 2
    print(f"mla decode batch {batch:4d} context {context:6d}  {ms * 1e3:9.1f} us "
          f"{nbytes / ms / 1e6:7.0f} GB/s of latent cache")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,4,32,256,2048")
    parser.add_argument("--mla", default="1x1024,1x8192,1x32768,32x4096,256x1024")
    args = parser.parse_args()
    for name in MOE_SHAPES:
        for tokens in map(int, args.tokens.split(",")):
            bench_moe(name, tokens)
    for case in args.mla.split(","):
        batch, context = map(int, case.split("x"))
        bench_mla(batch, context)


if __name__ == "__main__":
    main()
