"""Time the MoE and MLA Triton kernels on CUDA and report the bandwidth they reach.

    python scripts/bench_moe.py                  # bf16, the shipped models' shapes
    python scripts/bench_moe.py --tokens 1,8,64,512
    python scripts/bench_moe.py --only decode --sweep   # + the decode experts' config sweep
    python scripts/bench_moe.py --only decode --ab      # one token: one-tile / early loads A/B

MoE rows: `fused_experts` for one layer; GB/s = bytes of the distinct experts the tokens chose
(what the step must read) / time; against the dense per-expert loop (transformers' algorithm)
timed the same way. Decode rows (few tokens): the unfused path (`fused_experts`; the block:
norm kernel + router GEMV + torch top-k + `fused_experts` + the next layer's add+norm kernel)
against `moe_decode` (its two expert launches; the block: route + experts with the residual,
whose norm the next GEMV applies as it loads). DeepSeek-V3's decode rows route as the model
does (fp32 logits, sigmoid + correction bias, 8 groups keep 4, top-8) and add its shared
expert: unfused, torch routing and the shared MLP on its own (GEMVs at one row, as the engine
runs it); `moe_decode`, routed + shared in the same two launches. `--sweep`: one token,
`moe_decode.experts`
over launch configs of gate_up (down at its default), then of down. `--ab`: one token, the
experts with the one-tile configs or the tiled ones (`expert_config(one_tile=...)`), down's
loads before its PDL wait or after (`early_loads`), and the routing launch; one table.
`--sweep` and `--ab` call `experts` as the model does (a `DeferredNorm` in, the residual out)
and cycle through disjoint sets of experts (`expert_sets`), so no call finds its weights in L2
(a model's layers each read their own). MLA rows: `mla_decode`
(absorbed form) over a paged latent cache; GB/s = latent bytes of every sequence's context /
time (the cache read once per step is the floor). Timings are CUDA-graph replays
(`polymodal.bench.timing.graph_ms`, median).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.testing

from polymodal.bench.timing import graph_ms
from polymodal.llm_core.attention.triton_mla import mla_decode
from polymodal.llm_core.layers import moe_decode, triton_ops
from polymodal.llm_core.layers.activation import silu_and_mul
from polymodal.llm_core.layers.gemv import GemvConfig, gemv
from polymodal.llm_core.layers.moe import RouterConfig, experts_reference, route
from polymodal.llm_core.layers.norm import DeferredNorm
from polymodal.llm_core.layers.triton_moe import fused_experts

MOE_SHAPES = {  # name: (experts, top_k, hidden, expert intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "deepseek-v3": (256, 8, 7168, 2048),
}
# DeepSeek-V3's router and shared expert (the decode rows): RouterConfig and the shared count
DEEPSEEK_ROUTER = RouterConfig(8, True, "sigmoid", num_groups=8, topk_groups=4, scaling=2.5)
DEEPSEEK_SHARED = 1


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


def decode_inputs(name: str, tokens: int) -> dict:
    """One layer's tensors as a decode step meets them: the router and experts in bf16, x as a
    `DeferredNorm` (o_proj's sums of squares per 4 features), the residual stream."""
    experts, top_k, hidden, inter = MOE_SHAPES[name]
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h = torch.randn(tokens, hidden, **bf16)
    sumsq = (h.float() ** 2).view(tokens, -1, 4).sum(-1)
    extra = {}
    if name == "deepseek-v3":  # its router and shared expert
        shared = DEEPSEEK_SHARED * inter
        extra = dict(
            bias=torch.rand(experts, device="cuda") * 0.1,
            shared=(
                torch.randn(2 * shared, hidden, **bf16) * 0.02,
                torch.randn(hidden, shared, **bf16) * 0.02,
            ),  # fmt: skip
        )
    return dict(
        **extra,
        top_k=top_k,
        router=torch.randn(experts, hidden, **bf16) * hidden**-0.5,
        gate_up=torch.randn(experts, 2 * inter, hidden, **bf16) * 0.02,
        down=torch.randn(experts, hidden, inter, **bf16) * 0.02,
        x=DeferredNorm(h, sumsq, torch.ones(hidden, **bf16), 1e-6),
        residual=torch.randn(tokens, hidden, **bf16),
    )


def torch_route(t: dict, x: torch.Tensor):
    """The model's unfused routing: F.linear + `moe.route` (fp32 logits for DeepSeek)."""
    if "bias" not in t:
        return route(torch.nn.functional.linear(x, t["router"]), RouterConfig(t["top_k"]))
    logits = torch.nn.functional.linear(x.float(), t["router"].float())
    return route(logits, DEEPSEEK_ROUTER, t["bias"])


def shared_mlp(t: dict, x: torch.Tensor):
    """The unfused shared MLP as the engine runs it: GEMVs at one row, else cuBLAS."""
    gate_up, down = t["shared"]
    if x.shape[0] == 1:
        return gemv(gemv(x, gate_up, None), down, None, silu_mul=True)
    return torch.nn.functional.linear(silu_and_mul(torch.nn.functional.linear(x, gate_up)), down)


def old_experts(t: dict, x, weights, ids):
    out = fused_experts(x, t["gate_up"], t["down"], weights, ids)
    return out + shared_mlp(t, x) if "shared" in t else out


def new_route(t: dict):
    if "bias" not in t:
        return moe_decode.route(t["x"], t["router"], t["top_k"])
    cfg = DEEPSEEK_ROUTER
    return moe_decode.route(t["x"], t["router"], cfg.top_k, cfg.renormalize, cfg.scaling,
                            scoring="sigmoid", fp32_logits=True, correction_bias=t["bias"],
                            num_groups=cfg.num_groups, topk_groups=cfg.topk_groups,
                            shared_experts=DEEPSEEK_SHARED)  # fmt: skip


def old_block(t: dict):
    x = t["x"].materialize()
    out = old_experts(t, x, *torch_route(t, x))
    return triton_ops.rms_norm(out, t["x"].weight, 1e-6, t["residual"])  # the next layer's


def new_block(t: dict):
    weights, ids = new_route(t)
    return moe_decode.experts(t["x"], t["gate_up"], t["down"], weights, ids, t["residual"],
                              shared=t.get("shared"))  # fmt: skip


def bench_decode(name: str, tokens: int) -> None:
    t = decode_inputs(name, tokens)
    x = t["x"].materialize()
    weights, ids = new_route(t)  # (with the shared experts' slots: ids E..)
    read = ids.unique().numel()  # distinct experts, shared ones counted (all of routed size)
    nbytes = read * t["gate_up"][0].numel() * 3 // 2 * 2
    top_w, top_ids = weights[:, : t["top_k"]], ids[:, : t["top_k"]].long()
    old = graph_ms(lambda: old_experts(t, x, top_w, top_ids))
    new = graph_ms(lambda: moe_decode.experts(x, t["gate_up"], t["down"], weights, ids,
                                              shared=t.get("shared")))  # fmt: skip
    old_all, new_all = graph_ms(lambda: old_block(t)), graph_ms(lambda: new_block(t))
    print(f"| {name} | {tokens} | {read} | {old * 1e3:.1f} "
          f"({nbytes / old / 1e9:.2f}) | {new * 1e3:.1f} ({nbytes / new / 1e9:.2f}) | "
          f"{old_all * 1e3:.1f} | {new_all * 1e3:.1f} |")  # fmt: skip


def expert_sets(t: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One-token routings (weights, ids) over disjoint sets of experts, as many as fit (at most
    16): Qwen3-30B-A3B's 16 sets of 8 are 1.2 GB of weights, well past the 50 MB L2, where one
    set (75 MB) timed over and over partly hits it."""
    experts, top_k = t["gate_up"].shape[0], t["top_k"]
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(0)).cuda()
    sets = []
    for i in range(min(16, experts // top_k)):
        ids = order[i * top_k : (i + 1) * top_k].view(1, top_k).to(torch.int32)
        weights = torch.rand(1, top_k, device="cuda")
        sets.append((weights / weights.sum(), ids))
    return sets


def cycled_experts(t: dict, sets: list, **options):
    """`moe_decode.experts` as the model calls it (the `DeferredNorm`, the residual), on the
    next of `sets` at each call (a CUDA graph of n calls cycles through them)."""
    routings = itertools.cycle(sets)

    def run():
        weights, ids = next(routings)
        return moe_decode.experts(t["x"], t["gate_up"], t["down"], weights, ids, t["residual"],
                                  **options)  # fmt: skip

    return run


def one_token_configs(name: str, one_tile: bool) -> tuple[GemvConfig, GemvConfig]:
    """(gate_up's, down's) `expert_config` at one token."""
    _, top_k, hidden, inter = MOE_SHAPES[name]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return tuple(moe_decode.expert_config(top_k, n, k, sms, True, one_tile=one_tile)
                 for n, k in ((2 * inter, hidden), (hidden, inter)))  # fmt: skip


def launch_text(cfg: GemvConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_k} {cfg.num_warps}w"


def ab_decode(name: str) -> None:
    """One token: the experts (us, TB/s of the chosen experts' weights) with the tiled and the
    one-tile configs (where they differ), down's loads before / after its PDL wait; the routing
    launch alone. Rows of the `--ab` table."""
    t = decode_inputs(name, 1)
    sets = expert_sets(t)
    nbytes = t["top_k"] * t["gate_up"][0].numel() * 3 // 2 * 2
    tiled = one_token_configs(name, one_tile=False)
    for configs in dict.fromkeys((tiled, one_token_configs(name, one_tile=True))):
        kind = "tiled" if configs == tiled else "one-tile"
        for early in (True, False):
            ms = graph_ms(cycled_experts(t, sets, configs=configs, early_loads=early), rep=50)
            print(f"| {name} | {kind}: gate_up {launch_text(configs[0])}, down "
                  f"{launch_text(configs[1])} | {'before' if early else 'after'} | "
                  f"{ms * 1e3:.1f} ({nbytes / ms / 1e9:.2f}) |")  # fmt: skip
    experts, _, hidden, _ = MOE_SHAPES[name]
    ms = graph_ms(lambda: moe_decode.route(t["x"], t["router"], t["top_k"]), rep=50)
    route_cfg = moe_decode.router_config(experts, hidden, True)
    print(f"| {name} | route: {route_cfg.block_n} expert(s) x {route_cfg.block_k} "
          f"{route_cfg.num_warps}w a program | | {ms * 1e3:.1f} |")  # fmt: skip


def sweep_decode(name: str) -> None:
    """One token: the fastest launch configs of the two expert kernels, 5 of each, after the
    defaults' time; then (routers of many experts) the routing launch alone."""
    t = decode_inputs(name, 1)
    sets = expert_sets(t)
    nbytes = t["top_k"] * t["gate_up"][0].numel() * 3 // 2 * 2
    configs = [GemvConfig(block_n=n, block_k=k, num_warps=w, prefetch=p, num_stages=s)
               for n in (4, 8, 16, 32) for k in (256, 512, 1024, 2048) for w in (4, 8)
               for p, s in ((False, 1), (True, 1), (False, 2), (False, 3))
               if 2048 <= n * k <= (8192 if p or s > 1 else 16384)]  # fmt: skip
    # (prefetch: two tiles in flight a program, so half-size tiles at most: Qwen3's gate_up at
    # 16 x 512 takes 80 -> 149 registers with it, halving the programs an SM holds; stages 2-3:
    # the K loop through shared memory, 80 -> 96 registers, 18-37 KB a program, sm_90 offline)
    experts, _, hidden, _ = MOE_SHAPES[name]
    default = one_token_configs(name, one_tile=False)
    ms = graph_ms(cycled_experts(t, sets), rep=50)
    print(f"sweep {name} default: {ms * 1e3:.1f} us ({nbytes / ms / 1e9:.2f} TB/s)  "
          f"gate_up {default[0]}  down {default[1]}")  # fmt: skip
    best_gate_up = None
    for which in ("gate_up", "down"):
        times = []
        for cfg in configs:
            pair = (cfg, default[1]) if which == "gate_up" else (best_gate_up, cfg)
            times.append((graph_ms(cycled_experts(t, sets, configs=pair), rep=50), cfg))
        times.sort(key=lambda item: item[0])
        best_gate_up = best_gate_up or times[0][1]
        for ms, cfg in times[:5]:
            print(f"sweep {name} {which}: {ms * 1e3:.1f} us ({nbytes / ms / 1e9:.2f} TB/s both "
                  f"launches)  block_n={cfg.block_n} block_k={cfg.block_k} "
                  f"num_warps={cfg.num_warps} prefetch={cfg.prefetch} "
                  f"stages={cfg.num_stages}")  # fmt: skip
    if experts < 32:
        return
    default_route = moe_decode.router_config(experts, hidden, True)
    block_k = min(2048, triton.next_power_of_2(hidden))
    route_configs = [default_route] + [
        GemvConfig(block_n=n, block_k=block_k, num_warps=w)
        for n in (1, 2, 4) for w in (1, 2, 4) if n * block_k // (32 * w) <= 128
    ]  # fmt: skip
    times = []
    for cfg in route_configs:
        ms = graph_ms(lambda c=cfg: moe_decode.route(t["x"], t["router"], t["top_k"], config=c),
                      rep=50)  # fmt: skip
        times.append((ms, cfg))
    print(f"sweep {name} route default: {times[0][0] * 1e3:.1f} us  {default_route}")
    for ms, cfg in sorted(times[1:], key=lambda item: item[0])[:5]:
        print(f"sweep {name} route: {ms * 1e3:.1f} us  block_n={cfg.block_n} "
              f"block_k={cfg.block_k} num_warps={cfg.num_warps}")  # fmt: skip


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
    parser.add_argument("--decode-tokens", default="1,2,4,8")
    parser.add_argument("--mla", default="1x1024,1x8192,1x32768,32x4096,256x1024")
    parser.add_argument("--only", choices=("moe", "decode", "mla"), help="one section")
    parser.add_argument("--sweep", action="store_true", help="decode experts' launch configs")
    parser.add_argument("--ab", action="store_true",
                        help="decode: tiled / one-tile experts, down's early loads on / off, "
                        "the routing launch; one table in place of the decode table")  # fmt: skip
    args = parser.parse_args()
    if args.only in (None, "moe"):
        for name in MOE_SHAPES:
            for tokens in map(int, args.tokens.split(",")):
                bench_moe(name, tokens)
    if args.only in (None, "decode"):
        if args.ab:  # in place of the decode table
            print("\n| layer (1 token) | expert launches | down's loads vs its PDL wait | "
                  "us (TB/s) |\n|---|---|---|---|")  # fmt: skip
            for name in ("qwen3-30b-a3b", "mixtral-8x7b"):
                ab_decode(name)
        else:
            print(
                "\n| layer | tokens | experts read | experts: unfused us (TB/s) | moe_decode us "
                "(TB/s) | block: unfused us | moe_decode us |\n|---|---|---|---|---|---|---|"
            )
            for name in MOE_SHAPES:
                for tokens in map(int, args.decode_tokens.split(",")):
                    bench_decode(name, tokens)
        if args.sweep:
            for name in ("qwen3-30b-a3b", "mixtral-8x7b"):  # the models that take it
                sweep_decode(name)
    if args.only in (None, "mla"):
        for case in args.mla.split(","):
            batch, context = map(int, case.split("x"))
            bench_mla(batch, context)


if __name__ == "__main__":
    main()
