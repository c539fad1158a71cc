"""The FP8 GEMV's sm_90 code, compiled offline (`tests/llm_core/sass.py`): its K loop at batch
1 in `gemv_config`'s tiles. The previous kernel converted every weight byte to fp32 and summed
each tile across threads: 6.3 instructions a weight byte per channel, 14.5 blockwise in its
8-row tiles (converts, FMUL / FFMA, shuffles and barriers). Now the bytes go from cp.async
copies straight into E4M3 wgmma (QGMMA); what is left a tile is x's: its quantization and its
zero-padded copy."""

import pytest

from polymodal.llm_core.layers.fp8_gemv import gemv_config
from tests.llm_core.sass import largest_loop

TYPES = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "b_ptr": "*bf16",
         "out_ptr": "*bf16", "part_ptr": "*fp32", "res_ptr": "*bf16", "sumsq_ptr": "*fp32",
         "norm_w_ptr": "*bf16", "norm_sumsq_ptr": "*fp32", "eps": "fp32"}  # fmt: skip


def gemv_loop(blockwise: bool, **folds):
    """(instructions a weight byte, spill accesses, opcodes) of one row's K loop, 4096 x 4096."""
    block_n, block_k, split_k, warps = gemv_config(1, 4096, 4096, blockwise, 132)
    const = {"BLOCKWISE": blockwise, "HAS_BIAS": 0, "SPLIT_K": split_k, "BLOCK_M": 1,
             "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP": 128 if blockwise else block_k,
             "EVEN_K": True, "USE_PDL": 1, "AMAX_BLOCK": 4096, "DOT_F32": 0, "SILU_MUL": 0,
             "NORM": 0, "BLOCK_P": 1, "RESIDUAL": 0, **folds}  # fmt: skip
    kernel = "polymodal.llm_core.layers.fp8_gemv._fp8_gemv_kernel"
    # the K loop: the largest that multiplies (the amax pass's loop only compares)
    using = ("QGMMA",) if folds else ("QGMMA", "FFMA", "FMUL")  # a fold's amax pass multiplies
    count, spills, ops = largest_loop(kernel, const, TYPES, warps, using)
    weight_bytes = block_n * block_k // (32 * warps)  # one thread's share of a tile
    return count / weight_bytes, spills, ops


@pytest.mark.parametrize("blockwise", [False, True], ids=["channel", "block"])
def test_fp8_gemv_weights_go_to_tensor_cores_unconverted(blockwise):
    per_byte, spills, ops = gemv_loop(blockwise)
    assert spills == 0
    assert ops.get("QGMMA", 0) >= 4, ops  # E4M3 x E4M3 wgmma
    assert ops.get("F2FP", 0) <= 2, ops  # x's quantization only: no weight byte converted
    assert ops.get("HADD2", 0) == 0, ops  # (the old kernel's fp8 -> f16 -> f32 converts)
    # per channel no cross-thread sums at all; blockwise one, the tile's groups' amax
    assert ops.get("SHFL", 0) <= (7 if blockwise else 0), ops
    assert per_byte <= (2.0 if blockwise else 1.25), (per_byte, ops)


def test_fp8_gemv_folds_stay_off_the_weight_bytes():
    """The deferred norm and SiLU*mul touch x only (a tile's 256 values, shared by 64 weight
    rows): the folded one-row loop stays within ~0.5 instructions a weight byte of the plain."""
    plain, _, _ = gemv_loop(False)
    for folds in ({"NORM": 1, "BLOCK_P": 64, "RESIDUAL": 1}, {"SILU_MUL": 1, "RESIDUAL": 1}):
        per_byte, spills, ops = gemv_loop(False, **folds)
        assert spills == 0 and ops.get("QGMMA", 0) >= 4
        assert per_byte <= plain + 0.5, (folds, plain, per_byte)
