"""The INT4 GEMM's sm_90 code, compiled offline (`tests/llm_core/sass.py`): what its K loop
costs per weight element. The previous kernel took 14.7 (each int32 loaded 8 times, shifted,
masked, converted int -> float, zero subtracted, scaled, rounded: 470 instructions per 64-deep
128 x 128 tile on 8 warps); this one ~5.1 (a mask and an FMA a weight, half a pack to 16 bits,
the scale terms once per feature and tile)."""

import pytest

from polymodal.llm_core.layers.int4_kernels import gemm_config
from tests.llm_core.sass import largest_loop

# x bf16 with the checkpoints' fp16 scales: the 7B bench's AWQ / GPTQ layers
TYPES = {"x_ptr": "*bf16", "s_ptr": "*fp16", "b_ptr": "*bf16", "out_ptr": "*bf16",
         "z_ptr": "*u8"}  # fmt: skip


def gemm_loop(m: int, x_dtype: str = "bf16"):
    """(instructions per weight element, spills, opcode counts) of `gemm_config(m, ...)`'s
    K loop at the 7B's qkv shape (group 128)."""
    block_m, block_n, block_k, warps, _ = gemm_config(m, 4608, 128, True)
    const = {"HAS_BIAS": 0, "EVEN_K": 1, "SCALE_ACC": int(x_dtype != "fp16"), "DOT_F32": 0,
             "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_TILES": 1,
             "GROUP_M": 8, "USE_PDL": 1}  # fmt: skip
    types = {**TYPES, "x_ptr": f"*{x_dtype}", "out_ptr": f"*{x_dtype}"}
    count, spills, ops = largest_loop(
        "polymodal.llm_core.layers.int4_kernels._int4_gemm_kernel", const, types, warps
    )
    weights = block_n * block_k // (32 * warps)  # one thread's weight elements per tile
    return count / weights, spills, ops, weights


@pytest.mark.parametrize("m", [290, 64])
def test_int4_gemm_loop_is_a_mask_and_an_fma_a_weight(m):
    """Prefill (128 x 128 tiles) and few rows (64 x 64): <= 6 instructions a weight, one
    FFMA and one LOP3 each, no int -> float convert per weight, the dot on tensor cores
    (HGMMA), no spills, no layout conversions through shared memory (barriers: the pipeline's
    3)."""
    per_weight, spills, ops, weights = gemm_loop(m)
    assert spills == 0
    assert per_weight <= 6.0, (per_weight, ops)
    assert ops.get("HGMMA", 0) > 0, ops
    assert ops.get("FFMA", 0) <= weights * 1.05, ops
    assert ops.get("LOP3", 0) <= weights * 1.1, ops
    converts = sum(n for op, n in ops.items() if op.startswith("I2F"))
    assert converts <= weights / 8, ops  # the tile's zeros only
    assert ops.get("BAR", 0) <= 4, ops


def test_int4_gemm_fp16_loop_scales_weights_back():
    """fp16 activations: one FMUL more a weight (2^38 back before rounding), <= 7."""
    per_weight, spills, ops, _ = gemm_loop(290, "fp16")
    assert spills == 0
    assert per_weight <= 7.0, (per_weight, ops)
    assert ops.get("HGMMA", 0) > 0, ops
