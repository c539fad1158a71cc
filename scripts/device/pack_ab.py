"""Issue 15: a fresh chunk's rotary + KV store + SDPA's padded copies in one launch
(`attention/sdpa_pack.py`, on) against the rotary kernel, `store_kv` and the copies (off), one
engine, alternating on / off / on / off; the median TTFT of five fresh 1080p and 4K images each.

    python3 scripts/device/pack_ab.py
"""

from polymodal.bench import resolve_bench_model
from polymodal.bench.media import MAX_MODEL_LEN, ours_ttft, warm_up
from polymodal.bench.workloads import OurSide, _max_positions
from polymodal.llm_core.attention.layer import AttentionLayer

model_dir = resolve_bench_model("qwen2.5-vl-7b")
ours = OurSide(model_dir, dummy_weights=True, prefix_caching=True,
               max_model_len=min(MAX_MODEL_LEN, _max_positions(model_dir)))  # fmt: skip
warm_up(ours)
fused = AttentionLayer.fresh_prefill
for round_, on in enumerate((True, False, True, False)):
    AttentionLayer.fresh_prefill = fused if on else (lambda self, *args: None)
    for name in ("1080p", "4k"):
        seeds = [100 * round_ + i for i in range(5)]
        row = ours_ttft(ours, name, seeds, again=False)
        calls = " ".join(f"{t:.1f}" for t in row["calls_ms"])
        print(
            f"pack {'on ' if on else 'off'} {name:6s} median {row['ttft_ms']:7.1f} ms  "
            f"({calls}; host {row['host_ms']:.1f})"
        )
