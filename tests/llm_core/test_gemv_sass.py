"""The 16-bit GEMV's sm_90 code, compiled offline (`tests/llm_core/sass.py`), in one-row
configs: Gemma's folds (the unit-offset deferred norm and GELU-tanh * up as x loads, the
post-norm and add in the epilogue) compile, add little to a K loop of 4 features x 2048 (2
warps), and the epilogue's fold nothing; in the default for K up to 4096 (its qkv / o /
gate_up: one whole-K tile, 4 warps) they stay in registers."""

from tests.llm_core.sass import compiled, largest_loop

TYPES = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
         "part_ptr": "*fp32", "res_ptr": "*bf16", "sumsq_ptr": "*fp32", "norm_w_ptr": "*bf16",
         "norm_sumsq_ptr": "*fp32", "eps": "fp32", "lora_y_ptr": "*fp32", "lora_b_ptr": "*bf16",
         "post_w_ptr": "*bf16", "post_eps": "fp32", "h_ptr": "*bf16",
         "hsq_ptr": "*fp32"}  # fmt: skip


K_LOOP_CONST = {"HAS_BIAS": 0, "SILU_MUL": 0, "GELU_TANH": 0, "RESIDUAL": 0, "NORM": 1,
                "UNIT": 0, "BLOCK_P": 1, "POST_NORM": 0, "BLOCK_Q": 1024, "LORA": 0,
                "LORA_SLICES": 1, "BLOCK_R": 1, "SPLIT_K": 1, "BLOCK_M": 1, "BLOCK_N": 4,
                "BLOCK_K": 2048, "WEIGHT_EVICTION": "evict_first", "USE_PDL": 1}  # fmt: skip


def k_loop(warps=2, **folds):
    const = {**K_LOOP_CONST, **folds}
    return largest_loop("polymodal.llm_core.layers.gemv._gemv_kernel", const, TYPES, warps)


def test_gemma_folds_leave_the_k_loop_as_it_was():
    plain, spills, _ = k_loop()
    unit, unit_spills, _ = k_loop(UNIT=1)
    folded, folded_spills, _ = k_loop(UNIT=1, POST_NORM=1)
    assert spills == unit_spills == folded_spills == 0
    # (1 + w) and the one rounding: < 1 instruction more a weight (128 a thread an iteration;
    # 773 -> 855 with triton 3.8: ~6.7 a weight, well under what the issue rate allows at HBM
    # speed, ~19 a weight on an H200 SM)
    assert unit <= plain + 128, (plain, unit)
    assert folded <= unit + 8, (unit, folded)  # the post-norm lives in the epilogue


def test_one_whole_k_tile_keeps_gemma_folds_in_registers():
    """The one-row default for K up to 4096 (`gemv_config.ONE_TILE_MAX_K`: 4 features x 4096,
    4 warps, 128 weights a thread): Gemma's qkv / gate_up (unit-offset deferred norm) and o
    (post-norm and residual in the epilogue) fit the registers (126-127, no spill)."""
    for folds in ({"UNIT": 1}, {"NORM": 0, "UNIT": 1, "RESIDUAL": 1, "POST_NORM": 1}):
        const = {**K_LOOP_CONST, "BLOCK_K": 4096, **folds}
        registers, loops = compiled("polymodal.llm_core.layers.gemv._gemv_kernel", const, TYPES)
        assert registers <= 128 and all(spills == 0 for _, spills, _ in loops), (folds, loops)


def test_gelu_tanh_on_load_costs_little():
    """Gemma's down (GELU-tanh * up as x loads, post-norm fold; the one-row down config: 8
    features x 2048, 4 splits, 8 warps: 64 weights a thread an iteration) vs SiLU's."""
    down = {"SILU_MUL": 1, "NORM": 0, "POST_NORM": 1, "BLOCK_Q": 512, "SPLIT_K": 4,
            "BLOCK_N": 8}  # fmt: skip
    silu, spills, _ = k_loop(**down, warps=8)
    gelu, gelu_spills, _ = k_loop(**down, GELU_TANH=1, warps=8)
    assert spills == gelu_spills == 0
    assert gelu <= silu + 64, (silu, gelu)  # < 1 instruction more a weight (566 -> 598)


def test_fp8_weights_one_row_loop_is_ffma_not_tree_sums():
    """E4M3 weights (`gemv(w_scale=)`), one row at the FP8 default (16 x 512, 4 warps: 64
    weights a thread an iteration) with the decode folds (deferred norm, residual): each weight
    is a convert (F2FP + HADD2) and one FFMA into the 2-D accumulator; no cross-thread sum in the
    loop, no spill, <= 4 instructions a weight byte (3.6 with triton 3.8). The per-row tree sum
    at the 16-bit one-row tiles (4 x 2048) was 6.4 a byte: near what an H200 SM can issue at
    HBM speed (~7 a byte)."""
    fp8 = {**TYPES, "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32"}
    const = {"HAS_BIAS": 0, "SILU_MUL": 0, "GELU_TANH": 0, "RESIDUAL": 1, "NORM": 1, "UNIT": 0,
             "BLOCK_P": 64, "POST_NORM": 0, "BLOCK_Q": 1, "LORA": 0, "LORA_SLICES": 1,
             "BLOCK_R": 1, "SPLIT_K": 2, "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 512,
             "WEIGHT_EVICTION": "evict_first", "USE_PDL": 1, "W_SCALE": 1,
             "FMA2D": 1}  # fmt: skip
    count, spills, ops = largest_loop("polymodal.llm_core.layers.gemv._gemv_kernel", const, fp8)
    assert spills == 0 and ops.get("SHFL", 0) == 0, ops
    assert ops.get("FFMA", 0) >= 64 and ops.get("FADD", 0) <= 8, ops
    assert count / 64 <= 4.0, (count, ops)
