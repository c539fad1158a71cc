"""The INT4 GEMV's sm_90 code, compiled offline (`tests/llm_core/sass.py`): what its K loop
costs per weight nibble. The previous kernels took 11 (shift, mask, convert, subtract, FMA and
per-tile cross-thread sums) and 5.9 (the 2^23 magic-number float: mask-or, subtract, FMA)."""

from tests.llm_core.sass import largest_loop

TYPES = {"x_ptr": "*bf16", "s_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
         "z_ptr": "*u8", "part_ptr": "*fp32", "res_ptr": "*bf16", "sumsq_ptr": "*fp32",
         "norm_w_ptr": "*bf16", "norm_sumsq_ptr": "*fp32", "eps": "fp32"}  # fmt: skip


def gemv_loop(block_m: int, block_n: int = 128, warps: int = 4, **folds):
    const = {"HAS_BIAS": 0, "HAS_PERM": 0, "SILU_MUL": 0, "NORM": 0, "BLOCK_P": 1, "RESIDUAL": 0,
             "SPLIT_K": 8, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128,
             "GROUP_TILES": 1, "SUB_N": 32, "USE_PDL": 1, "PREFETCH": 0, **folds}  # fmt: skip
    count, spills, ops = largest_loop(
        "polymodal.llm_core.layers.int4_gemv._int4_gemv_kernel", const, TYPES, warps
    )
    nibbles = block_n * 128 // (32 * warps)  # one thread's weight nibbles per iteration
    return count / nibbles, spills, ops


def test_int4_gemv_decode_loop_is_one_mask_and_one_fma_a_nibble():
    per_nibble, spills, ops = gemv_loop(1)
    assert spills == 0
    assert per_nibble <= 3.5, (per_nibble, ops)
    nibbles = 128 * 128 // 128
    assert ops.get("FFMA", 0) <= 1.25 * nibbles  # one FMA a nibble (+ zero and scale per int)
    assert ops.get("FADD", 0) <= nibbles / 8  # no per-nibble zero subtraction
    converts = sum(n for op, n in ops.items() if op.startswith("I2F"))
    assert converts <= nibbles / 32  # the tile's zeros only: no nibble converted


def test_int4_gemv_prefetch_keeps_the_loop_cost():
    """A tile ahead (PREFETCH: the next tile's loads issued before this tile's math): the same
    instructions a nibble, no spills (the second tile's registers fit)."""
    plain, _, _ = gemv_loop(1)
    ahead, spills, ops = gemv_loop(1, PREFETCH=1)
    assert spills == 0 and ahead <= plain + 0.3, (plain, ahead, ops)


def test_int4_gemv_rows_share_the_unpacked_nibbles():
    """Four rows: the nibble masks are made once and feed four FMAs."""
    per_nibble, spills, ops = gemv_loop(4)
    assert spills == 0
    assert per_nibble <= 4 * 2.2, (per_nibble, ops)
    assert ops["LOP3"] <= 1.2 * (128 * 128 // 128)


def test_int4_gemv_folds_cost_little_per_nibble():
    """The deferred RMSNorm (qkv, gate_up) and SiLU*mul (down) are applied to x as it loads, once
    per x value a thread holds (16 nibbles share it): the folded loops stay within ~1.2
    instructions a nibble of the plain one."""
    plain, _, _ = gemv_loop(1)
    norm, spills, _ = gemv_loop(1, NORM=1, BLOCK_P=32, RESIDUAL=1)
    assert spills == 0 and norm <= plain + 0.6, (plain, norm)
    silu, spills, _ = gemv_loop(1, SILU_MUL=1, RESIDUAL=1)
    assert spills == 0 and silu <= plain + 1.3, (plain, silu)
