"""Gemma 3's fused norm kernels (`layers/triton_norm.py`) compiled, at Gemma-3-12B sizes in
bf16: the same bits as the kernels they replace (the row norm kernel, one call per norm)."""

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


def test_sandwich_norm_equals_two_norm_kernels():
    from polymodal.llm_core.layers import triton_ops as ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    y, residual = (
        torch.randn(287, 3840, device="cuda", generator=gen).bfloat16() for _ in range(2)
    )
    w_post, w_pre = (torch.randn(3840, device="cuda", generator=gen).bfloat16() for _ in range(2))
    out, new_res = ops.sandwich_norm(y, residual, w_post, 1e-6, w_pre, 1e-6)
    normed, _ = ops.rms_norm(y, w_post, 1e-6, unit_offset=True)
    want_out, want_res = ops.rms_norm(normed, w_pre, 1e-6, residual, unit_offset=True)
    assert torch.equal(new_res, want_res)
    assert torch.equal(out, want_out)


def test_qk_norm_equals_row_kernel_on_copies():
    from polymodal.llm_core.layers import triton_ops as ops

    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens, heads, kv_heads, d = 287, 16, 8, 256
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, device="cuda", generator=gen).bfloat16()
    q = qkv[:, : heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    w_q, w_k = (torch.randn(d, device="cuda", generator=gen).bfloat16() for _ in range(2))
    want_q = ops.rms_norm(q.contiguous(), w_q, 1e-6, unit_offset=True)[0]
    want_k = ops.rms_norm(k.contiguous(), w_k, 1e-6, unit_offset=True)[0]
    v = qkv[:, (heads + kv_heads) * d :].clone()
    ops.qk_rms_norm_(q, k, w_q, w_k, 1e-6, unit_offset=True)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v)


def test_add_layer_norm_matches_torch():
    """SigLIP sizes (4096 patches of 1152): torch's add, then its LayerNorm."""
    from polymodal.llm_core.layers import triton_ops as ops

    gen = torch.Generator(device="cuda").manual_seed(2)
    x, delta = (torch.randn(4096, 1152, device="cuda", generator=gen).bfloat16() for _ in "xd")
    norm = torch.nn.LayerNorm(1152, eps=1e-6).cuda().bfloat16()
    norm.weight.data.normal_(1.0, 0.3, generator=gen)
    norm.bias.data.normal_(0.0, 0.3, generator=gen)
    for d in (None, delta):
        s, out = ops.add_layer_norm(x, d, norm.weight, norm.bias, norm.eps)
        want = x if d is None else x + d
        assert torch.equal(s, want)
        torch.testing.assert_close(out, norm(want), atol=2e-2, rtol=2e-2)
        want32 = torch.nn.functional.layer_norm(
            want.float(), (1152,), norm.weight.float(), norm.bias.float(), 1e-6
        )
        assert (out.float() - want32).abs().max() <= (norm(want).float() - want32).abs().max() * 2


@pytest.mark.parametrize("gated", [False, True])
def test_add_layer_norm_of_mllama_parts(gated):
    """Mllama-11B's tower (two images of 4 x 1608 rows of 1280, the first 1601 real): the
    attention's two row parts times tanh(gate) added in the norm kernel give torch's
    `x + gate * cat(parts)` bit for bit (the product rounded to bf16 before the add: the
    fortieth session's H100 run found a quarter of the sums one step off, the cast's rounding
    dropped by the compiler), and its LayerNorm."""
    from polymodal.llm_core.layers import triton_ops as ops

    gen = torch.Generator(device="cuda").manual_seed(4)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", generator=gen).bfloat16()  # noqa: E731
    x, parts = rnd(2, 6432, 1280), (rnd(2, 1601, 1280), rnd(2, 4831, 1280))
    gate = torch.tensor([0.7], device="cuda").bfloat16().tanh() if gated else None
    norm = torch.nn.LayerNorm(1280, eps=1e-5).cuda().bfloat16()
    norm.weight.data.normal_(1.0, 0.3, generator=gen)
    whole = torch.cat(parts, dim=1)
    want = x + (gate * whole if gated else whole)
    s, out = ops.add_layer_norm(x, parts, norm.weight, norm.bias, norm.eps, True, gate)
    assert torch.equal(s, want)
    torch.testing.assert_close(out, norm(want), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vit_mlp_gelu_epilogue_is_the_tanh_gelu(dtype):
    """fc1's GEMM with cuBLASLt's GELU epilogue computes SigLIP's `gelu_pytorch_tanh` (not
    the erf GELU), close to the eager fc1 -> GELU-tanh -> fc2."""
    from polymodal.encoders.vit import ViTMLP

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(3)
    mlp = ViTMLP(1152, 4304, "gelu_pytorch_tanh").cuda().to(dtype)
    for p in mlp.parameters():
        p.data.normal_(0.0, 0.05, generator=gen)
    x = torch.randn(4096, 1152, device="cuda", generator=gen).to(dtype)
    with torch.inference_mode():
        h = torch.nn.functional.linear(x.float(), mlp.fc1.weight.float(), mlp.fc1.bias.float())
        tanh = torch.nn.functional.gelu(h, approximate="tanh")
        fused = torch._addmm_activation(mlp.fc1.bias, x, mlp.fc1.weight.t(), use_gelu=True)
        eager = mlp.fc2(mlp.act(mlp.fc1(x)))
        out = mlp(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), tanh, atol=tol, rtol=tol)
    if dtype == torch.float32:  # erf and tanh GELUs differ by up to ~5e-4 where |h| ~ 2
        assert (fused - torch.nn.functional.gelu(h)).abs().max() > 1e-4
    torch.testing.assert_close(out.float(), eager.float(), atol=tol * 10, rtol=tol * 10)
