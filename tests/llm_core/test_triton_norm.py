"""Gemma 3's fused norm kernels (`layers/triton_norm.py`) against the torch modules they stand
for and against the kernels they replace (`triton_ops.rms_norm`: the same bits), on CPU under
TRITON_INTERPRET=1 (set up in `interpreted.py`)."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.layers import triton_ops
from polymodal.llm_core.layers.norm import GemmaRMSNorm, RMSNorm
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)


def gemma_norm(size: int, dtype, seed: int) -> GemmaRMSNorm:
    torch.manual_seed(seed)
    norm = GemmaRMSNorm(size, 1e-6).to(dtype)
    norm.weight.data = (0.5 * torch.randn(size)).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sandwich_norm(dtype):
    """pre(residual + post(y)) and the new residual, as the two modules compute them; bit for
    bit what the post-norm kernel then the add+norm kernel give."""
    post, pre = gemma_norm(48, dtype, 0), gemma_norm(48, dtype, 1)
    pre.eps = 1e-5  # each norm's own eps
    y = (4 * torch.randn(2, 5, 48)).to(dtype)
    residual = torch.randn(2, 5, 48).to(dtype)
    out, new_res = triton_ops.sandwich_norm(y, residual, post.weight, post.eps, pre.weight, pre.eps)
    ref_out, ref_res = pre(post(y), residual)
    assert out.shape == y.shape and out.dtype == dtype and new_res.shape == y.shape
    assert_close(out, ref_out, dtype)
    assert_close(new_res, ref_res, dtype)
    normed, _ = triton_ops.rms_norm(y, post.weight, post.eps, unit_offset=True)
    two_out, two_res = triton_ops.rms_norm(normed, pre.weight, pre.eps, residual, unit_offset=True)
    assert torch.equal(out, two_out) and torch.equal(new_res, two_res)


def test_sandwich_norm_strided_rows():
    """Rows of a wider buffer (a slice of a packed output) are read with their stride."""
    post, pre = gemma_norm(32, torch.float32, 2), gemma_norm(32, torch.float32, 3)
    wide = torch.randn(6, 80)
    y, residual = wide[:, 8:40], torch.randn(6, 32)
    out, new_res = triton_ops.sandwich_norm(y, residual, post.weight, 1e-6, pre.weight, 1e-6)
    ref_out, ref_res = pre(post(y.contiguous()), residual)
    assert_close(out, ref_out, torch.float32)
    assert_close(new_res, ref_res, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemma", [True, False])
@pytest.mark.parametrize("heads_per_program", [None, 1, 2])
def test_qk_norm_in_place_on_packed_qkv(dtype, gemma, heads_per_program):
    """Each head of the q and k views of a packed qkv normalized in place by its own weight;
    v untouched; the same bits as the row kernel over contiguous copies. Heads a program: the
    default (q's three in one, k's two in another), one, two (q's last block half past q)."""
    tokens, heads, kv_heads, d = 5, 3, 2, 32
    qkv = (3 * torch.randn(tokens, (heads + 2 * kv_heads) * d)).to(dtype)
    q = qkv[:, : heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    cls = GemmaRMSNorm if gemma else RMSNorm
    q_norm, k_norm = cls(d, 1e-6).to(dtype), cls(d, 1e-6).to(dtype)
    q_norm.weight.data = (0.5 * torch.randn(d)).to(dtype)
    k_norm.weight.data = (0.5 * torch.randn(d)).to(dtype)
    ref_q, ref_k = q_norm(q.clone()), k_norm(k.clone())
    row_q = triton_ops.rms_norm(q.contiguous(), q_norm.weight, 1e-6, unit_offset=gemma)[0]
    row_k = triton_ops.rms_norm(k.contiguous(), k_norm.weight, 1e-6, unit_offset=gemma)[0]
    out_q, out_k = triton_ops.qk_rms_norm_(q, k, q_norm.weight, k_norm.weight, 1e-6, gemma,
                                           heads_per_program)  # fmt: skip
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert_close(q, ref_q, dtype)
    assert_close(k, ref_k, dtype)
    assert torch.equal(q, row_q) and torch.equal(k, row_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_layer_norm(dtype, with_delta):
    """s = x + delta rounded as torch adds (the interpreter truncates to bf16: compared within
    a rounding there), then torch's LayerNorm of s (fp32 statistics)."""
    norm = torch.nn.LayerNorm(40, eps=1e-6).to(dtype)
    norm.weight.data = (1 + 0.5 * torch.randn(40)).to(dtype)
    norm.bias.data = torch.randn(40).to(dtype)
    x = (3 + 2 * torch.randn(2, 7, 40)).to(dtype)  # an offset mean: the centring matters
    delta = torch.randn(2, 7, 40).to(dtype) if with_delta else None
    s, out = triton_ops.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)
    want = x + delta if with_delta else x
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(s, want, dtype)
    assert dtype != torch.float32 or torch.equal(s, want)
    assert_close(out, norm(s), dtype)
