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
