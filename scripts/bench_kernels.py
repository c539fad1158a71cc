"""Time the Triton kernels against torch references on realistic shapes.

    python scripts/bench_kernels.py            # CUDA: triton.testing.do_bench medians
    python scripts/bench_kernels.py --tiny     # tiny shapes; on CPU runs under TRITON_INTERPRET=1
    python scripts/bench_kernels.py --gemv [--json gemv.json]   # GEMV config sweep vs cuBLAS
    python scripts/bench_kernels.py --decode-sweep   # decode attention tiles/warps/stages by batch

Decode rows report achieved GB/s = bytes of K/V read / time (the roofline of decode).
Shapes follow Qwen2.5-VL-7B: decoder 28 q heads / 4 kv heads, head_dim 128; vision tower
16 heads, head_dim 80 (its tower sizes, split vs padded head dim: bench_vision_attention.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test, CPU ok)")
ARGS.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
ARGS.add_argument("--gemv", action="store_true", help="only the GEMV sweep (small-M linears)")
ARGS.add_argument("--json", help="also write the GEMV results here")
ARGS.add_argument("--rows", default="1,2,4", help="GEMV sweep: x rows to time, comma-separated")
ARGS.add_argument("--shapes", help="GEMV sweep: only these shapes, comma-separated")
ARGS.add_argument(
    "--decode-sweep", action="store_true", help="only decode attention configs, by batch size"
)

if __name__ == "__main__" and "--tiny" in sys.argv:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import dataclasses  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from polymodal.bench.timing import graph_ms  # noqa: E402
from polymodal.llm_core.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from polymodal.llm_core.attention.spec import AttentionSpec  # noqa: E402
from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from polymodal.llm_core.layers import gemv as gemv_ops  # noqa: E402
from polymodal.llm_core.layers import triton_ops  # noqa: E402


def bench_ms(fn, graph: bool = False, rep: int = 100) -> float:
    """Median milliseconds of `fn()`: do_bench on CUDA (replayed from a CUDA graph when `graph`,
    as the engine runs decode: no Python launch overhead), a few wall-clock runs elsewhere."""
    if torch.cuda.is_available():
        import triton.testing

        if graph:
            return graph_ms(fn, rep)
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def paged_batch(q_lens, seq_lens, heads, kv_heads, head_dim, dtype, device, page=16):
    """Random paged cache with shuffled blocks + metadata + queries."""
    pages = [-(-s // page) for s in seq_lens]
    num_blocks = sum(pages)
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, device=device).int()
    tables = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=device)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[used : used + n]
        used += n
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *q_lens], device=device).cumsum(0).int(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables,
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64, device=device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        is_decode=all(n == 1 for n in q_lens),
        query_lens_cpu=list(q_lens),
        seq_lens_cpu=list(seq_lens),
    )
    q = torch.randn(sum(q_lens), heads, head_dim, device=device, dtype=dtype)
    return q, cache, meta


def bench_decode(batch, ctx, shape, dtype, device):
    """Paged Triton decode vs the paged torch reference and dense (unpaged) SDPA."""
    heads, kv_heads, head_dim = shape
    q, cache, meta = paged_batch([1] * batch, [ctx] * batch, *shape, dtype, device)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5)
    backend = TritonAttentionBackend()
    t = bench_ms(lambda: backend.paged_attention(q, cache, meta, spec), graph=True)
    t_ref = bench_ms(lambda: TorchAttentionBackend().paged_attention(q, cache, meta, spec))
    k, v = (torch.randn(batch, kv_heads, ctx, head_dim, device=device, dtype=dtype) for _ in "kv")
    qd = q.view(batch, heads, 1, head_dim)
    t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True), True)
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * cache.element_size()
    gbs = f"{kv_bytes / t / 1e6:7.1f} GB/s (sdpa {kv_bytes / t_sdpa / 1e6:.1f})"
    name = f"decode b{batch} ctx{ctx} (graph)"
    return [(name, t, "dense sdpa", t_sdpa, gbs), (name, t, "torch ref", t_ref, "")]


def _decode_with(q, cache, meta, splits, config):
    """Decode attention as the engine runs it, with tile / warps / stages from `config`."""
    from polymodal.llm_core.attention import triton_backend as tb
    from polymodal.llm_core.attention.triton_decode import paged_decode

    block_n, warps, stages = config
    spec = AttentionSpec(q.shape[1], cache.shape[3], q.shape[-1], q.shape[-1] ** -0.5)
    return paged_decode(q, cache, meta.block_tables, meta.seq_lens, spec, splits,
                        block_n, warps, stages, tb.MIN_KEYS_PER_SPLIT)  # fmt: skip


def bench_decode_sweep(tiny: bool, dtype, device) -> None:
    """Decode attention by (keys per tile, warps, stages) at batch 1 and at captioning's batch
    sizes, each against the engine's default config (time, K/V GB/s, max difference)."""
    from polymodal.llm_core.attention import triton_backend as tb

    shape = (4, 2, 32) if tiny else (28, 4, 128)
    cases = [(1, 40), (3, 70)] if tiny else [(1, 300), (64, 400), (256, 400), (512, 400)]
    configs = [(16, 4, 2), (16, 2, 3)] if tiny else [
        (bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)
    ]  # fmt: skip
    default = (tb.DECODE_BLOCK_N if device == "cuda" else 16, tb.DECODE_WARPS, 3)
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'tile/warps/stages':>17} {'ms':>8} {'GB/s':>8}"
          f" {'vs default':>10} {'max diff':>9}")  # fmt: skip
    for batch, ctx in cases:
        q, cache, meta = paged_batch([1] * batch, [ctx] * batch, *shape, dtype, device)
        splits = tb.decode_num_splits(
            batch, shape[1], meta.block_tables.shape[1] * cache.shape[2], tb._num_sms(q.device),
            tb.MAX_DECODE_SPLITS,
        )  # fmt: skip

        run = functools.partial(_decode_with, q, cache, meta, splits)
        ref = run(default)
        t_ref = bench_ms(functools.partial(run, default), graph=True)
        kv_bytes = 2 * batch * ctx * shape[1] * shape[2] * cache.element_size()
        for config in [default, *(c for c in configs if c != default)]:
            t = bench_ms(functools.partial(run, config), graph=True)
            diff = (run(config).float() - ref.float()).abs().max().item()
            print(f"{batch:5d} {ctx:5d} {splits:6d} {'/'.join(map(str, config)):>17} {t:8.4f}"
                  f" {kv_bytes / t / 1e6:8.1f} {t_ref / t:9.2f}x {diff:9.1e}")  # fmt: skip


def bench_prefill(n_seq, length, shape, dtype, device):
    """Paged Triton prefill of fresh sequences vs dense causal SDPA."""
    heads, kv_heads, head_dim = shape
    q, cache, meta = paged_batch([length] * n_seq, [length] * n_seq, *shape, dtype, device)
    spec = AttentionSpec(q.shape[1], cache.shape[3], head_dim, head_dim**-0.5)
    t = bench_ms(lambda: TritonAttentionBackend().paged_attention(q, cache, meta, spec))
    qd = q.view(n_seq, length, heads, head_dim).transpose(1, 2)
    kd, vd = (
        torch.randn(n_seq, kv_heads, length, head_dim, device=device, dtype=dtype) for _ in "kv"
    )
    t_sdpa = bench_ms(
        lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
    )
    flops = 4 * n_seq * heads * head_dim * length * length / 2  # causal: half the matrix
    return [
        (f"prefill {n_seq}x{length}", t, "dense sdpa", t_sdpa, f"{flops / t / 1e9:.1f} TFLOP/s")
    ]


def bench_varlen(n_img, patches, seg, heads, head_dim, dtype, device):
    """Encoder varlen attention over equal segments vs batched dense SDPA."""
    cu = torch.arange(0, n_img * patches + 1, seg, device=device).int()
    q, k, v = (
        torch.randn(n_img * patches, heads, head_dim, device=device, dtype=dtype) for _ in range(3)
    )
    t = bench_ms(lambda: TritonAttentionBackend().varlen_attention(q, k, v, cu, seg, 0.1))
    qb, kb, vb = (x.view(-1, seg, heads, head_dim).transpose(1, 2) for x in (q, k, v))
    t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb))
    return [(f"varlen {n_img}x{patches} seg{seg} d{head_dim}", t, "dense sdpa", t_sdpa, "")]


def bench_ops(tokens, hidden, inter, shape, dtype, device):
    """Fused elementwise kernels vs their torch references."""
    heads, kv_heads, head_dim = shape
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    res, w = torch.randn_like(x), torch.randn(hidden, device=device, dtype=dtype)
    gate_up = torch.randn(tokens, 2 * inter, device=device, dtype=dtype)
    q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype)
    angles = torch.randn(tokens, head_dim // 2, device=device)
    cos, sin = angles.cos(), angles.sin()
    pairs = {
        "rms_norm+residual": (triton_ops.rms_norm, triton_ops.rms_norm_ref, (x, w, 1e-6, res)),
        "silu_and_mul": (triton_ops.silu_and_mul, triton_ops.silu_and_mul_ref, (gate_up,)),
        "rotary (q, k)": (
            triton_ops.rotary_embedding,
            triton_ops.rotary_embedding_ref,
            (q, k, cos, sin),
        ),
    }
    return [
        (name, bench_ms(lambda: fast(*a)), "torch ref", bench_ms(lambda: ref(*a)), "")  # noqa: B023
        for name, (fast, ref, a) in pairs.items()
    ]


GEMV_SHAPES = {  # Qwen2.5-VL-7B decoder: name -> (N, K, bias)
    "qkv": (4608, 3584, True),
    "o_proj": (3584, 3584, False),
    "gate_up": (37888, 3584, False),
    "down": (3584, 18944, False),
    "down+silu": (3584, 18944, False),  # x is [gate | up]: SiLU*mul on load, as decode runs it
    "lm_head": (152064, 3584, False),
}
TINY_GEMV_SHAPES = {"qkv": (45, 70, True), "down": (24, 300, False)}
GEMV_TOL = 1e-2  # wrong if |out - fp32 ref| > tol * (1 + |ref|) anywhere; ref ~ N(0, 1)
ROTATE_BYTES = 256 << 20  # weight copies cycled per call: reads miss the 50 MB L2, as in decode
GEMV_REP_MS = 20


def gemv_phase1(m: int, n: int, k: int, sms: int, tiny: bool) -> list:
    """Tile shapes (4 warps, 8 for big tiles), each with the smallest K split that gives ~4
    programs per SM. Later phases vary split, warps and stages around the fastest."""
    if tiny:
        return [gemv_ops.GemvConfig(bn, bk) for bn in (8, 16) for bk in (32, 64)]
    rows, configs = triton.next_power_of_2(m), []
    for bn, bk in itertools.product((4, 8, 16, 32, 64), (128, 256, 512, 1024, 2048)):
        tile = bn * bk
        if not (2048 <= tile <= 32768 and rows * tile <= 65536 and bk <= 2 * k):
            continue
        split = 1
        while (
            split < 8 and triton.cdiv(n, bn) * split < 4 * sms and gemv_split_ok(k, bk, 2 * split)
        ):
            split *= 2
        configs.append(gemv_ops.GemvConfig(bn, bk, split, num_warps=4 if tile <= 8192 else 8))
    return configs


def gemv_split_ok(k: int, block_k: int, split: int) -> bool:
    return split == 1 or triton.cdiv(k, block_k) >= 2 * split  # 2+ tiles per split


def bench_gemv_shape(name, n, k, has_bias, m, dtype, device, tiny) -> dict:
    """cuBLAS (F.linear), the default config and a sweep; every config is checked first.
    A `+silu` shape feeds `[gate | up]` rows (cuBLAS gets `silu_and_mul` + F.linear)."""
    silu = name.endswith("+silu")
    gen = torch.Generator(device=device).manual_seed(0)
    weight_bytes = n * k * dtype.itemsize
    copies = 1 if tiny else -(-ROTATE_BYTES // weight_bytes)
    weights = [
        (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype) for _ in range(copies)
    ]
    x = torch.randn(m, k * (1 + silu), device=device, generator=gen).to(dtype)
    bias = torch.randn(n, device=device, generator=gen).to(dtype) if has_bias else None
    rows_in = triton_ops.silu_and_mul_ref(x) if silu else x
    ref = F.linear(rows_in.float(), weights[0].float(), None if bias is None else bias.float())

    def time_us(fn) -> float:  # fn(weight); graph-replayed, a different weight copy each call
        cycle = itertools.cycle(weights)
        return 1e3 * bench_ms(lambda: fn(next(cycle)), graph=True, rep=GEMV_REP_MS)

    def tb_s(us: float) -> float:
        return weight_bytes / us / 1e6

    results: dict = {}

    def run(config) -> None:
        if config in results:
            return
        try:
            err = (gemv_ops.gemv(x, weights[0], bias, config, silu).float() - ref).abs()
            us = time_us(lambda w: gemv_ops.gemv(x, w, bias, config, silu))
            results[config] = {
                "us": us,
                "tb_s": tb_s(us),
                "max_err": err.max().item(),
                "ok": bool((err <= GEMV_TOL * (1 + ref.abs())).all()),
            }
        except Exception as exc:  # a config that does not compile or launch loses, loudly
            results[config] = {"us": float("inf"), "ok": False, "error": repr(exc)[:300]}

    def fastest(count: int) -> list:
        good = [c for c, r in results.items() if r["ok"]]
        return sorted(good, key=lambda c: results[c]["us"])[:count]

    sms = gemv_ops.num_sms(torch.device(device))
    for config in gemv_phase1(m, n, k, sms, tiny):
        run(config)
    for config in fastest(2):
        for split in (1, 2, 4) if tiny else (1, 2, 4, 8):
            if gemv_split_ok(k, config.block_k, split):
                run(dataclasses.replace(config, split_k=split))
    for config in fastest(2):
        for warps in (2, 4, 8):  # 2 warps spill above 8192 tile elements per padded row
            if warps > 2 or triton.next_power_of_2(m) * config.block_n * config.block_k <= 8192:
                run(dataclasses.replace(config, num_warps=warps))
    for config in fastest(1):  # num_stages changes nothing in the PTX on Triton 3.8: confirm
        run(dataclasses.replace(config, num_stages=3))
    default = gemv_ops.default_config(m, n, k, sms)
    run(default)
    act = triton_ops.silu_and_mul if silu and device == "cuda" else (lambda rows: rows)
    cublas_us = time_us(lambda w: F.linear(act(x), w, bias))
    best = (fastest(1) or [default])[0]
    return {
        "shape": name, "m": m, "n": n, "k": k, "bias": has_bias, "weight_bytes": weight_bytes,
        "cublas": {"us": cublas_us, "tb_s": tb_s(cublas_us)},
        "default": {"config": dataclasses.asdict(default), **results[default]},
        "best": {"config": dataclasses.asdict(best), **results[best]},
        "sweep": [{"config": dataclasses.asdict(c), **r} for c, r in results.items()],
    }  # fmt: skip


def bench_gemv(args, dtype, device) -> None:
    """Sweep GEMV configs per (shape, rows) and print cuBLAS / default / best side by side."""
    start = time.perf_counter()
    shapes = TINY_GEMV_SHAPES if args.tiny else GEMV_SHAPES
    if args.shapes:
        shapes = {name: shapes[name] for name in args.shapes.split(",")}
    records = []
    for m in (1, 3) if args.tiny else [int(r) for r in args.rows.split(",")]:
        for name, (n, k, has_bias) in shapes.items():
            r = bench_gemv_shape(name, n, k, has_bias, m, dtype, device, args.tiny)
            records.append(r)
            print(  # progress, in case the run is cut short
                f"{name} M={m}: cuBLAS {r['cublas']['us']:.2f} us, best {r['best']['us']:.2f} us"
                f" of {len(r['sweep'])} configs, {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            if device == "cuda":
                torch.cuda.empty_cache()  # the weight copies of the shape before
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"# {device_name}, {args.dtype}, CUDA-graph replay, weights cycled past the L2; us")
    print(
        f"{'shape':8} {'M':>2} {'N':>6} {'K':>6} | {'cuBLAS':>7} {'TB/s':>5} | {'default':>7}"
        f" {'TB/s':>5} | {'best':>7} {'TB/s':>5} {'speedup':>7}  bn/bk/split/warps/stages  err"
    )
    for r in records:
        cu, de, be = r["cublas"], r["default"], r["best"]
        c = be["config"]
        cfg = f"{c['block_n']}/{c['block_k']}/{c['split_k']}/{c['num_warps']}/{c['num_stages']}"
        times = " | ".join(f"{t['us']:7.2f} {t.get('tb_s', 0):5.2f}" for t in (cu, de, be))
        speedup, err = cu["us"] / be["us"], be.get("max_err", float("nan"))
        print(
            f"{r['shape']:8} {r['m']:2d} {r['n']:6d} {r['k']:6d} | {times} {speedup:6.2f}x"
            f"  {cfg:24} {err:.1e}"
        )
    bad = [(r["shape"], r["m"], s) for r in records for s in r["sweep"] if not s["ok"]]
    for shape, m, s in bad:
        print(f"FAILED {shape} M={m} {s['config']}: {s.get('error') or s['max_err']}")
    runs = sum(len(r["sweep"]) for r in records)
    print(f"# {runs} gemv configs timed, {len(bad)} failed, {time.perf_counter() - start:.0f} s")
    if args.json:
        meta = {"device": device_name, "dtype": args.dtype, "tolerance": GEMV_TOL}
        with open(args.json, "w") as f:
            json.dump({**meta, "results": records}, f, indent=1)


def main() -> None:
    args = ARGS.parse_args()
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.gemv:
        bench_gemv(args, dtype, device)
        return
    if args.decode_sweep:
        bench_decode_sweep(args.tiny, dtype, device)
        return
    tiny = args.tiny
    shape = (4, 2, 32) if tiny else (28, 4, 128)  # q heads, kv heads, head_dim
    rows = []  # (name, triton ms, baseline name, baseline ms, note)
    for batch, ctx in (
        [(1, 40), (2, 70)] if tiny else [(1, 1024), (1, 4096), (32, 1024), (32, 4096)]
    ):
        rows += bench_decode(batch, ctx, shape, dtype, device)
    rows += bench_prefill(*((2, 33) if tiny else (32, 512)), shape, dtype, device)
    n_img, patches, window = (2, 40, 8) if tiny else (4, 1024, 64)
    for seg in (patches, window):  # full attention per image, then window attention
        rows += bench_varlen(n_img, patches, seg, 2 if tiny else 16, 80, dtype, device)
    rows += bench_ops(*((7, 48, 64) if tiny else (4096, 3584, 18944)), shape, dtype, device)

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"# {device_name}, {args.dtype}, median ms")
    print(f"{'kernel':32} {'triton':>9} {'baseline':>12} {'base ms':>9} {'speedup':>8}  note")
    for name, t, base, t_base, note in rows:
        print(f"{name:32} {t:9.3f} {base:>12} {t_base:9.3f} {t_base / t:7.2f}x  {note}")


if __name__ == "__main__":
    main()
