"""The split-KV paged prefill kernel's sm_90 code, compiled offline (`tests/llm_core/sass.py`):
with a kv head's query group packed into its rows and the last split merging the partials,
it compiles at Qwen2.5-VL-7B's decoder heads (group 7, d 128, 64 x 64 tiles) with no spills."""

import pytest

from tests.llm_core.sass import compiled

TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
         "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32",
         "cap_log2": "fp32", "v_scale": "fp32"}  # fmt: skip
CONST = {"GROUP": 7, "HEAD_DIM": 128, "PAGE_SIZE": 16, "BLOCK_M": 64, "BLOCK_N": 64,
         "BLOCK_D": 128, "PAGED": True, "MASK": 0, "SOFTCAP": False, "DOT_F32": False,
         "USE_PDL": True, "RANGES": False, "FP8_KV": False, "D_LO": 0, "SPLITS": 16,
         "MIN_TILES": 8, "Q_ROWS": 9}  # fmt: skip


@pytest.mark.parametrize("pack", [False, True])
def test_split_prefill_compiles_without_spills(pack):
    kernel = "polymodal.llm_core.attention.triton_prefill._attn_fwd_kernel"
    _, loops = compiled(kernel, {**CONST, "PACK": pack}, TYPES)
    assert loops and all(spills == 0 for _, spills, _ in loops), loops
