"""sm_90 code, compiled offline (`tests/llm_core/sass.py`), of the fresh chunk's pack launch
(`sdpa_pack._pack_kernel`: rotary, KV store and SDPA's padded copies) at Qwen2.5-VL-7B's heads
with and without a rotary, and of the rotary kernel on interleaved pairs (Llama 4's tower, head
dim 88): each compiles with no spills."""

import pytest

from tests.llm_core.sass import compiled

PACK_TYPES = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "qo_ptr", "ko_ptr", "vo_ptr",
                                         "kc_ptr", "vc_ptr")}  # fmt: skip
PACK_TYPES |= {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64"}


@pytest.mark.parametrize("half", [64, 0], ids=["rotary", "no_rotary"])
def test_pack_compiles_without_spills(half):
    rest = 128 - 2 * half
    const = {"HEAD_DIM": 128, "HALF": half, "BLOCK_HALF": max(half, 1), "REST": rest,
             "BLOCK_REST": rest, "BLOCK_D": 128, "BLOCK_QH": 32, "BLOCK_KH": 4,
             "PAGE_SIZE": 16, "USE_PDL": 1}  # fmt: skip
    _, loops = compiled("polymodal.llm_core.attention.sdpa_pack._pack_kernel", const, PACK_TYPES)
    assert all(spills == 0 for _, spills, _ in loops)


def test_pair_rotary_compiles_without_spills():
    const = {"HALF": 44, "BLOCK_QH": 16, "BLOCK_KH": 16, "BLOCK_HALF": 64, "USE_PDL": 1,
             "PAIRS": 1}  # fmt: skip
    types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    _, loops = compiled("polymodal.llm_core.layers.triton_ops._rotary_kernel", const, types)
    assert all(spills == 0 for _, spills, _ in loops)
