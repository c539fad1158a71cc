"""Issue 17: Qwen3-30B-A3B's decode expert launches with their K loops pipelined through shared
memory (`GemvConfig.num_stages` > 1: `tl.range(num_stages=...)`; a plain `range` is never
pipelined, so every earlier config streamed each tile only after the previous one's math).
Part 1: the experts at one token (`bench_moe.cycled_experts`: 16 disjoint expert sets, CUDA
graph replays, us and TB/s of the chosen experts' weights), the defaults then each variant;
part 2 (`both`): batch-1 decode of the dummy-weight model with the fastest variant (if one wins
by > 3%) against the defaults, and with the route launch skipped (`fixed_route`: the bound of a
router fold), alternating.

    python3 scripts/device/moe_stages.py layers
    python3 scripts/device/moe_stages.py both
"""

import dataclasses
import sys

import torch

sys.path.insert(0, "scripts")
from bench_moe import cycled_experts, decode_inputs, expert_sets, graph_ms  # noqa: E402

from polymodal.llm_core.layers import moe_decode  # noqa: E402

DEFAULT = moe_decode.expert_config
ROUTE = moe_decode.route


def variants(gate_up, down) -> dict:
    """name: (gate_up's, down's) config: the defaults with stages on either or both, and the
    narrower blocks that keep more programs an SM (stages cost 16 registers a thread)."""
    staged = dataclasses.replace
    out = {"default": (gate_up, down)}
    for s in (2, 3):
        out[f"gate_up s{s}"] = (staged(gate_up, num_stages=s), down)
        out[f"down s{s}"] = (gate_up, staged(down, num_stages=s))
        out[f"both s{s}"] = (staged(gate_up, num_stages=s), staged(down, num_stages=s))
    out["gate_up 8x1024 s2"] = (staged(gate_up, block_n=8, block_k=1024, num_stages=2), down)
    out["down 16x256 s2"] = (gate_up, staged(down, block_n=16, num_stages=2))
    return out


def layers_part() -> list[str]:
    t = decode_inputs("qwen3-30b-a3b", 1)
    sets = expert_sets(t)
    nbytes = t["top_k"] * t["gate_up"][0].numel() * 3 // 2 * 2
    base = None
    faster = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gate_up = DEFAULT(8, 1536, 2048, sms, True)
    down = DEFAULT(8, 2048, 768, sms, True)
    ref = None
    for name, configs in variants(gate_up, down).items():
        try:
            out = cycled_experts(t, sets[:1], configs=configs)().h
            ms = graph_ms(cycled_experts(t, sets, configs=configs), rep=50)
        except Exception as exc:  # a variant that does not compile or fit: say so, go on
            print(f"{name:18s} failed: {type(exc).__name__}: {exc}"[:300], flush=True)
            continue
        ref = out if ref is None else ref
        diff = (out.float() - ref.float()).abs().max().item()  # the same sums: 0 expected
        base = base or ms
        print(f"{name:18s} {ms * 1e3:6.1f} us ({nbytes / ms / 1e9:.2f} TB/s)  max diff "
              f"{diff:.3g}  {configs}", flush=True)  # fmt: skip
        faster += [(ms, name)] if ms < 0.97 * base else []
    return [name for _, name in sorted(faster)]


FIXED: dict = {}  # (rows, top_k, shared, experts): `fixed_route`'s tensors


def fixed_route(x, weight, top_k, *args, shared_experts=0, **kwargs):
    """`moe_decode.route` without its launch: each row's first `top_k` experts (and the shared
    ones) at weight 1/top_k, static tensors a graph captures. Timing only (the tokens are
    nonsense): the most folding the router into the o-proj GEMV could save."""
    rows = x.h if hasattr(x, "h") else x
    key = (rows.shape[0], top_k, shared_experts, weight.shape[0])
    if key not in FIXED:
        ids = torch.arange(top_k + shared_experts, dtype=torch.int32, device=rows.device)
        ids[top_k:] += weight.shape[0] - top_k  # shared expert s is id E + s
        weights = torch.full(ids.shape, 1.0 / top_k, device=rows.device)
        weights[top_k:] = 1.0
        FIXED[key] = (weights.repeat(rows.shape[0], 1), ids.repeat(rows.shape[0], 1))
    return FIXED[key]


def engine_part(names: list[str]) -> None:
    from polymodal.bench import resolve_bench_model
    from polymodal.bench.engine import measure_bandwidth
    from polymodal.bench.text import variant_ms

    model_dir = resolve_bench_model("qwen3-30b-a3b")
    bandwidth = measure_bandwidth()
    print(f"copy rate {bandwidth / 1e12:.2f} TB/s", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = variants(DEFAULT(8, 1536, 2048, sms, True), DEFAULT(8, 2048, 768, sms, True))
    for name in names:
        if name == "no route":  # the upper bound of a router fold: the defaults, route skipped
            moe_decode.expert_config, moe_decode.route = DEFAULT, fixed_route
            variant_ms("qwen3-30b-a3b no route", model_dir, bandwidth, max_model_len=4096,
                       dummy_weights=True)  # fmt: skip
            moe_decode.route = ROUTE
            continue

        def config(num_pairs, n, k, sms, is_cuda, one_tile=False, pair=chosen[name]):
            cfg = DEFAULT(num_pairs, n, k, sms, is_cuda, one_tile)
            if num_pairs != 8 or not is_cuda:
                return cfg
            return pair[0] if (n, k) == (1536, 2048) else pair[1] if (n, k) == (2048, 768) else cfg

        moe_decode.expert_config = config
        variant_ms(f"qwen3-30b-a3b {name}", model_dir, bandwidth, max_model_len=4096,
                   dummy_weights=True)  # fmt: skip


if __name__ == "__main__":
    best = layers_part()
    print("faster than the default by > 3%:", best or "none", flush=True)
    if sys.argv[1:] == ["both"]:
        engine_part(["default", *best[:1], "no route", "default", *best[:1], "no route"])
