"""Twenty-seventh session: a long video's TTFT against the prefill chunk budget (issue 15).

A 64-frame 720p video (38,306 tokens) prefills in three 16,384-token chunks by default; each
later chunk's causal attention runs as two SDPA calls (the cached context, then its own keys)
and a merge. One chunk of the whole prompt is one causal call (~610 TFLOP/s at 38k on an H200).
This times the video (and a 4K image) at each budget, one engine at a time in one process.

    python3 scripts/device/chunk_ab.py [budget ...]
"""

import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import MAX_MODEL_LEN, input_flops, matmul_tflops, ours_ttft, warm_up
from polymodal.bench.workloads import OurSide, _max_positions

budgets = [int(b) for b in sys.argv[1:]] or [16384, 40960]
model_dir = resolve_bench_model("qwen2.5-vl-7b")
rate = matmul_tflops()
for budget in budgets:
    ours = OurSide(model_dir, dummy_weights=True, max_model_len=min(MAX_MODEL_LEN,
                   _max_positions(model_dir)), prefix_caching=True,
                   max_num_batched_tokens=budget)  # fmt: skip
    warm_up(ours)
    for name, seeds in (("4k", [11, 12, 13, 14, 15]), ("video64", [11, 12, 13])):
        row = ours_ttft(ours, name, seeds, again=False)
        floor = input_flops(ours.model, row["grid_thw"], row["prompt_tokens"]) / rate / 1e9
        print(f"budget {budget:6d} {name:8s} TTFT {row['ttft_ms']:8.1f} ms  calls "
              f"{[round(t, 1) for t in row['calls_ms']]}  floor {floor:.1f}  "
              f"{100 * floor / row['ttft_ms']:.0f}%", flush=True)  # fmt: skip
    ours.free()
