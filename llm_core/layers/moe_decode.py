"""A sparse MoE block for a few rows (decode) in three Triton launches: `route`
(`moe_route.py`, re-exported here), then `experts` (gate_up, down).

Decode reads each chosen expert's weights once and does little math, so the experts run as
GEMVs over the chosen experts only (the tiles of the dense decode GEMV, `gemv.gemv_tile`), and
what lies between them folds into their prologues and epilogues:

- `route` (one launch): router logits, then top-k per row (softmax, or DeepSeek-V3's grouped
  sigmoid with its correction bias); shared experts follow as extra slots of weight 1.
- `experts`: a row's slots (routed, then shared) are numbered `pair = row * slots + slot`; a
  program takes one pair and one block of output features. Rows that chose the same expert
  share the program of that expert's first pair (later pairs' programs do nothing), so every
  chosen expert's weights are read once whatever the row count. gate_up writes each row's
  `[gate | up]` for that expert; down applies SiLU*mul as it loads them (as the dense MLP's
  down GEMV does), scales by the routing weight and stores each pair's fp32 output; the last
  program of a feature block to arrive sums each row's pairs in slot order (a row's sum does not
  depend on the other rows), adds the residual and writes the sums of squares the next GEMV's
  deferred RMSNorm needs (`AddedResidual`).
- Shared experts (DeepSeek): ids `E .. E + S - 1` read the shared MLP's own weights in place
  (`shared = (gate_up [2 * S * I, H], down [H, S * I])`, `llama.MLP`'s packed layout), its
  intermediate features cut into S experts of the routed size I: expert `E + s` is gate rows
  `[s * I, (s + 1) * I)`, the same up rows and down columns. Their sum is the MLP's output.

Shapes come from the rows and the config alone (no host read), so calls are captured in CUDA
graphs; the launches take programmatic dependent launch where `pdl.use_pdl` says so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polymodal.llm_core import pdl
from polymodal.llm_core.counters import arrival_counters
from polymodal.llm_core.layers.gemv import (
    TILE_ELEMENTS,
    WEIGHT_EVICTION,
    GemvConfig,
    num_sms,
)
from polymodal.llm_core.layers.gemv_folds import row_rstd
from polymodal.llm_core.layers.moe_route import (  # noqa: F401  (route: part of this API)
    decode_rows,
    norm_args,
    norm_tile,
    route,
    router_config,
)
from polymodal.llm_core.layers.moe_tiles import (
    down_rows,
    expert_gemv,
    gate_up_rows,
    store_down_part,
    store_gate_up,
    sum_pairs,
    weight_tile,
)
from polymodal.llm_core.layers.norm import AddedResidual


@triton.jit
def _pair_expert(ids_ptr, pair):
    """`pair`'s expert (int64), read from L2 (down reads it before its PDL wait, while gate_up
    runs: see `_down_kernel`)."""
    return tl.load(ids_ptr + pair, cache_modifier=".cg").to(tl.int64)


@triton.jit
def _expert_rows(ids_ptr, pair, expert, M, offs_m, SLOTS: tl.constexpr, BLOCK_J: tl.constexpr,
                 BLOCK_PAIRS: tl.constexpr):  # fmt: skip
    """Whether `pair` is the first to choose its `expert` (its program serves every row that
    did); `chosen [BLOCK_M, BLOCK_J]`: row m's slot j holds that expert; `slots`: the pair
    number of each (m, j). A row's experts are distinct."""
    offs_p = tl.arange(0, BLOCK_PAIRS)
    earlier = tl.load(ids_ptr + offs_p, mask=offs_p < pair, other=-1, cache_modifier=".cg")
    first = tl.sum((earlier == expert).to(tl.int32), 0) == 0
    offs_j = tl.arange(0, BLOCK_J)
    slots = offs_m[:, None] * SLOTS + offs_j[None, :]
    valid = (offs_m[:, None] < M) & (offs_j[None, :] < SLOTS)
    chosen = valid & (tl.load(ids_ptr + slots, mask=valid, other=-1, cache_modifier=".cg")
                      == expert)  # fmt: skip
    return first, chosen, slots


@triton.jit(do_not_specialize=["M", "norm_parts"])
def _gate_up_kernel(
    x_ptr,  # [M, K] (NORM: before the RMSNorm)
    w_ptr,  # [E, N, K] gate_up (`[gate | up]` rows), contiguous
    shared_ptr,  # [2 * S * (N / 2), K] shared experts' gate_up (`[gate | up]` rows)
    out_ptr,  # [M * SLOTS, M, N]: (p, m) = row m's [gate | up] through pair p's expert
    ids_ptr,  # int32 [M, SLOTS]: routed ids < E, shared ones E + s
    norm_w_ptr,
    norm_sumsq_ptr,
    norm_parts,
    eps,
    M,
    E,
    N,
    K,
    num_shared,
    stride_xm,
    NORM: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,  # M * SLOTS padded to a power of 2
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    STAGES: tl.constexpr = 1,
):
    """Program (pair, n block): the gate_up features of the block for every row that chose
    the pair's expert, if the pair is that expert's first. The first weight tile loads as soon
    as the pair's expert id is in, before the first-pair test and the norm statistics (a later
    pair of the same expert, rows > 1 only, loads lines its first pair's program is reading).
    PREFETCH: each next weight tile loads before the current one is used (two in flight)."""
    pair, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    pdl.wait(USE_PDL)  # the expert ids come from the kernel before
    expert = _pair_expert(ids_ptr, pair)
    first, chosen, _ = _expert_rows(ids_ptr, pair, expert, M, offs_m, SLOTS, BLOCK_J, BLOCK_PAIRS)
    # (after the id loads above: they issue together)
    w_rows = gate_up_rows(w_ptr, shared_ptr, expert, offs_n, E, N, K, num_shared)
    w = weight_tile(w_rows, offs_k, n_mask, K, WEIGHT_EVICTION)
    if first:
        rstd = row_rstd(norm_sumsq_ptr, norm_parts, eps, offs_m, M, K, NORM, BLOCK_P)
        acc = expert_gemv(w, w_rows, n_mask, x_ptr, M, K, stride_xm, offs_m, rstd, norm_w_ptr,
                          False, NORM, BLOCK_N, BLOCK_M, BLOCK_K, WEIGHT_EVICTION,
                          PREFETCH, STAGES)  # fmt: skip
        store_gate_up(out_ptr, acc, pair, chosen, M, N, offs_m, offs_n, n_mask)


@triton.jit(do_not_specialize=["M"])
def _down_kernel(
    h_ptr,  # [M * SLOTS, M, 2K] from _gate_up_kernel
    w_ptr,  # [E, N, K] down, contiguous
    shared_ptr,  # [N, S * K] shared experts' down
    part_ptr,  # fp32 [M * SLOTS, N]: each pair's weighted output
    counter_ptr,  # int32 per n block, zero between calls
    ids_ptr,  # int32 [M, SLOTS]
    weights_ptr,  # fp32 [M, SLOTS]
    res_ptr,  # [M, N] residual stream (RESIDUAL)
    out_ptr,  # [M, N]
    sumsq_ptr,  # fp32 [M, n blocks] out (RESIDUAL)
    M,
    E,
    N,
    K,
    num_shared,
    RESIDUAL: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_LOADS: tl.constexpr,  # the loads below before the PDL wait, not after it
    PREFETCH: tl.constexpr = False,  # each next weight tile a tile ahead (as gate_up's)
    STAGES: tl.constexpr = 1,  # the K loop through shared memory (as gate_up's)
):
    """Program (pair, n block): if the pair is its expert's first, the down features of the
    block for every row that chose it, times the routing weight, into `part` at that row's
    pair; then the block's last program sums the pairs per row (slot order) + the residual.

    Under PDL this kernel starts while gate_up still runs (gate_up's programs let it launch
    right after their own wait, so `route`, the kernel before gate_up, has finished): the ids,
    the routing weights, the residual and the first weight tile load before the wait, so the
    down weights stream in during gate_up's tail instead of after it (EARLY_LOADS; without it,
    all after the wait)."""
    pair, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    if not EARLY_LOADS:
        pdl.wait(USE_PDL)
    expert = _pair_expert(ids_ptr, pair)
    first, chosen, slots = _expert_rows(ids_ptr, pair, expert, M, offs_m, SLOTS, BLOCK_J,
                                        BLOCK_PAIRS)  # fmt: skip
    w_rows = down_rows(w_ptr, shared_ptr, expert, offs_n, E, N, K, num_shared)
    w = tl.load(w_rows + offs_k[None, :], mask=first & n_mask[:, None] & (offs_k < K)[None, :],
                other=0.0, eviction_policy=WEIGHT_EVICTION)  # fmt: skip
    routing = tl.sum(tl.load(weights_ptr + slots, mask=chosen, other=0.0, cache_modifier=".cg"),
                     1)  # [BLOCK_M]  # fmt: skip
    out_offs = offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M] -> out[m, f]
    out_mask = (offs_m[None, :] < M) & n_mask[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    r = acc  # the residual rows (RESIDUAL): written long before this kernel
    if RESIDUAL:
        r = tl.load(res_ptr + out_offs, mask=out_mask, other=0.0)
    if EARLY_LOADS:
        pdl.wait(USE_PDL)  # gate_up's rows are written
    if first:
        x_rows = h_ptr + pair.to(tl.int64) * M * 2 * K  # [M, 2K]: rows m of this expert
        no_rstd = tl.zeros((BLOCK_M,), tl.float32)
        acc = expert_gemv(w, w_rows, n_mask, x_rows, M, K, 2 * K, offs_m, no_rstd, w_ptr, True,
                          False, BLOCK_N, BLOCK_M, BLOCK_K, WEIGHT_EVICTION, PREFETCH,
                          STAGES)  # SiLU*mul as it loads the [gate | up] rows  # fmt: skip
        store_down_part(part_ptr, acc, routing, chosen, slots, N, offs_n, n_mask)
    tl.debug_barrier()  # every thread's partial is written before the counter moves
    arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:  # every pair's block is in: sum per row, slot order
        sum_pairs(part_ptr, r, out_ptr, sumsq_ptr, offs_m, offs_n, M, N, pid_n,
                  tl.num_programs(1), RESIDUAL, SLOTS, BLOCK_N, BLOCK_M)  # fmt: skip
        tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")


# One-tile expert launches (`expert_config(one_tile=True)`, off by default; `bench_moe.py --ab`
# times them): K up to ONE_TILE_K in one weight tile a program, while the launch has at most
# ONE_TILE_ROWS weight rows (the pairs' N).
ONE_TILE_K = 2048
ONE_TILE_ROWS = 32768


def expert_config(num_pairs: int, n: int, k: int, sms: int, is_cuda: bool,
                  one_tile: bool = False) -> GemvConfig:  # fmt: skip
    """One expert launch: the widest feature block (32 .. 4) that still gives >= 3.5 programs
    per SM over the pairs, weight tiles of `TILE_ELEMENTS` (H200 sweep, `bench_moe.py --sweep`,
    one token: Qwen3-30B-A3B's down 28.5 -> 22.3-22.5 us on 32-wide blocks of 256, K in 3 whole
    tiles; Mixtral's down best on 16 x 512). That is one wave: Qwen3's gate_up 16 x 512 (80
    registers, 6 programs an SM: 792 slots on an H200 for 768 programs), its down 32 x 256 (126
    registers, 4 an SM: 528 slots for 512).

    `one_tile` and a short K (`ONE_TILE_K`, `ONE_TILE_ROWS`): all of K in one tile of
    `TILE_ELEMENTS`, 8 warps (Qwen3's gate_up 4 x 2048, down 8 x 1024). The fifteenth session's
    default (with down's early loads; Qwen3-30B-A3B end to end, a layer: gate_up 16.6 -> 19.6
    us, down 11.7 -> 18.2). Why, from the code: 4x the programs at no more resident per SM
    (gate_up 3072 at 6 an SM, down 2048 at 4; sm_90 register counts), so ~4 waves, each paying
    again the chain a program waits through (ids from L2, then its weights from HBM, then a
    cross-warp reduction; down adds its input rows, the arrival atomic and the final sum);
    down's loads before its PDL wait cover only its first wave; down's K 768 leaves a quarter
    of each 1024-wide tile masked."""
    if not is_cuda:
        return GemvConfig(block_n=16, block_k=32)
    if one_tile and k <= ONE_TILE_K and num_pairs * n <= ONE_TILE_ROWS:
        block_k = max(16, triton.next_power_of_2(k))
        return GemvConfig(block_n=max(4, TILE_ELEMENTS // block_k), block_k=block_k, num_warps=8)
    block_n = next((b for b in (32, 16, 8) if 2 * num_pairs * triton.cdiv(n, b) >= 7 * sms), 4)
    block_k = min(TILE_ELEMENTS // block_n, max(16, triton.next_power_of_2(k)))
    return GemvConfig(block_n=block_n, block_k=block_k)


def shared_weights(shared, gate_up: torch.Tensor, down: torch.Tensor) -> tuple:
    """(S, shared gate_up, shared down) checked against the routed experts' sizes; without
    shared experts (0, the routed weights as unread stand-ins)."""
    if shared is None:
        return 0, gate_up, down
    shared_gate_up, shared_down = shared
    two_inter, hidden = gate_up.shape[1:]
    count = shared_down.shape[-1] // (two_inter // 2) if shared_down.dim() == 2 else 0
    fits = count >= 1 and shared_gate_up.shape == (count * two_inter, hidden)
    if not fits or shared_down.shape != (hidden, count * two_inter // 2):
        raise ValueError(f"moe decode experts: shared gate_up {tuple(shared_gate_up.shape)} / "
                         f"down {tuple(shared_down.shape)} are not S experts of gate_up "
                         f"{tuple(gate_up.shape[1:])}")  # fmt: skip
    if not (shared_gate_up.is_contiguous() and shared_down.is_contiguous()) or {
        shared_gate_up.dtype, shared_down.dtype} != {gate_up.dtype}:  # fmt: skip
        raise ValueError(f"moe decode experts: shared weights must be contiguous {gate_up.dtype}")
    return count, shared_gate_up, shared_down


def experts(
    x,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    residual: torch.Tensor | None = None,
    configs: tuple[GemvConfig, GemvConfig] | None = None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    early_loads: bool = True,
):
    """`sum_j weights[m, j] * down[e] @ (silu(gate[e] @ x[m]) * up[e] @ x[m])`, `e = ids[m, j]`,
    in two launches; each chosen expert's weights are read once.

    x: `[M <= MAX_ROWS, H]` or a `DeferredNorm` of such; gate_up `[E, 2I, H]`, down `[E, H, I]`
    (contiguous, x's dtype); weights / ids `[M, slots]` (a row's experts distinct). `shared`:
    the shared MLP's `(gate_up [2 * S * I, H], down [H, S * I])` (x's dtype, contiguous), run
    as experts `E .. E + S - 1` where `ids` names them (`route(..., shared_experts=S)` appends
    them with weight 1). Returns `[M, H]` in x's dtype, or with `residual [M, H]`:
    `AddedResidual(out + residual, sums of squares)` as `gemv` does. `configs`: (gate_up's,
    down's) launch; default `expert_config` (`num_stages` > 1: each K loop through shared
    memory, that many tiles deep; not with `prefetch`). `early_loads`: down loads its ids, routing
    weights, residual and first weight tile before its PDL wait (False: after it; for A/B
    timing, `bench_moe.py --ab`).
    """
    norm, rows = decode_rows(x, gate_up, "experts")
    m, hidden = rows.shape
    two_inter, inter = gate_up.shape[1], down.shape[2]
    if down.shape != (gate_up.shape[0], hidden, two_inter // 2) or not down.is_contiguous():
        raise ValueError(f"moe decode experts: down {tuple(down.shape)} does not match "
                         f"gate_up {tuple(gate_up.shape)}")  # fmt: skip
    if residual is not None and (residual.shape != (m, hidden) or not residual.is_contiguous()):
        raise ValueError(f"moe decode residual must be contiguous [{m}, {hidden}]")
    num_shared, shared_gate_up, shared_down = shared_weights(shared, gate_up, down)
    slots = ids.shape[1]
    num_pairs = m * slots
    ids = ids.to(torch.int32).contiguous()  # no copy when it comes from `route`
    weights = weights.to(torch.float32).contiguous()
    device = rows.device
    gate_up_cfg, down_cfg = configs or (
        expert_config(num_pairs, two_inter, hidden, num_sms(device), rows.is_cuda),
        expert_config(num_pairs, hidden, inter, num_sms(device), rows.is_cuda),
    )
    out = torch.empty((m, hidden), dtype=rows.dtype, device=device)
    n_blocks = triton.cdiv(hidden, down_cfg.block_n)
    sumsq = out  # unread without a residual
    if residual is not None:
        sumsq = torch.empty((m, n_blocks), dtype=torch.float32, device=device)
    if m == 0:
        return out if residual is None else AddedResidual(out, sumsq)
    gate_up_rows = torch.empty((num_pairs, m, two_inter), dtype=rows.dtype, device=device)
    part = torch.empty((num_pairs, hidden), dtype=torch.float32, device=device)
    norm_w, norm_sumsq, parts, eps = norm_args(norm, rows)
    flag = pdl.use_pdl(rows)
    pairs = dict(SLOTS=slots, BLOCK_J=triton.next_power_of_2(slots),
                 BLOCK_PAIRS=triton.next_power_of_2(num_pairs), BLOCK_M=triton.next_power_of_2(m),
                 WEIGHT_EVICTION=WEIGHT_EVICTION, USE_PDL=flag, launch_pdl=flag)  # fmt: skip
    _gate_up_kernel[(num_pairs, triton.cdiv(two_inter, gate_up_cfg.block_n))](
        rows, gate_up, shared_gate_up, gate_up_rows, ids, norm_w, norm_sumsq, parts, eps,
        m, gate_up.shape[0], two_inter, hidden, num_shared, rows.stride(0), NORM=norm is not None,
        BLOCK_P=triton.next_power_of_2(parts), BLOCK_N=gate_up_cfg.block_n,
        BLOCK_K=gate_up_cfg.block_k, num_warps=gate_up_cfg.num_warps,
        num_stages=1, PREFETCH=gate_up_cfg.prefetch, STAGES=gate_up_cfg.num_stages, **pairs,
    )  # fmt: skip
    res = residual if residual is not None else out  # unread without RESIDUAL
    _down_kernel[(num_pairs, n_blocks)](
        gate_up_rows, down, shared_down, part, arrival_counters(device, n_blocks), ids, weights,
        res, out, sumsq, m, gate_up.shape[0], hidden, inter, num_shared,
        RESIDUAL=residual is not None, EARLY_LOADS=early_loads, BLOCK_N=down_cfg.block_n,
        BLOCK_K=down_cfg.block_k, num_warps=down_cfg.num_warps, num_stages=1,
        PREFETCH=down_cfg.prefetch, STAGES=down_cfg.num_stages, **pairs,
    )  # fmt: skip
    return out if residual is None else AddedResidual(out, sumsq)
