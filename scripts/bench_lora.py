"""Multi-LoRA decode cost on CUDA: a decode step of B sequences with 4 adapters (round robin)
against the same batch without LoRA, on the Qwen2.5-VL-7B decoder (dummy weights, the shipped
config) with rank-16 adapters on every decoder linear (random, written in PEFT's format).

    python scripts/bench_lora.py                  # B = 64, 4 adapters, rank 16
    python scripts/bench_lora.py --batch 1,64 --adapters 4 --rank 16
    python scripts/bench_lora.py --kernels --batch 1,64   # one layer's LoRA sites, kernel by kernel

Rows: base engine (no LoRA), LoRA engine with no adapter in the batch, LoRA engine with
`--adapters` adapters. ms/step: `--steps` pure decode steps back to back (CUDA graphs on, async
scheduling: what a serving engine sustains); "synced": the median of steps each synchronized
alone (every host cost in series). The target (issue 20) is the adapters row within 15% of the
base row at B = 64. `--profile`: the adapters' steps' kernel table. Then what each
engine's graph sets cost to capture (a LoRA engine captures a set without LoRA too).

`--kernels`: each LoRA site of one decoder layer (qkv, o, gate_up, down) alone, as CUDA-graph
replays (`polymodal.bench.timing.graph_ms`, median): the base product (the one-row GEMV at
B = 1, `F.linear` above the GEMV's rows), the shrink (default `ShrinkConfig`, its K splits),
and the LoRA term (the GEMV with its LoRA epilogue minus the plain GEMV at B = 1; `expand`
with the default `expand_config` above), then the best of the shrink's launch configs
(`ShrinkConfig`) and, above the GEMV's rows, of expand's (`ExpandConfig`), swept per site.
Above the GEMV's rows, the path the engine takes for dense layers: the shrink folded into the
base GEMM (`F.linear` of `[W; A of every slot]`: its time over the base product's) plus
`expand_folded` (default config, then the best of the same sweep); that sum is the site's
LoRA cost there, to compare with shrink + expand.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from polymodal.bench.checkpoint import write_user_checkpoint
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.lora import LoRARequest
from polymodal.llm_core.sampling_params import SamplingParams

CONFIG = Path(__file__).resolve().parents[1] / "sdk" / "configs" / "qwen2_5_vl_7b"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(out: Path, config: dict, rank: int, seed: int) -> Path:
    """A random PEFT LoRA directory for every decoder linear of `config`."""
    from safetensors.torch import save_file

    text = config.get("text_config", config)
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = hidden // heads
    shapes = {  # module: (in, out)
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(text["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            a = torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5
            tensors[f"{name}.lora_A.weight"] = a.to(torch.bfloat16)
            b = torch.randn(fan_out, rank, generator=gen) * 0.01
            tensors[f"{name}.lora_B.weight"] = b.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
               "target_modules": list(TARGETS), "bias": "none"}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(adapter))
    return out


def decode_ms(engine: Engine, batch: int, loras: list, steps: int, profile: bool = False):
    """ms a pure decode step of `batch` sequences (prompts of 128 tokens) takes in a run of
    `steps` back-to-back steps, as a serving engine runs them (async scheduling overlaps each
    step's host work with the previous step's kernels), and the median of `steps` steps each
    synchronized on its own (host work in series). `profile`: a kernel table of 8 more steps."""
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 16, ignore_eos=True)
    for i in range(batch):
        prompt = [(7 * i + j) % 1000 + 100 for j in range(128)]
        engine.add_request(prompt, params, lora_request=loras[i % len(loras)] if loras else None)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running) \
            or engine.scheduler.waiting:  # fmt: skip
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    run = (time.perf_counter() - start) * 1000 / steps
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    if profile:
        from polymodal.bench.profile import calls_profile, print_calls_profile

        label = f"decode step, batch {batch}, {len(loras)} adapters"
        print_calls_profile(label, calls_profile(engine.step, 8, top=14))
    engine.run_until_done()
    return run, statistics.median(times)


SITES = {  # Qwen2.5-VL-7B decoder: name -> (out slices, in features, silu_mul)
    "qkv": ((3584, 512, 512), 3584, False),
    "o": ((3584,), 3584, False),
    "gate_up": ((18944, 18944), 3584, False),
    "down": ((3584,), 18944, True),
}


def site_row(name: str, m: int, adapters: int, rank: int, sweep: list, expand_sweep: list) -> str:
    """One `--kernels` row: site `name` (`SITES`) at `m` tokens, round robin over the slots."""
    from polymodal.bench.timing import graph_ms
    from polymodal.llm_core.layers import gemv as gemv_mod
    from polymodal.llm_core.layers import gemv_lora
    from polymodal.llm_core.lora import launch_plan, triton_fold, triton_lora
    from polymodal.llm_core.lora.layer import LoRABatch

    sizes, k, silu = SITES[name]
    dev, dt, n = torch.device("cuda"), torch.bfloat16, sum(sizes)
    offsets = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int32,
                           device=dev)  # fmt: skip
    sizes_t = torch.tensor(sizes, dtype=torch.int32, device=dev)
    weight = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
    lora_a = torch.randn(adapters, len(sizes) * rank, k, device=dev, dtype=dt) / k**0.5
    lora_b = torch.randn(adapters, n, rank, device=dev, dtype=dt) / rank
    x = torch.randn(m, 2 * k if silu else k, device=dev, dtype=dt)
    batch = LoRABatch(adapters, m, dev)
    batch.set_step([(i % adapters, 1) for i in range(m)])
    seg = batch.segments
    y = triton_lora.shrink(x, lora_a, seg, silu)
    one_row = m <= gemv_mod.MAX_ROWS
    xs = torch.nn.functional.silu(x[:, :k]) * x[:, k:] if silu else x
    out = torch.nn.functional.linear(xs, weight)
    delta = gemv_lora.LoRADelta(y, lora_b, seg.token_slot, offsets)

    def base():
        if one_row:
            return gemv_mod.gemv(x, weight, silu_mul=silu)
        return torch.nn.functional.linear(xs, weight)

    def expand(config=None):
        triton_lora.expand(y, lora_b, out, offsets, sizes_t, max(sizes), rank, seg, config)

    def term():
        if one_row:
            return gemv_mod.gemv(x, weight, silu_mul=silu, lora=delta)
        return expand()

    def time_us(fn, rep=100) -> float:
        return 1e3 * graph_ms(fn, rep)

    def shrink_us(config=None) -> float:
        return time_us(lambda: triton_lora.shrink(x, lora_a, seg, silu, config), rep=40)

    base_us = time_us(base)
    term_us = time_us(term) - (base_us if one_row else 0.0)
    fma_rows = launch_plan.ShrinkConfig().fma_rows
    splits = launch_plan.shrink_plan(m, len(sizes) * rank, k, gemv_mod.num_sms(dev))[-1]
    timed = [(shrink_us(c), c) for c in sweep if c.fma_rows == fma_rows or m <= fma_rows]
    best_us, c = min(timed, key=lambda t: t[0])
    best = (f"{best_us:.1f} (block_k {c.block_k}, tiles {c.min_tiles}, programs/SM "
            f"{c.programs_per_sm}, warps {c.num_warps}, fma_rows {c.fma_rows})")  # fmt: skip
    best_expand = folded = best_folded = "-"
    if not one_row:
        timed = [(time_us(lambda c=c: expand(c), rep=40), c) for c in expand_sweep]
        best_expand = _expand_best(timed)
        # the engine's path here: the shrink inside the base GEMM, then expand_folded
        stacked_w = torch.cat([weight, lora_a.flatten(0, 1)])  # [n + L * S * R, k]
        stacked = torch.nn.functional.linear(xs, stacked_w)

        def fold_expand(config=None):
            return triton_fold.expand_folded(stacked, lora_b, n, offsets, sizes_t, max(sizes),
                                             rank, seg, config)  # fmt: skip

        gemm_us = time_us(lambda: torch.nn.functional.linear(xs, stacked_w))
        fold_us = time_us(fold_expand)
        folded = f"{gemm_us - base_us:+.1f} + {fold_us:.1f} = {gemm_us - base_us + fold_us:.1f}"
        timed = [(time_us(lambda c=c: fold_expand(c), rep=40), c) for c in expand_sweep]
        best_folded = _expand_best(timed)
    return (f"| {name} | {m} | {base_us:.1f} | {shrink_us():.1f} ({splits} splits) | "
            f"{term_us:.1f} | {best} | {best_expand} | {folded} | {best_folded} |")  # fmt: skip


def _expand_best(timed: list) -> str:
    us, c = min(timed, key=lambda t: t[0])
    return f"{us:.1f} (block_n {c.block_n}, warps {c.num_warps}, token programs " + (
        f"{c.token_programs or 'all'})"
    )


def bench_kernels(batches: list[int], adapters: int, rank: int) -> None:
    """The `--kernels` rows (module docstring)."""
    from polymodal.llm_core.lora.launch_plan import ExpandConfig, ShrinkConfig

    start = time.perf_counter()
    # fewer, longer K chunks (min_tiles) trade the final split sum against each chunk's loop
    sweep = [ShrinkConfig(min_tiles=t, dot_min_tiles=t) for t in (1, 2, 4, 8)]
    sweep += [ShrinkConfig(block_k=bk) for bk in (64, 256)]
    sweep += [ShrinkConfig(programs_per_sm=p) for p in (2, 8)]
    sweep += [ShrinkConfig(num_warps=w) for w in (2, 8)] + [ShrinkConfig(fma_rows=0)]
    # token_programs is a launch argument (no new compile); 1: one program walks a slot's blocks
    expand_sweep = [ExpandConfig(block_n=bn, num_warps=4 + 4 * (bn >= 256), token_programs=tp)
                    for bn in (64, 128, 256) for tp in (None, 1)]  # fmt: skip
    expand_sweep += [ExpandConfig(block_n=128, num_warps=8), ExpandConfig(block_n=256)]
    print("| site | B | base us | shrink us | LoRA term us | best shrink us (config) "
          "| best expand us (config) | folded: GEMM extra + expand us | best folded expand "
          "us (config) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SITES:
        for m in batches:
            print(site_row(name, m, adapters, rank, sweep, expand_sweep), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="64")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--kernels", action="store_true", help="one layer's sites, per kernel")
    parser.add_argument("--profile", action="store_true", help="kernel table of the LoRA steps")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.kernels:
        bench_kernels(batches, args.adapters, args.rank)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_user_checkpoint(CONFIG, Path(tmp) / "ckpt")
        config = json.loads((ckpt / "config.json").read_text())
        paths = [
            write_adapter(Path(tmp) / f"a{i}", config, args.rank, i) for i in range(args.adapters)
        ]
        loras = [LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(paths)]
        common = dict(dummy_weights=True, dtype="bfloat16", max_num_seqs=max(batches),
                      max_model_len=4096)  # fmt: skip
        rows, costs = [], []
        for label, kwargs, use in (
            ("base (no LoRA)", {}, []),
            ("LoRA engine, no adapter", {"enable_lora": True}, []),
            (f"LoRA engine, {args.adapters} adapters", {"enable_lora": True}, loras),
        ):
            lora_kwargs = {"max_loras": max(1, args.adapters), "max_lora_rank": args.rank}
            engine = Engine(str(ckpt), **common, **kwargs, **(lora_kwargs if kwargs else {}))
            if not use:  # each engine once: the base, then the LoRA one
                runner = engine.runner
                sets = (("decode", runner.graphs), ("prefill", runner.prefill_graphs))
                for kind, graphs in (s for s in sets if s[1] is not None):
                    for lora, (seconds, used) in graphs.capture_cost.items():
                        costs.append((label.split(",")[0], kind, lora, seconds, used / 2**20))
            for batch in batches:
                run, alone = decode_ms(engine, batch, use, args.steps, args.profile and bool(use))
                rows.append((label, batch, run, alone))
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    base = {b: (run, alone) for label, b, run, alone in rows if label.startswith("base")}
    print(f"{'engine':34} {'batch':>5} {'ms/step':>8} {'vs base':>8} {'synced':>8} {'vs base':>8}")
    for label, batch, run, alone in rows:
        b_run, b_alone = base[batch]
        print(f"{label:34} {batch:5d} {run:8.3f} {100 * (run / b_run - 1):+7.1f}% "
              f"{alone:8.3f} {100 * (alone / b_alone - 1):+7.1f}%")  # fmt: skip
    print(f"\n{'graphs captured':34} {'set':>8} {'seconds':>8} {'MiB':>8}")
    for label, kind, lora, seconds, mib in costs:
        name = f"{label}: {kind}"
        print(f"{name:34} {'LoRA' if lora else 'plain':>8} {seconds:8.1f} {mib:8.0f}")


if __name__ == "__main__":
    main()
