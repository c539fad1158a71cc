# ruff: noqa: B023  (the sweep lambdas run inside their loop iteration)
"""Time the quantized linears' kernels at a 7B's shapes against bf16 cuBLAS, sweeping configs.

    python scripts/bench_quant_kernels.py                 # everything below, H200-sized
    python scripts/bench_quant_kernels.py --only int4_gemv --rows 1,4
    python scripts/bench_quant_kernels.py --only int4_gemm --rows 290,1024,4096
    python scripts/bench_quant_kernels.py --only fp8_gemv
    python scripts/bench_quant_kernels.py --only fp8_w8a16   # one row: the 16-bit GEMV on E4M3
    python scripts/bench_quant_kernels.py --only fp8_rows --rows 2,32  # W8A8 at decode batches
    python scripts/bench_quant_kernels.py --only fp8_rows_block  # the same, 128x128 block scales
    python scripts/bench_quant_kernels.py --only int4_folds   # each GEMV fold vs its own kernel
    python scripts/bench_quant_kernels.py --only quantize_rows --rows 16,290,2048  # one pass or two

Every config is checked against the dequantized reference before it is timed; a config that
fails to compile or is wrong prints as such. Times are medians of CUDA-graph replays cycling
through enough weight copies to miss L2 (as decode reads each weight once a token). GB/s
counts the packed weight + scales + zeros (INT4) or the E4M3 weight + scales (FP8).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from polymodal.bench.timing import graph_ms
from polymodal.llm_core.layers import (
    fp8_gemv,
    fp8_kernels,
    gemv,
    int4_gemv,
    int4_kernels,
    triton_ops,
)
from polymodal.llm_core.layers.gemv import GemvConfig, num_sms
from polymodal.llm_core.quantization import fp8_ops, int4_pack

SHAPES = {  # name: (N, K) of Qwen2.5-VL-7B's decoder linears
    "qkv": (4608, 3584),
    "o": (3584, 3584),
    "gate_up": (37888, 3584),
    "down": (3584, 18944),
}
ROTATE_BYTES = 512 << 20  # > the H200's 50 MB L2 many times over
GROUP = 128


def graph_us(fn, rep_ms: int = 40) -> float:
    return 1e3 * graph_ms(fn, rep_ms)


def rotating(make, nbytes: int) -> list:
    return [make(i) for i in range(max(1, -(-ROTATE_BYTES // nbytes)))]


def int4_weights(n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, zeros, scales = int4_pack.quantize_rtn(torch.randn(n, k, generator=gen), GROUP, None)
    weight = int4_pack.dequantize(q, zeros, scales, None)  # [N, K] fp32
    packed = int4_pack.pack_k(q)  # q: [K, N]
    return packed.cuda(), zeros.to(torch.uint8).cuda(), scales.to(torch.bfloat16).cuda(), weight


def report(name: str, m: int, cublas: float, rows: list[tuple], nbytes: int) -> None:
    """rows: (config, us or None, error text or None)."""
    good = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1])
    print(f"\n{name} m={m}: bf16 cuBLAS {cublas:.1f} us")
    for config, us, _ in good[:6]:
        print(f"  {str(config):<28} {us:8.1f} us  {nbytes / us / 1e3:7.0f} GB/s")
    for config, _, err in rows:
        if err:
            print(f"  {str(config):<28} FAILED {err[:160]}")


def sweep(fn, ref, configs, copies, rel: float) -> list[tuple]:
    """fn(config, weight copy) -> out; checked on copy 0 then timed over all copies."""
    rows = []
    for config in configs:
        try:
            out = fn(config, copies[0]).float()
            err = (out - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
            if not err <= rel:
                rows.append((config, None, f"max error {err:.2e} of the output's scale"))
                continue
            cycle = itertools.cycle(copies)
            rows.append((config, graph_us(lambda: fn(config, next(cycle))), None))
        except Exception as exc:  # a config that does not compile or launch loses, loudly
            rows.append((config, None, repr(exc)))
    return rows


def bench_int4_gemv(rows_list: list[int]) -> None:
    sms = num_sms(torch.device("cuda"))
    for name, (n, k) in SHAPES.items():
        packed, zeros, scales, weight = int4_weights(n, k, 0)
        nbytes = packed.numel() * 4 + zeros.numel() + scales.numel() * 2
        copies = rotating(lambda i: (packed.clone(), zeros.clone(), scales.clone()), nbytes)
        dense = rotating(lambda i: weight.to(torch.bfloat16).cuda(), n * k * 2)
        for m in rows_list:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = F.linear(x.float(), weight.cuda())
            cyc = itertools.cycle(dense)
            cublas = graph_us(lambda: F.linear(x, next(cyc)))
            default = int4_gemv.gemv_config(m, n, k, GROUP, sms)
            configs = [default] + [
                (bn, 128, split, warps)
                for bn in (64, 128, 256)
                for warps in (4, 8)
                for split in (1, 2, 4, 8, 16)
                if (bn, 128, split, warps) != default and k // 128 >= 2 * split
            ]
            if m == 1:  # each with and without the next tile's loads a tile ahead
                configs = list(dict.fromkeys(
                    (*c[:4], p) for c in configs for p in (False, True)))  # fmt: skip

            def run(config, w):
                return int4_gemv.int4_gemv(x, w[0], w[1], w[2], GROUP, config=config)

            result = sweep(run, ref, configs, copies, 2e-2)
            print(f"(default {default}: {result[0][1]} us)")
            report(f"int4_gemv {name}", m, cublas, result, nbytes)


def bench_int4_gemm(rows_list: list[int]) -> None:
    for name, (n, k) in SHAPES.items():
        packed, zeros, scales, weight = int4_weights(n, k, 0)
        wd = weight.to(torch.bfloat16).cuda()
        copies = [(packed, zeros, scales)]
        for m in rows_list:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = F.linear(x.float(), wd.float())
            cublas = graph_us(lambda: F.linear(x, wd))
            configs = [None] + [
                (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 64, 8, 4),
                (64, 128, 128, 8, 3), (128, 64, 128, 4, 3), (64, 64, 128, 4, 4),
                (64, 64, 128, 4, 3), (128, 256, 64, 8, 3), (256, 64, 64, 8, 3),
                (256, 64, 128, 8, 3), (256, 128, 64, 8, 3), (256, 32, 128, 4, 3),
            ]  # fmt: skip

            def run(config, w):
                return int4_kernels.int4_gemm(x, w[0], w[1], w[2], GROUP, config=config)

            result = sweep(run, ref, configs, copies, 2e-2)
            dense = getattr(int4_kernels, "int4_matmul_dequantized", None)
            if dense is not None:
                us = graph_us(lambda: dense(x, packed, zeros, scales, GROUP))
                result.append(("dequantize+cuBLAS", us, None))
            flops = 2 * m * n * k
            print(f"\nint4_gemm {name} m={m}: bf16 cuBLAS {cublas:.1f} us "
                  f"({flops / cublas / 1e6:.0f} TFLOP/s)")  # fmt: skip
            for config, us, err in sorted(result, key=lambda r: r[1] or 1e30)[:8]:
                text = f"{us:8.1f} us {flops / us / 1e6:6.0f} TFLOP/s" if us else f"FAILED {err}"
                print(f"  {str(config):<32} {text[:170]}")


def bench_fp8_gemv(rows_list: list[int]) -> None:
    sms = num_sms(torch.device("cuda"))
    for name, (n, k) in SHAPES.items():
        for strategy in ("channel", "block"):
            w = torch.randn(n, k) / k**0.5
            weight, scale = fp8_ops.quantize_weight(w, strategy)
            weight, scale = weight.cuda(), scale.cuda()
            block = 128 if strategy == "block" else None
            nbytes = weight.numel() + scale.numel() * 4
            copies = rotating(lambda i: (weight.clone(), scale.clone()), nbytes)
            dense = rotating(lambda i: w.to(torch.bfloat16).cuda(), n * k * 2)
            for m in rows_list:
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                ref = fp8_ops.w8a8_reference(x.float(), weight, scale, block)
                cyc = itertools.cycle(dense)
                cublas = graph_us(lambda: F.linear(x, next(cyc)))
                default = tuple(fp8_gemv.gemv_config(m, n, k, block is not None, sms))
                bks = (128, 256) if block else (256, 512)
                configs = [default, (*default[:3], 8)] + [
                    (bn, bk, split, 4)
                    for bn in (64, 128)
                    for bk in bks
                    for split in (2, 4, 8, 16)
                    if k // bk >= 2 * split
                ]

                def run(config, wt):
                    return fp8_gemv.fp8_gemv(x, wt[0], wt[1], block, config=config)

                result = sweep(run, ref, list(dict.fromkeys(configs)), copies, 2e-2)
                print(f"(default {default}: {result[0][1]} us)")
                report(f"fp8_gemv {name} {strategy}", m, cublas, result, nbytes)


def bench_fp8_w8a16() -> None:
    """One row, per channel: the 16-bit GEMV on E4M3 weights (`gemv(w_scale=)`, W8A16) over
    its configs (the 2-D accumulator and the per-row sums), beside the E4M3 wgmma GEMV's
    default (W8A8)."""
    sms = num_sms(torch.device("cuda"))
    for name, (n, k) in SHAPES.items():
        silu = name == "down"  # as decode runs it: SiLU*mul as x loads
        w = torch.randn(n, k) / k**0.5
        weight, scale = (t.cuda() for t in fp8_ops.quantize_weight(w, "channel"))
        nbytes = weight.numel() + scale.numel() * 4
        copies = rotating(lambda i: (weight.clone(), scale.clone()), nbytes)
        dense = rotating(lambda i: w.to(torch.bfloat16).cuda(), n * k * 2)
        x = torch.randn(1, k * (1 + silu), device="cuda").to(torch.bfloat16)
        rows = triton_ops.silu_and_mul_ref(x) if silu else x
        ref = F.linear(rows.float(), fp8_ops.dequantize_weight(weight, scale))
        cyc = itertools.cycle(dense)
        cublas = graph_us(lambda: F.linear(rows, next(cyc)))
        wgmma = itertools.cycle(copies)
        old = graph_us(lambda: fp8_gemv.fp8_gemv(x, *next(wgmma), silu_mul=silu))
        default = gemv.default_config(1, n, k, sms, silu, True)
        configs = [default] + [  # the 2-D accumulator: <= 64 fp32 a thread
            GemvConfig(bn, bk, split, warps)
            for bn in (8, 16)
            for bk in (256, 512, 1024, 2048)
            for warps in (4, 8)
            for split in (1, 2)
            if bn * bk <= 64 * 32 * warps and k // bk >= 2 * split
        ]
        configs += [  # per-row sums each tile (few registers: more programs an SM)
            GemvConfig(bn, bk, split, warps, fma2d=False)
            for bn in (4, 8)
            for bk in (1024, 2048, 4096)
            for warps in (2, 4)
            for split in (1, 2)
            if k // bk >= 2 * split
        ]

        def run(config, wt):
            return gemv.gemv(x, wt[0], config=config, silu_mul=silu, w_scale=wt[1])

        result = sweep(run, ref, list(dict.fromkeys(configs)), copies, 2e-2)
        print(f"(default {default}: {result[0][1]} us; E4M3 wgmma GEMV's default {old:.1f} us)")
        report(f"fp8 w8a16 {name}", 1, cublas, result, nbytes)


def bench_int4_folds() -> None:
    """One row, a 7B decode layer's INT4 GEMVs with each fold (the deferred RMSNorm into qkv and
    gate_up, SiLU*mul into down, the residual add into o and down) against the unfolded GEMV
    after the fold's own kernel (`rms_norm`, `silu_and_mul`, the add): which folds pay."""
    from polymodal.llm_core.layers.norm import DeferredNorm

    sms = num_sms(torch.device("cuda"))
    cases = {"qkv": "norm", "gate_up": "norm", "o": "residual", "down": "silu+residual"}
    print(f"\n{'shape':<8} {'fold':<14} {'folded us':>10} {'kernel + GEMV us':>17}")
    for name, fold in cases.items():
        n, k = SHAPES[name]
        packed, zeros, scales, _ = int4_weights(n, k, 0)
        nbytes = packed.numel() * 4 + zeros.numel() + scales.numel() * 2
        copies = rotating(lambda i: (packed.clone(), zeros.clone(), scales.clone()), nbytes)
        cfg = int4_gemv.gemv_config(1, n, k, GROUP, sms)
        h = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        norm_w = torch.rand(k, device="cuda").to(torch.bfloat16) + 0.5
        sumsq = (h.float() ** 2).reshape(1, -1, 128).sum(-1)  # per 128-feature block
        residual = torch.randn(1, n, device="cuda").to(torch.bfloat16)
        gate_up = torch.randn(1, 2 * k, device="cuda").to(torch.bfloat16)
        res = residual if "residual" in fold else None
        cyc = itertools.cycle(copies)

        def folded():
            w = next(cyc)
            x = DeferredNorm(h, sumsq, norm_w, 1e-6) if fold == "norm" else h
            x = gate_up if fold.startswith("silu") else x
            return int4_gemv.int4_gemv(x, *w, GROUP, config=cfg, silu_mul=fold.startswith("silu"),
                                       residual=res)  # fmt: skip

        def unfolded():
            w = next(cyc)
            x = triton_ops.rms_norm(h, norm_w, 1e-6)[0] if fold == "norm" else h
            x = triton_ops.silu_and_mul(gate_up) if fold.startswith("silu") else x
            out = int4_gemv.int4_gemv(x, *w, GROUP, config=cfg)
            return out + residual if res is not None else out

        print(f"{name:<8} {fold:<14} {graph_us(folded):10.1f} {graph_us(unfolded):17.1f}")


def bench_quantize_rows(rows: list[int]) -> None:
    """W8A8's per-token activation quantization (`fp8_kernels.quantize_rows`, before every
    FP8 GEMM of 2+ rows) at the 7B's two K: each row read once, whole, vs two passes of
    1024-feature loads (`ONE_PASS_MAX` = 0), us and GB/s (x read, E4M3 written)."""
    print(f"\n{'rows':>6} {'K':>6} {'one pass us':>12} {'two passes us':>14} {'GB/s (one)':>11}")
    default = fp8_kernels.ONE_PASS_MAX
    for m, k in itertools.product(rows, (3584, 18944)):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        ref_q, ref_s = fp8_ops.quantize_per_token(x)
        times = []
        for limit in (default, 0):
            fp8_kernels.ONE_PASS_MAX = limit
            xq, xs = fp8_kernels.quantize_rows(x)
            bad = (xq.float() != ref_q.float()).float().mean().item()
            assert bad < 1e-3 and torch.allclose(xs, ref_s.reshape(xs.shape), rtol=1e-6), limit
            times.append(graph_us(lambda: fp8_kernels.quantize_rows(x)))
        fp8_kernels.ONE_PASS_MAX = default
        print(f"{m:>6} {k:>6} {times[0]:12.1f} {times[1]:14.1f} {m * k * 3 / times[0] / 1e3:11.0f}")


def bench_fp8_rows(rows: list[int], strategy: str = "channel") -> None:
    """W8A8 at decode-batch rows (us): cuBLAS `_scaled_mm` (quantization included), the swapped
    product `(W @ xq^T)^T` (rows padded to 16), the Triton `fp8_gemm`'s default tile and the
    best of a sweep (narrow N, deep K, split-K; as M, N, K, warps, stages, split), the FP8 GEMV
    to 8 rows, bf16 `F.linear`. The engine's pick: `fp8.TRITON_MAX_ROWS`. `strategy="block"`:
    128x128 block scales (DeepSeek / Qwen3 FP8), Triton only, BLOCK_K 128 (the scale blocks)."""
    from polymodal.llm_core.quantization.fp8 import _scaled_mm

    tiles = [(64, 64, 128, 4, 4, 1), (64, 128, 128, 4, 3, 1)]
    tiles += [
        (bm, bn, bk, w, st, 1)
        for bm, bn in ((16, 32), (32, 32), (64, 32), (64, 16), (128, 32), (128, 64))
        for bk, w, st in ((128, 4, 4), (256, 4, 4), (256, 8, 4), (512, 4, 3))
    ]
    tiles += [
        (bm, bn, bk, w, 4, split)
        for bm, bn, bk, w in ((64, 32, 256, 4), (128, 64, 128, 8), (128, 32, 256, 8))
        for split in (2, 4)
    ]
    block = 128 if strategy == "block" else None
    tiles = [t for t in tiles if block is None or t[2] == block]
    print(f"{strategy}\n{'shape':>8} {'rows':>5} {'bf16':>7} {'scaled':>7} {'swapped':>7} "
          f"{'default':>7} {'triton':>7} {'gemv':>7}  best tile")  # fmt: skip
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) / k**0.5
        weight, scale = (t.cuda() for t in fp8_ops.quantize_weight(w, strategy))
        copies = rotating(lambda i: (weight.clone(), scale.clone()), n * k)
        dense = rotating(lambda i: w.to(torch.bfloat16).cuda(), n * k * 2)
        for m in rows:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = fp8_ops.w8a8_reference(x.float(), weight, scale, block)
            padded = F.pad(x, (0, 0, 0, -m % 16))

            def swapped(wt):
                xq, xs = fp8_kernels.quantize_rows(padded)
                out = torch._scaled_mm(wt[0], xq.t(), scale_a=wt[1], scale_b=xs.reshape(1, -1),
                                       out_dtype=torch.bfloat16)  # fmt: skip
                return out.t()[:m].contiguous()

            forms = {
                "scaled": lambda c, wt: _scaled_mm(x, wt[0], wt[1], None),
                "swapped": lambda c, wt: swapped(wt),
            }
            cyc = itertools.cycle(dense)
            line = [graph_us(lambda: F.linear(x, next(cyc)))]
            for form in forms.values() if block is None else ():
                line.append(sweep(form, ref, [None], copies, 2e-2)[0][1])
            line += [None, None] if block else []
            keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT_K")
            cfgs = [None] + [dict(zip(keys, tile, strict=True)) for tile in tiles]
            tri = sweep(lambda c, wt: fp8_kernels.fp8_gemm(x, wt[0], wt[1], block, config=c),
                        ref, cfgs, copies, 2e-2)  # fmt: skip
            best = min((r for r in tri if r[1] is not None), key=lambda r: r[1], default=None)
            line += [tri[0][1], best[1] if best else None]  # fp8_gemm's default tile, the best
            gemv_us = None
            if m <= fp8_gemv.GEMV_MAX_ROWS:
                gemv_us = sweep(lambda c, wt: fp8_gemv.fp8_gemv(x, wt[0], wt[1], block), ref,
                                [None], copies, 2e-2)[0][1]  # fmt: skip
            line.append(gemv_us)
            cells = " ".join(f"{'-' if t is None else f'{t:.1f}':>7}" for t in line)
            tile = tuple((best[0] or {"": "default"}).values()) if best else "-"
            print(f"{name:>8} {m:>5} {cells}  {tile}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=[
            "int4_gemv",
            "int4_gemm",
            "fp8_gemv",
            "fp8_w8a16",
            "fp8_rows",
            "fp8_rows_block",
            "int4_folds",
            "quantize_rows",
        ],  # fmt: skip
    )
    parser.add_argument("--rows", help="x rows, comma-separated")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")] if args.rows else None
    if args.only in (None, "int4_gemv"):
        bench_int4_gemv(rows or [1, 4])
    if args.only in (None, "fp8_gemv"):
        bench_fp8_gemv(rows or [1])
    if args.only in (None, "fp8_w8a16"):
        bench_fp8_w8a16()
    if args.only in (None, "fp8_rows"):
        bench_fp8_rows(rows or [2, 8, 16, 32, 64, 128])
    if args.only in (None, "fp8_rows_block"):
        bench_fp8_rows(rows or [2, 16, 32, 64], "block")
    if args.only in (None, "int4_folds"):
        bench_int4_folds()
    if args.only in (None, "quantize_rows"):
        bench_quantize_rows(rows or [1, 16, 64, 290, 2048])
    if args.only in (None, "int4_gemm"):
        bench_int4_gemm(rows or [290, 1024, 4096])


if __name__ == "__main__":
    main()
