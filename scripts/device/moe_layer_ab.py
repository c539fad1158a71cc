"""Issue 17: an MoE decode block as one persistent launch (`moe_layer`) against `moe_decode`'s
three. Part 1 (`layers`): Qwen3-30B-A3B's block at one row, 8 layers of distinct weights in a
CUDA graph (replays timed; us a layer), three launches then `moe_layer` by config. Part 2
(`engine`): batch-1 decode of the dummy-weight model, one engine per variant in one process,
`moe.ONE_LAUNCH_DECODE` off / on alternating (with `moe_layer.DEFAULT` set to a config).

    python3 scripts/device/moe_layer_ab.py layers [config ...]
    python3 scripts/device/moe_layer_ab.py engine [config ...]
    python3 scripts/device/moe_layer_ab.py both [config ...]  (the engine A/B of the fastest
                                                           config, if one beats three launches)
"""

import sys

import torch

from polymodal.llm_core.layers import moe, moe_decode, moe_layer
from polymodal.llm_core.layers.norm import DeferredNorm

CONFIGS = {
    "default": moe_layer.LayerConfig(),
    "w4x2": moe_layer.LayerConfig(gate_up_n=16, down_n=16, num_warps=4, per_sm=2),
    "w4x3": moe_layer.LayerConfig(gate_up_n=16, down_n=16, num_warps=4, per_sm=3),
    "w4x5": moe_layer.LayerConfig(
        gate_up_n=16, down_n=16, num_warps=4, per_sm=5, prefetch=False
    ),  # fmt: skip
    "w2x8": moe_layer.LayerConfig(
        gate_up_n=8, down_n=16, num_warps=2, per_sm=8, prefetch=False
    ),  # fmt: skip
    "w2x6": moe_layer.LayerConfig(
        gate_up_n=8, down_n=16, num_warps=2, per_sm=6, prefetch=False
    ),  # fmt: skip
}
LAYERS = 8


def layer_inputs(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    h = randn(1, 2048)
    x = DeferredNorm(h, (h.float() ** 2).view(1, -1, 256).sum(-1), 1 + randn(2048, scale=0.1),
                     1e-6)  # fmt: skip
    return dict(x=x, router=randn(128, 2048, scale=2048**-0.5),
                gate_up=randn(128, 1536, 2048, scale=2048**-0.5),
                down=randn(128, 2048, 768, scale=768**-0.5), residual=randn(1, 2048))  # fmt: skip


def three(t):
    weights, ids = moe_decode.route(t["x"], t["router"], 8)
    return moe_decode.experts(t["x"], t["gate_up"], t["down"], weights, ids, t["residual"])


def one(t, cfg):
    return moe_layer.moe_layer(t["x"], t["router"], t["gate_up"], t["down"], 8,
                               residual=t["residual"], config=cfg)[0]  # fmt: skip


def graph_us(fn, layers):
    for _ in range(2):  # compile, then the grid's programs an SM known
        for t in layers:
            fn(t)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for t in layers:
            fn(t)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / 20 / len(layers))
    return best


def layers_part(names):
    """Prints each config's us a layer; returns the names faster than the three launches."""
    layers = [layer_inputs(seed) for seed in range(LAYERS)]
    ref = [three(t).h.clone() for t in layers]
    base = graph_us(three, layers)
    print(f"three launches        {base:6.1f} us a layer", flush=True)
    faster = []
    for name in names:
        cfg = CONFIGS[name]
        try:
            out = [one(t, cfg).h for t in layers]
            err = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref))
            us = graph_us(lambda t, c=cfg: one(t, c), layers)
            print(f"one launch {name:10s} {us:6.1f} us a layer  (max diff {err:.3g}, "
                  f"{moe_layer._COMPILED.get(next(reversed(moe_layer._COMPILED)))} an SM fit)",
                  flush=True)  # fmt: skip
            faster += [(us, name)] if us < base else []
        except Exception as exc:  # a config that does not compile or fit: say so, go on
            print(f"one launch {name:10s} failed: {type(exc).__name__}: {exc}"[:300], flush=True)
    return [name for _, name in sorted(faster)]


def engine_part(names):
    from polymodal.bench import resolve_bench_model
    from polymodal.bench.engine import measure_bandwidth
    from polymodal.bench.text import variant_ms

    model_dir = resolve_bench_model("qwen3-30b-a3b")
    bandwidth = measure_bandwidth()
    print(f"copy rate {bandwidth / 1e12:.2f} TB/s", flush=True)
    for name in names:
        moe.ONE_LAUNCH_DECODE = name != "three"
        if name != "three":
            moe_layer.DEFAULT = CONFIGS[name]
        variant_ms(f"qwen3-30b-a3b {name}", model_dir, bandwidth, max_model_len=4096,
                   dummy_weights=True)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "layers":
        layers_part(sys.argv[2:] or list(CONFIGS))
    elif sys.argv[1] == "both":  # the engine A/B of the best config, if one beats three launches
        best = layers_part(sys.argv[2:] or list(CONFIGS))[:1]
        if best:
            engine_part(["three", best[0], "three", best[0]])
    else:
        engine_part(sys.argv[2:] or ["three", "default", "three", "default"])
