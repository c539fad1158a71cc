"""The paged decode kernel's sm_90 code, compiled offline (`tests/llm_core/sass.py`): with the
q/k RMSNorms folded in (Qwen3's, Gemma 3's unit offset) it compiles at Qwen3-30B-A3B's and
Gemma-3-12B's decode shapes with no spills and about the registers of the plain rotary."""

import pytest

from tests.llm_core.sass import compiled

TYPES = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16",
         "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "new_k_ptr": "*bf16",
         "new_v_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
         "q_norm_ptr": "*bf16", "k_norm_ptr": "*bf16", "norm_eps": "fp32", "qk_scale": "fp32",
         "cap_log2": "fp32", "k_scale": "fp32", "v_scale": "fp32"}  # fmt: skip
SHAPES = {  # GROUP, HEAD_DIM, BLOCK_N (`decode_block_n`), MASK, SOFTCAP
    "qwen3-30b-a3b": (8, 128, 64, 0, 0),
    "gemma-3-12b local": (2, 256, 32, 1, 0),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_folded_qk_norms_compile_without_spills(shape):
    group, head_dim, block_n, mask, softcap = SHAPES[shape]
    const = {"GROUP": group, "HEAD_DIM": head_dim, "PAGE_SIZE": 16, "BLOCK_G": 16,
             "BLOCK_D": head_dim, "BLOCK_N": block_n, "NUM_SPLITS": 16, "BLOCK_S": 16,
             "MERGE_UNROLL": 4, "MIN_SPLIT_KEYS": block_n, "MASK": mask, "SOFTCAP": softcap,
             "DOT_F32": 0, "ROPE_HALF": head_dim // 2, "USE_PDL": 1, "FP8_KV": 0}  # fmt: skip
    kernel = "polymodal.llm_core.attention.triton_decode._decode_kernel"
    plain, _ = compiled(kernel, {**const, "QK_NORM": 0}, TYPES)
    for norm in (1, 2):
        registers, loops = compiled(kernel, {**const, "QK_NORM": norm}, TYPES)
        assert all(spills == 0 for _, spills, _ in loops), (shape, norm)
        assert registers <= plain + 16, (shape, norm, plain, registers)
