"""A sparse MoE block for a few rows (decode) in ONE persistent Triton launch: what
`moe_decode` computes in three (`route`, then the experts' gate_up and down), with waits inside
the launch instead of two launch boundaries.

Between the three launches HBM idles: `route` streams half a megabyte, then its grid must end
before gate_up may read the ids, and gate_up's programs each start with that read; down waits
for gate_up's whole grid. Here every program stays resident (one grid of at most what the SMs
hold at once; `layer_programs`) and runs:

1. Router: program p computes the logits of experts `[p * BLOCK_R, (p + 1) * BLOCK_R)` for every
   row (its router rows loaded before the PDL wait), stores them and arrives on a grid counter;
   every program waits for all of those (a grid barrier), then picks each row's experts
   itself from the logits (`moe_route.pick_experts`: `route`'s choice, in registers, no ids
   round trip; program 0 also stores them for the caller).
2. Work items, dealt round-robin over the programs: every (pair, gate_up feature block) first,
   then every (pair, down feature block), both pair-major, in `moe_tiles`' tiles (the math and
   rounding of `moe_decode`). A gate_up item of its expert's first pair stores its block of the
   `[gate | up]` rows and counts on the pair's counter; a down item loads its first weight tile,
   waits until its pair's counter holds every gate_up block, then stores its weighted part; the
   block's last item to arrive sums the pairs per row in slot order and adds the residual
   (`moe_tiles.sum_pairs`).
3. The last program to finish zeroes the counters (so CUDA-graph replays find them zero).

No wait can deadlock: every program is resident, and each program finishes all its gate_up
items (which come first in its order) before it waits on any pair, so every gate_up item is in
the hands of a program that is not waiting. Off CUDA (the interpreter runs programs one after
another) the grid is one program.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers import moe_tiles
from polymodal.llm_core.layers.gemv import WEIGHT_EVICTION, num_sms
from polymodal.llm_core.layers.gemv_folds import row_rstd
from polymodal.llm_core.layers.moe_decode import shared_weights
from polymodal.llm_core.layers.moe_route import (
    check_scoring,
    decode_rows,
    norm_args,
    pick_experts,
    router_logits,
    store_slots,
)
from polymodal.llm_core.layers.norm import AddedResidual


@triton.jit
def _pair_in(top_id, pair, offs_m, M, SLOTS: tl.constexpr, BLOCK_J: tl.constexpr):
    """`pair`'s expert (int64), whether `pair` is the first to choose it, `chosen [BLOCK_M,
    BLOCK_J]` (row m's slot j holds it) and each (m, j)'s pair number, from the ids in registers."""
    offs_j = tl.arange(0, BLOCK_J)
    slots = offs_m[:, None] * SLOTS + offs_j[None, :]
    valid = (offs_m[:, None] < M) & (offs_j[None, :] < SLOTS)
    expert = tl.sum(tl.sum(tl.where(valid & (slots == pair), top_id, 0), 1), 0)
    chosen = valid & (top_id == expert)
    first = tl.sum(tl.sum((chosen & (slots < pair)).to(tl.int32), 1), 0) == 0
    return expert.to(tl.int64), first, chosen, slots


@triton.jit
def _wait_until(counter_ptr, target):
    """Spin until the int32 counter holds at least `target` (acquire: what its producers wrote
    before counting is visible after)."""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")


@triton.jit(do_not_specialize=["M", "norm_parts"])
def _moe_layer_kernel(
    x_ptr,  # [M, H] (NORM: before the RMSNorm)
    router_ptr,  # [E, H]
    bias_ptr,  # fp32 [E] correction bias (BIAS)
    logits_ptr,  # fp32 [M, E] workspace
    weights_ptr,  # fp32 [M, SLOTS] out (program 0)
    ids_ptr,  # int32 [M, SLOTS] out (program 0)
    gate_up_ptr,  # [E, 2I, H]
    down_ptr,  # [E, H, I]
    shared_gate_up_ptr,  # [2 * S * I, H]
    shared_down_ptr,  # [H, S * I]
    h_ptr,  # [M * SLOTS, M, 2I] workspace: each pair's expert's [gate | up] of every row
    part_ptr,  # fp32 [M * SLOTS, H] workspace: each pair's weighted down output
    counter_ptr,  # int32, zero between calls: barrier, finish, BLOCK_PAIRS pairs, down blocks
    res_ptr,  # [M, H] (RESIDUAL)
    out_ptr,  # [M, H]
    sumsq_ptr,  # fp32 [M, down blocks] out (RESIDUAL)
    norm_w_ptr,
    norm_sumsq_ptr,
    norm_parts,
    eps,
    scaling,
    M,
    E,
    H,
    I,  # noqa: E741  (the intermediate size)
    group_size,
    stride_xm,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    SIGMOID: tl.constexpr,
    FP32_LOGITS: tl.constexpr,
    BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    SLOTS: tl.constexpr,  # TOP_K + NUM_SHARED
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # router: experts a program
    BLOCK_KR: tl.constexpr,
    BLOCK_NG: tl.constexpr,  # gate_up items: features, K tile
    BLOCK_KG: tl.constexpr,
    BLOCK_ND: tl.constexpr,  # down items
    BLOCK_KD: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    # 1. the router's logits of this program's experts, then every program picks the experts
    offs_e = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    e_mask = offs_e < E
    r_rows = router_ptr + offs_e.to(tl.int64)[:, None] * H
    w_r = moe_tiles.weight_tile(r_rows, tl.arange(0, BLOCK_KR), e_mask, H, WEIGHT_EVICTION)
    pdl.wait(USE_PDL)
    rstd = row_rstd(norm_sumsq_ptr, norm_parts, eps, offs_m, M, H, NORM, BLOCK_P)
    routers = tl.cdiv(E, BLOCK_R)  # the programs with router rows arrive; all wait for them
    if pid < routers:
        router_logits(w_r, r_rows, e_mask, x_ptr, logits_ptr, offs_e, offs_m, rstd, norm_w_ptr,
                      M, E, H, stride_xm, NORM, FP32_LOGITS, BLOCK_R, BLOCK_M, BLOCK_KR,
                      WEIGHT_EVICTION)  # fmt: skip
        tl.debug_barrier()  # every thread's logits are written before the counter moves
        tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    _wait_until(counter_ptr, routers)
    top_w, top_id = pick_experts(logits_ptr, bias_ptr, scaling, offs_m, M, E, group_size, SIGMOID,
                                 BIAS, RENORMALIZE, TOP_K, NUM_SHARED, NUM_GROUPS, TOPK_GROUPS,
                                 BLOCK_J, BLOCK_E, BLOCK_G, BLOCK_S, BLOCK_M)  # fmt: skip
    if pid == 0:
        store_slots(weights_ptr, ids_ptr, top_w, top_id, offs_m, M, SLOTS, BLOCK_J)
    pairs = M * SLOTS
    pair_ptr = counter_ptr + 2
    block_ptr = counter_ptr + 2 + BLOCK_PAIRS
    # 2a. gate_up items: (pair, feature block), pair-major
    n_gate_up = tl.cdiv(2 * I, BLOCK_NG)
    gate_up_items = pairs * n_gate_up
    for item in range(pid, gate_up_items, programs):
        pair = item // n_gate_up
        expert, first, chosen, _ = _pair_in(top_id, pair, offs_m, M, SLOTS, BLOCK_J)
        if first:
            offs_g = (item % n_gate_up) * BLOCK_NG + tl.arange(0, BLOCK_NG)
            g_mask = offs_g < 2 * I
            g_rows = moe_tiles.gate_up_rows(gate_up_ptr, shared_gate_up_ptr, expert, offs_g, E,
                                            2 * I, H, NUM_SHARED)  # fmt: skip
            w_g = moe_tiles.weight_tile(g_rows, tl.arange(0, BLOCK_KG), g_mask, H, WEIGHT_EVICTION)
            acc_g = moe_tiles.expert_gemv(w_g, g_rows, g_mask, x_ptr, M, H, stride_xm, offs_m, rstd,
                                          norm_w_ptr, False, NORM, BLOCK_NG, BLOCK_M, BLOCK_KG,
                                          WEIGHT_EVICTION, PREFETCH)  # fmt: skip
            moe_tiles.store_gate_up(h_ptr, acc_g, pair, chosen, M, 2 * I, offs_m, offs_g, g_mask)
            tl.debug_barrier()  # every thread's rows are written before the counter moves
            tl.atomic_add(pair_ptr + pair, 1, sem="release", scope="gpu")
    # 2b. down items, continuing the round-robin where the gate_up items ended
    n_down = tl.cdiv(H, BLOCK_ND)
    no_rstd = tl.zeros((BLOCK_M,), tl.float32)
    for item in range((pid + programs - gate_up_items % programs) % programs, pairs * n_down,
                      programs):  # fmt: skip
        pair_d, pid_n = item // n_down, item % n_down
        expert_d, first_d, chosen_d, slots = _pair_in(top_id, pair_d, offs_m, M, SLOTS, BLOCK_J)
        offs_d = pid_n * BLOCK_ND + tl.arange(0, BLOCK_ND)
        d_mask = offs_d < H
        if first_d:
            d_rows = moe_tiles.down_rows(down_ptr, shared_down_ptr, expert_d, offs_d, E, H, I,
                                         NUM_SHARED)  # fmt: skip
            w_d = moe_tiles.weight_tile(d_rows, tl.arange(0, BLOCK_KD), d_mask, I, WEIGHT_EVICTION)
            _wait_until(pair_ptr + pair_d, n_gate_up)  # the pair's [gate | up] rows are in
            x_rows = h_ptr + pair_d.to(tl.int64) * M * 2 * I
            acc_d = moe_tiles.expert_gemv(w_d, d_rows, d_mask, x_rows, M, I, 2 * I, offs_m, no_rstd,
                                          norm_w_ptr, True, False, BLOCK_ND, BLOCK_M, BLOCK_KD,
                                          WEIGHT_EVICTION, PREFETCH)  # SiLU*mul on load # fmt: skip
            routing = tl.sum(tl.where(chosen_d, top_w, 0.0), 1)  # [BLOCK_M]
            moe_tiles.store_down_part(part_ptr, acc_d, routing, chosen_d, slots, H, offs_d, d_mask)
        tl.debug_barrier()  # every thread's part is written before the counter moves
        arrived = tl.atomic_add(block_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == pairs - 1:  # every pair's part of the block is in
            r = tl.zeros((BLOCK_ND, BLOCK_M), dtype=tl.float32)
            if RESIDUAL:
                out_offs = offs_m[None, :] * H + offs_d[:, None]
                r = tl.load(res_ptr + out_offs, mask=(offs_m[None, :] < M) & d_mask[:, None],
                            other=0.0)  # fmt: skip
            moe_tiles.sum_pairs(part_ptr, r, out_ptr, sumsq_ptr, offs_m, offs_d, M, H, pid_n,
                                n_down, RESIDUAL, SLOTS, BLOCK_ND, BLOCK_M)  # fmt: skip
            tl.atomic_xchg(block_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    # 3. the last program out zeroes the barrier and pair counters
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel", scope="gpu") == programs - 1:
        offs_p = tl.arange(0, BLOCK_PAIRS)
        tl.store(pair_ptr + offs_p, tl.zeros((BLOCK_PAIRS,), tl.int32), mask=offs_p < pairs)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(counter_ptr + 1, 0, sem="relaxed", scope="gpu")


@dataclass(frozen=True)
class LayerConfig:
    """Launch parameters of `moe_layer`: the gate_up and down items' tiles (features x K),
    warps a program and programs an SM (at most what fits at once: `layer_programs`)."""

    gate_up_n: int = 32
    gate_up_k: int = 512
    down_n: int = 32
    down_k: int = 256
    num_warps: int = 8
    per_sm: int = 1
    prefetch: bool = True  # each next weight tile a tile ahead

    def __post_init__(self):
        for name in ("gate_up_n", "gate_up_k", "down_n", "down_k", "num_warps", "per_sm"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"LayerConfig.{name}={value} must be a power of two")


DEFAULT = LayerConfig()  # on CUDA (s49a swept 1-3 programs an SM; s49c tries more)
CPU_CONFIG = LayerConfig(gate_up_n=16, gate_up_k=32, down_n=16, down_k=32, num_warps=4)
# registers, warps and programs an SM holds (sm_80 .. sm_90)
_SM_REGISTERS, _SM_WARPS, _SM_PROGRAMS = 65536, 64, 32


@functools.lru_cache(maxsize=64)
def _resident(n_regs: int, num_warps: int, shared: int, sm_shared: int) -> int:
    """Programs of a compiled kernel one SM holds at once (registers allocated 256 a warp)."""
    warp_regs = -(-max(n_regs, 1) * 32 // 256) * 256
    by_smem = sm_shared // shared if shared else _SM_PROGRAMS
    by_regs = _SM_REGISTERS // (warp_regs * num_warps)
    return max(1, min(by_regs, _SM_WARPS // num_warps, by_smem, _SM_PROGRAMS))


_COMPILED: dict = {}  # launch key -> programs an SM holds, once the kernel is compiled


def layer_programs(device: torch.device, config: LayerConfig, key) -> int:
    """The persistent grid: one program off CUDA (the interpreter runs programs in turn); on
    a GPU `per_sm` programs an SM, but until the kernel of `key` is compiled (its first
    launch) and where fewer fit, 1 (8 warps of even 255 registers always fit)."""
    if device.type != "cuda":
        return 1
    fits = _COMPILED.get(key, 1)
    return num_sms(device) * max(1, min(config.per_sm, fits))


def moe_layer(
    x,
    router: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    scaling: float = 1.0,
    residual: torch.Tensor | None = None,
    *,
    scoring: str = "softmax",
    fp32_logits: bool = False,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: LayerConfig | None = None,
):
    """`moe_decode.route` then `moe_decode.experts` in one launch: (out, routing weights,
    expert ids), each as those return them (out: `[M, H]`, or with `residual` an
    `AddedResidual`; weights fp32 and ids int32 `[M, top_k + S]`). Same arguments and same
    values (the same tiles in the same order)."""
    norm, rows = decode_rows(x, router, "moe_layer")
    m, hidden = rows.shape
    num_experts = router.shape[0]
    check_scoring(scoring, num_experts, top_k, correction_bias, num_groups, topk_groups)
    inter = down.shape[2]
    if gate_up.shape != (num_experts, 2 * inter, hidden) or down.shape[:2] != (
        num_experts,
        hidden,
    ) or not (gate_up.is_contiguous() and down.is_contiguous()):  # fmt: skip
        raise ValueError(f"moe_layer: gate_up {tuple(gate_up.shape)} / down "
                         f"{tuple(down.shape)} are not {num_experts} contiguous experts of "
                         f"hidden size {hidden}")  # fmt: skip
    if residual is not None and (residual.shape != (m, hidden) or not residual.is_contiguous()):
        raise ValueError(f"moe_layer: residual must be contiguous [{m}, {hidden}]")
    num_shared, shared_gate_up, shared_down = shared_weights(shared, gate_up, down)
    slots = top_k + num_shared
    device = rows.device
    cfg = config or (DEFAULT if rows.is_cuda else CPU_CONFIG)
    n_down = triton.cdiv(hidden, cfg.down_n)
    weights = torch.empty((m, slots), dtype=torch.float32, device=device)
    ids = torch.empty((m, slots), dtype=torch.int32, device=device)
    out = torch.empty((m, hidden), dtype=rows.dtype, device=device)
    sumsq = out if residual is None else torch.empty((m, n_down), dtype=torch.float32,
                                                     device=device)  # fmt: skip
    result = out if residual is None else AddedResidual(out, sumsq)
    if m == 0:
        return result, weights, ids
    pairs = m * slots
    logits = torch.empty((m, num_experts), dtype=torch.float32, device=device)
    h = torch.empty((pairs, m, 2 * inter), dtype=rows.dtype, device=device)
    part = torch.empty((pairs, hidden), dtype=torch.float32, device=device)
    norm_w, norm_sumsq, parts, eps = norm_args(norm, rows)
    flag = pdl.use_pdl(rows)
    block_pairs = triton.next_power_of_2(pairs)
    counters = arrival_counters(device, 2 + block_pairs + n_down)
    constants = dict(
        NORM=norm is not None, RESIDUAL=residual is not None, SIGMOID=scoring == "sigmoid",
        FP32_LOGITS=fp32_logits, BIAS=correction_bias is not None, RENORMALIZE=renormalize,
        TOP_K=top_k, NUM_SHARED=num_shared, SLOTS=slots, NUM_GROUPS=num_groups,
        TOPK_GROUPS=topk_groups, BLOCK_J=triton.next_power_of_2(slots),
        BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_G=triton.next_power_of_2(num_groups),
        BLOCK_S=triton.next_power_of_2(num_experts // num_groups),
        BLOCK_P=triton.next_power_of_2(parts), BLOCK_M=triton.next_power_of_2(m),
        BLOCK_PAIRS=block_pairs, BLOCK_NG=cfg.gate_up_n,
        BLOCK_KG=min(cfg.gate_up_k, max(16, triton.next_power_of_2(hidden))),
        BLOCK_ND=cfg.down_n, BLOCK_KD=min(cfg.down_k, max(16, triton.next_power_of_2(inter))),
        WEIGHT_EVICTION=WEIGHT_EVICTION, USE_PDL=flag, PREFETCH=cfg.prefetch,
    )  # fmt: skip
    key = (device, rows.dtype, cfg, tuple(sorted(constants.items())))
    programs = layer_programs(device, cfg, key)
    block_r = triton.next_power_of_2(triton.cdiv(num_experts, programs))
    block_kr = min(max(16, triton.next_power_of_2(hidden)), max(16, 8192 // block_r))
    kernel = _moe_layer_kernel[(programs,)](
        rows, router, correction_bias if correction_bias is not None else logits, logits,
        weights, ids, gate_up, down, shared_gate_up, shared_down, h, part, counters,
        residual if residual is not None else out, out, sumsq, norm_w, norm_sumsq, parts, eps,
        scaling, m, num_experts, hidden, inter, num_experts // num_groups, rows.stride(0),
        BLOCK_R=block_r, BLOCK_KR=block_kr, num_warps=cfg.num_warps, num_stages=1,
        launch_pdl=flag, **constants,
    )  # fmt: skip
    if rows.is_cuda and key not in _COMPILED:
        props = torch.cuda.get_device_properties(device)
        _COMPILED[key] = _resident(kernel.n_regs, cfg.num_warps, kernel.metadata.shared,
                                   props.shared_memory_per_multiprocessor)  # fmt: skip
    return result, weights, ids
