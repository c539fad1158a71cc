"""The paged prefill kernel's split form for cross launches, compiled offline for sm_90
(`tests/llm_core/sass.py`, no GPU): at Mllama-11B's cross heads (32 / 8 packed by kv head, d
128) and Whisper's (20 heads, d 64) it compiles, and spills no more than the causal split
launch the GPU runs already: nothing in its key-tile loops, at Mllama's shape a few accesses in
the merge loop (the last split's, once a tile), as the causal form at that shape."""

import pytest

from tests.llm_core.sass import compiled

TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
         "qk_scale": "fp32", "cap_log2": "fp32", "v_scale": "fp32", "part_out_ptr": "*fp32",
         "part_lse_ptr": "*fp32", "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32",
         "stride_oh": "i32", "stride_kt": "i32", "stride_ko": "i32", "stride_kh": "i32",
         "stride_bt": "i32", "num_tokens": "i32", "window": "i32"}  # fmt: skip
SHAPES = {  # GROUP, HEAD_DIM, PACK, Q_ROWS (BLOCK_M 64: `prefill_config` for d <= 128)
    "mllama-11b cross": (4, 128, 1, 16),
    "whisper-large-v3 cross": (1, 64, 0, 0),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cross_split_compiles_without_spills(shape):
    group, head_dim, pack, rows = SHAPES[shape]
    block_m = 128 if head_dim <= 64 else 64
    const = {"GROUP": group, "HEAD_DIM": head_dim, "PAGE_SIZE": 16, "BLOCK_M": block_m,
             "BLOCK_N": 64, "BLOCK_D": head_dim, "PAGED": 1, "SOFTCAP": 0, "DOT_F32": 0,
             "USE_PDL": 1, "FP8_KV": 0, "D_LO": 0, "SPLITS": 16, "MIN_TILES": 8, "PACK": pack,
             "Q_ROWS": rows}  # fmt: skip
    kernel = "polymodal.llm_core.attention.triton_prefill._attn_fwd_kernel"
    warps = 4
    causal, causal_loops = compiled(kernel, {**const, "MASK": 0, "RANGES": 0}, TYPES, warps)
    registers, loops = compiled(kernel, {**const, "MASK": 4, "RANGES": 1}, TYPES, warps)
    spilling = [spills for _, spills, _ in loops if spills]
    causal_spilling = [spills for _, spills, _ in causal_loops if spills]
    assert len(loops) == len(causal_loops) and len(spilling) == len(causal_spilling), shape
    assert sum(spilling) <= sum(causal_spilling) + 8, (shape, spilling, causal_spilling)
    assert registers <= max(causal + 32, 255), (shape, causal, registers)
