"""The one-launch MoE decode block (`layers/moe_layer.py`) against the three launches it
replaces (`moe_decode.route` + `moe_decode.experts`) and the torch router, on CPU under
TRITON_INTERPRET=1 (one program: the interpreter runs programs in turn; the grid of many
resident programs runs in `test_moe_gpu.py`): softmax and DeepSeek-V3's grouped sigmoid
routing, a deferred RMSNorm in, the residual out, rows sharing experts, shared experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.layers import moe_decode, moe_layer
from polymodal.llm_core.layers.moe import RouterConfig, route
from polymodal.llm_core.layers.norm import AddedResidual
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)
from tests.llm_core.test_moe_decode import HIDDEN, assert_same_choice, deferred, make_experts
from tests.llm_core.test_moe_decode_deepseek import router_inputs, shared_mlp

CASES = {  # name: (experts, top_k, rows)
    "qwen3_one_row": (32, 8, 1),
    "mixtral_rows_share": (8, 2, 5),  # 5 rows over 8 experts: pairs of one expert
    "eight_rows": (16, 4, 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,residual", [(torch.float32, False), (torch.bfloat16, True)])
def test_one_launch_equals_route_then_experts(case, dtype, residual):
    """The torch router's choice; then, given that choice, bit for bit `experts`' output (the
    same tiles in the same order) and its sums of squares. Twice: the counters reset."""
    num_experts, top_k, rows = CASES[case]
    gen = torch.Generator().manual_seed(rows + num_experts)
    router = torch.randn(num_experts, HIDDEN, generator=gen).to(dtype)
    gate_up, down = make_experts(num_experts, dtype)
    x, normed = deferred(rows, dtype, seed=rows)
    res = torch.randn(rows, HIDDEN, generator=gen).to(dtype) if residual else None
    logits = F.linear(normed, router)
    ref_weights, ref_ids = route(logits, RouterConfig(top_k, True))
    for _ in range(2):
        out, weights, ids = moe_layer.moe_layer(x, router, gate_up, down, top_k, True, 1.0, res)
        assert_same_choice(weights, ids, ref_weights, ref_ids, logits, dtype)
        ref = moe_decode.experts(x, gate_up, down, weights, ids, res)
        assert type(out) is type(ref)
        if residual:
            assert torch.equal(out.h, ref.h) and torch.equal(out.sumsq, ref.sumsq)
        else:
            assert torch.equal(out, ref)


@pytest.mark.parametrize("count", [0, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_grouped_sigmoid_routing_and_shared_experts(count, rows):
    """DeepSeek-V3's router (fp32 logits, correction bias, groups, scaling) and `count` shared
    experts: `route`'s weights and ids exactly (fp32), then `experts`' sum bit for bit."""
    dtype = torch.float32
    gate_up, down = make_experts(16, dtype)
    weight, bias, cfg = router_inputs("v3_grouped", dtype, seed=5)
    mlp = shared_mlp(max(count, 1), dtype)
    shared = (mlp.gate_up_proj.weight, mlp.down_proj.weight) if count else None
    x, _ = deferred(rows, dtype, seed=6)
    res = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(7))
    args = dict(scoring="sigmoid", fp32_logits=True, correction_bias=bias,
                num_groups=cfg.num_groups, topk_groups=cfg.topk_groups)  # fmt: skip
    ref_weights, ref_ids = moe_decode.route(x, weight, cfg.top_k, cfg.renormalize, cfg.scaling,
                                            shared_experts=count, **args)  # fmt: skip
    out, weights, ids = moe_layer.moe_layer(x, weight, gate_up, down, cfg.top_k, cfg.renormalize,
                                            cfg.scaling, res, shared=shared, **args)  # fmt: skip
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights, dtype)
    ref = moe_decode.experts(x, gate_up, down, weights, ids, res, shared=shared)
    assert isinstance(out, AddedResidual) and torch.equal(out.h, ref.h)


def test_layer_config_and_bad_inputs():
    with pytest.raises(ValueError, match="power of two"):
        moe_layer.LayerConfig(down_n=24)
    gate_up, down = make_experts(8, torch.float32)
    router = torch.randn(8, HIDDEN)
    x = torch.randn(1, HIDDEN)
    with pytest.raises(ValueError, match="not 8 contiguous experts"):
        moe_layer.moe_layer(x, router, gate_up[:, :, :-1], down, 2)
    with pytest.raises(ValueError, match="residual"):
        moe_layer.moe_layer(x, router, gate_up, down, 2, residual=torch.randn(2, HIDDEN))
    with pytest.raises(ValueError, match="top_k"):
        moe_layer.moe_layer(x, router, gate_up, down, 9)
    out, weights, ids = moe_layer.moe_layer(x[:0], router, gate_up, down, 2)
    assert out.shape == (0, HIDDEN) and ids.shape == (0, 2)


def test_resident_programs_by_registers_warps_and_shared_memory():
    """An SM's 64K registers (256 a warp at a time), 64 warps, 32 programs and its shared
    memory bound the persistent grid."""
    assert moe_layer._resident(255, 8, 0, 228 * 1024) == 1  # 8 warps x 256 regs x 32 = 64K
    assert moe_layer._resident(128, 8, 0, 228 * 1024) == 2
    assert moe_layer._resident(40, 4, 0, 228 * 1024) == 12  # 5 x 256 a warp: 64K / 5K
    assert moe_layer._resident(41, 4, 0, 228 * 1024) == 10  # 6 x 256 a warp
    assert moe_layer._resident(32, 4, 0, 228 * 1024) == 16  # the warp limit
    assert moe_layer._resident(32, 1, 0, 228 * 1024) == 32  # the program limit
    assert moe_layer._resident(32, 4, 100 * 1024, 228 * 1024) == 2  # shared memory
