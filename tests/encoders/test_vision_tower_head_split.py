"""Qwen2-VL / Qwen2.5-VL vision towers at the real head_dim 80 (16 x 80 in the 7B towers; here
2 heads), whose attention the Triton varlen kernel runs as two parts (64 + 16), through the
Triton backend (interpreted on CPU) against transformers' tower with the same weights."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.attention import triton_backend
from polymodal.llm_core.attention.triton_prefill import head_dim_split
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    test_interpreted_in_subprocess,  # noqa: F401
)

GRIDS = [[1, 10, 14], [2, 4, 6], [1, 6, 4]]  # partial windows, a video, a small image
TOWERS = {  # arch: HF vision config with head_dim 80 (window + full blocks for Qwen2.5-VL)
    "qwen2_5_vl": dict(depth=2, hidden_size=160, num_heads=2, intermediate_size=64,
                       out_hidden_size=32, window_size=56, fullatt_block_indexes=[1]),
    "qwen2_vl": dict(depth=2, embed_dim=160, hidden_size=32, num_heads=2, mlp_ratio=2),
}  # fmt: skip


def _towers(arch: str):
    """(HF tower, ours on the Triton backend) with the same random weights, fp32."""
    import transformers as tf
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from polymodal.encoders.qwen2_5_vl import Qwen2_5VisionTower
    from polymodal.encoders.qwen2_vl import Qwen2VisionTower

    if arch == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLVisionConfig(**TOWERS[arch])
        hf_cls, ours_cls = (
            modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel,
            Qwen2_5VisionTower,
        )
    else:
        cfg = tf.Qwen2VLVisionConfig(**TOWERS[arch])
        hf_cls, ours_cls = modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel, Qwen2VisionTower
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = hf_cls._from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for name, param in hf.named_parameters():
            if param.dim() >= 2 and "norm" not in name:
                param.normal_(0.0, 1.5 / param.shape[-1] ** 0.5)
    ours = ours_cls.from_config(cfg, backend=triton_backend.TritonAttentionBackend())
    ours.load_weights(hf.state_dict().items())
    return hf, ours


@pytest.mark.parametrize("arch", sorted(TOWERS))
def test_tower_head_dim_80_through_triton_matches_transformers(arch):
    hf, ours = _towers(arch)
    assert ours.blocks[0].attn.num_heads * 80 == TOWERS[arch].get("embed_dim", 160)
    assert head_dim_split(80) == (64, 16)
    grid_thw = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        ref = hf(pixels, grid_thw=grid_thw)
        ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
        out = ours(pixels, grid_thw)
    assert out.shape == ref.shape == (grid_thw.prod(-1).sum() // 4, 32)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
