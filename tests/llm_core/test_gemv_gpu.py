"""The 16-bit Triton GEMV at a 7B decoder's real shapes in bf16 on CUDA (default and split-K
configs, SiLU*mul on load, CUDA-graph replay) against F.linear in fp32."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted here"
    ),
]

ATOL = RTOL = 2e-2  # bf16 inputs/outputs, fp32 accumulation


def check(out, ref):
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL, rtol=RTOL)


GEMV_SHAPES = {  # Qwen2.5-VL-7B decoder: (N, K, bias)
    "qkv": (4608, 3584, True),
    "o_proj": (3584, 3584, False),
    "gate_up": (37888, 3584, False),
    "down": (3584, 18944, False),
    "lm_head": (152064, 3584, False),
}


def gemv_inputs(rows, n, k, has_bias, seed=0):
    """bf16 x [rows, K], weight [N, K] scaled so outputs are ~N(0, 1), optional bias."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).bfloat16()
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16() if has_bias else None
    return x, weight, bias


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", sorted(GEMV_SHAPES))
def test_gemv_real_shapes(name, rows):
    """The default config and a split-K one (3 splits, 8 warps) against F.linear in fp32."""
    import torch.nn.functional as F

    from polymodal.llm_core.layers.gemv import GemvConfig, gemv

    x, weight, bias = gemv_inputs(rows, *GEMV_SHAPES[name])
    ref = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    for config in (None, GemvConfig(block_n=16, block_k=512, split_k=3, num_warps=8)):
        out = gemv(x, weight, bias, config)
        assert out.shape == ref.shape and out.dtype == torch.bfloat16
        check(out, ref)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_silu_mul_down_shape(rows, gelu):
    """The decode MLP's down projection with SiLU*mul (Gemma: GELU-tanh * up) on load (default
    config: the one-row split-K pick for one row) against the activation kernel + F.linear in
    fp32, twice (counters reset)."""
    import torch.nn.functional as F

    from polymodal.llm_core.layers import triton_ops as ops
    from polymodal.llm_core.layers.gemv import gemv

    n, k, _ = GEMV_SHAPES["down"]
    gen = torch.Generator(device="cuda").manual_seed(3)
    gate_up = torch.randn(rows, 2 * k, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).bfloat16()
    ref = F.linear(ops.silu_and_mul(gate_up, gelu_tanh=gelu).float(), weight.float())
    for _ in range(2):
        check(gemv(gate_up, weight, silu_mul=True, gelu_tanh=gelu), ref)


def test_gemv_cuda_graph_replay_matches_eager():
    """Capture a split-K and a plain call; replay twice with new x and weights copied in."""
    from polymodal.llm_core.layers.gemv import GemvConfig, gemv

    x, weight, bias = gemv_inputs(2, 4608, 3584, True, seed=5)
    split, plain = GemvConfig(block_n=16, block_k=256, split_k=4), GemvConfig(split_k=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        gemv(x, weight, bias, split)
        gemv(x, weight, None, plain)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_split = gemv(x, weight, bias, split)
        static_plain = gemv(x, weight, None, plain)
    for seed in (6, 7):
        new_x, new_weight, new_bias = gemv_inputs(2, 4608, 3584, True, seed=seed)
        x.copy_(new_x)
        weight.copy_(new_weight)
        bias.copy_(new_bias)
        graph.replay()
        torch.testing.assert_close(static_split, gemv(x, weight, bias, split), atol=0, rtol=0)
        torch.testing.assert_close(static_plain, gemv(x, weight, None, plain), atol=0, rtol=0)
        check(static_split, x.float() @ weight.float().t() + bias.float())


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name,n,k", [("o_proj", 3840, 4096), ("down", 3840, 15360)])
def test_gemv_post_norm_equals_the_sandwich_kernel(name, n, k, rows):
    """Gemma-3-12B's o_proj / down with the post-norm and the add folded (default configs: the
    down's split-K finisher, o_proj's 960 feature blocks): h is the `sandwich_norm` kernel's
    new residual on the plain GEMV's output, but for rare elements one bf16 rounding apart (the
    same sums of squares in another order), twice (the arrival counter reset); the unit-offset
    deferred norm into the next GEMV equals the GEMV of the kernel's normalized output."""
    from polymodal.llm_core.layers import triton_ops as ops
    from polymodal.llm_core.layers.gemv import gemv
    from polymodal.llm_core.layers.norm import DeferredNorm

    x, weight, _ = gemv_inputs(rows, n, k, False, seed=11)
    gen = torch.Generator(device="cuda").manual_seed(12)
    residual = torch.randn(rows, n, device="cuda", generator=gen).bfloat16()
    post_w, pre_w = (0.5 * torch.randn(n, device="cuda", generator=gen).bfloat16() for _ in "ab")
    ref_x, ref_h = ops.sandwich_norm(gemv(x, weight), residual, post_w, 1e-6, pre_w, 1e-6)
    for _ in range(2):
        added = gemv(x, weight, residual=residual, post_norm=(post_w, 1e-6))
        torch.testing.assert_close(added.h.float(), ref_h.float(), atol=0, rtol=2**-7)
        assert (added.h != ref_h).float().mean() < 0.01
    nxt = (torch.randn(15360 * 2, n, device="cuda", generator=gen) * n**-0.5).bfloat16()
    deferred = DeferredNorm(added.h, added.sumsq, pre_w, 1e-6, unit_offset=True)
    check(gemv(deferred, nxt), gemv(ref_x, nxt))
