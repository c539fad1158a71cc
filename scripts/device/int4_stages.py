"""Issue 19: the one-row INT4 GEMV with its K loop pipelined through shared memory (`cp.async`,
`stages` > 1 in the config) against the default, at Qwen2.5-VL-7B's four shapes: CUDA-graph
medians over weight copies that rotate through more than L2 (us, GB/s), the output checked
against fp32 first. Offline (sm_90): the default's loop spends 26-35 instructions a packed
int32 at 48-96 registers; stages keep more tiles in flight without the registers.

    python3 scripts/device/int4_stages.py sweep best.json [shape ...]   (writes each shape's best)
    python3 scripts/device/int4_stages.py engine best.json|default      (AWQ engine bench, 8 images)
"""

import json
import os
import sys

import torch

sys.path.insert(0, "scripts")
from bench_quant_kernels import GROUP, SHAPES, int4_weights, report, rotating, sweep  # noqa: E402

from polymodal.llm_core.layers import int4_gemv  # noqa: E402
from polymodal.llm_core.layers.gemv import num_sms  # noqa: E402

WIDE = os.environ.get("INT4_WIDE", "gate_up,down").split(",")  # shapes swept wide


def configs(default: tuple, k: int, wide: bool) -> list[tuple]:
    """The default, then (BLOCK_N, 128, split, warps, no prefetch, stages): `wide` sweeps
    BLOCK_N 64 / 128 (4 / 8 warps), 256 (8 warps) and the default's split or twice it, else
    only stages."""
    bn, _, split, warps = default[:4]
    grid = [(b, w, sk) for b in (64, 128) for w in (4, 8) for sk in (split, split * 2)]
    grid += [(256, 8, split), (256, 8, split * 2)]  # 16 words a thread at 8 warps
    out = [default]
    for b, w, sk in grid if wide else [(bn, warps, split)]:
        if k // 128 >= 2 * sk:
            out += [(b, 128, sk, w, False, stages) for stages in (1, 3, 5)]
    return list(dict.fromkeys(out))


def shape_sweep(name: str, sms: int, wide: bool) -> tuple:
    n, k = SHAPES[name]
    packed, zeros, scales, weight = int4_weights(n, k, 0)
    nbytes = packed.numel() * 4 + zeros.numel() + scales.numel() * 2
    copies = rotating(lambda i: (packed.clone(), zeros.clone(), scales.clone()), nbytes)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), weight.cuda())
    default = int4_gemv.gemv_config(1, n, k, GROUP, sms)

    def run(config, w):
        return int4_gemv.int4_gemv(x, w[0], w[1], w[2], GROUP, config=config)

    rows = sweep(run, ref, configs(default, k, wide), copies, 2e-2)
    print(f"(default {default}: {next(r[1] for r in rows if r[0] == default)} us)")
    report(f"int4_gemv {name}", 1, float("nan"), rows, nbytes)
    return min((r for r in rows if r[1] is not None), key=lambda r: r[1])[0]


def engine(path: str) -> None:
    """The AWQ engine bench with each shape's config from `path` (one-row GEMVs of the 7B's
    shapes, groups of 128), or the defaults."""
    from polymodal.cli import main as cli

    best = {} if path == "default" else json.load(open(path))
    picks = {tuple(SHAPES[name]): tuple(cfg) for name, cfg in best.items()}
    default = int4_gemv.gemv_config

    def patched(m, n, k, group_size, sms):
        pick = picks.get((n, k)) if m == 1 and group_size == GROUP else None
        return pick or default(m, n, k, group_size, sms)

    int4_gemv.gemv_config = patched
    print(f"== engine {path}: {picks}", flush=True)
    cli(["bench", "--skip-hf", "--images", "8", "--quantization", "awq"])


def main(args: list[str]) -> None:
    if args[0] == "engine":
        return engine(args[1])
    sms = num_sms(torch.device("cuda"))
    best = {}
    for name in args[2:] or list(SHAPES):
        best[name] = shape_sweep(name, sms, name in WIDE)
        json.dump(best, open(args[1], "w"))  # each shape's as it comes (a run cut short keeps them)
    print("best:", best)


if __name__ == "__main__":
    main(sys.argv[1:])
